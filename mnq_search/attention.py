"""Quantized self-attention for timm ViT/DeiT (``Attention``) and Swin (``WindowAttention``).

timm computes attention with a fused kernel or an inline ``softmax``; here the softmax is an
explicit :class:`~mnq_search.slot.NonLinearSlot` named ``<path>.softmax`` and both matmuls are
integer products:

    qkv (QLinear) -> 8-bit (bits) per-tensor quantizer -> q k^T (scale s_q s_k, the 1/sqrt(d)
    attention scale folded into the scale) [+ Swin's relative position bias] -> softmax slot
    (its own input quantizer at the non-linear bit-width ``nl_bits``, default ``bits``; Swin's shift
    mask enters as an integer after quantization)
    -> attn v on the softmax's output grid -> proj (QLinear).

With quantization off, both classes compute exactly what timm's non-fused path computes.

Instance-aware group quantization of the attention probabilities (IGQ-ViT, issue 15):
:meth:`_QuantAttentionBase.set_softmax_groups` requantizes the softmax method's output, per
attention row, onto ``G`` unsigned grids at the slot's bit-width (:class:`GroupSoftmaxQuant`), and
``attn v`` runs as per-group partial sums.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .quant import ActQuant, QLinear, QuantMatMul
from .quant._group import GroupSoftmaxQuant
from .quant._group_matmul import matmul_partial_sums, matmul_partial_sums_int, merge_partial_sums
from .quant._wrappers import check_groups
from .integer import to_grid
from .slot import NonLinearSlot


def _unsupported(what: str, path: str) -> UsageError:
    return UsageError(f"{path}: {what} is not supported by mnq-search's integer attention")


class _QuantAttentionBase(nn.Module):
    """What both attentions share: quantized qkv, the two integer matmuls, the softmax slot, proj."""

    def __init__(self, attn: nn.Module, bits: int, path: str, fine_grid: bool = False, nl_bits: int | None = None):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = QLinear(attn.qkv, bits)
        self.q_qkv = ActQuant(bits)
        self.matmul_qk = QuantMatMul()
        self.softmax = NonLinearSlot(f"{path}.softmax", "softmax", nl_bits or bits, fine_grid=fine_grid)
        self.attn_drop = attn.attn_drop
        self.matmul_av = QuantMatMul()
        self.proj = QLinear(attn.proj, bits)
        self.proj_drop = attn.proj_drop
        self.p_group: GroupSoftmaxQuant | None = None

    @property
    def softmax_groups(self) -> int:
        return 1 if self.p_group is None else self.p_group.groups

    def set_softmax_groups(self, groups: int, keys: int | None = None) -> None:
        """Requantize the softmax output per attention row in ``groups`` instance-aware groups
        (1: the method's own per-tensor grid); ``keys`` (tokens per row) bounds ``groups`` when known."""
        groups = check_groups(groups, keys or 2**31, "softmax groups")
        if groups == "channel":
            raise UsageError("softmax groups must be a positive integer ('channel' applies to linear inputs)")
        if groups == self.softmax_groups:
            return
        self.p_group = None if groups == 1 else GroupSoftmaxQuant(self.softmax.bits, groups).to(
            self.proj.linear.weight.device)

    def _prob_groups(self, p: torch.Tensor):
        """The probabilities on their groups' grids, at the softmax slot's current bit-width (the slot
        owns the width: a per-slot width set on the slot alone reaches the groups too)."""
        self.p_group.bits = self.softmax.bits
        return self.p_group(p)

    def _qkv(self, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
        """(q, k, v) as the integers of one per-tensor grid, and its scale (quantization off: the
        float q, k, v and None)."""
        B, N, _ = x.shape
        qkv, s = self.q_qkv.quantize(self.qkv(x))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, s

    def _logits(self, q: torch.Tensor, k: torch.Tensor, s) -> torch.Tensor:
        """q k^T times the attention scale: an integer product on the qkv grid, or float."""
        if s is None:
            return (q @ k.transpose(-2, -1)) * self.scale
        return self.matmul_qk.forward_q(q, s, k.transpose(-2, -1), s)[0] * self.scale

    def _attend(self, logits: torch.Tensor, v: torch.Tensor, s_v, masked: torch.Tensor | None = None) -> torch.Tensor:
        """softmax slot, then attn v on the softmax's output grid (dropout breaks the grid: float then)."""
        p = self.attn_drop(self.softmax(logits, masked))
        on_grid = not self.training or self.attn_drop.p == 0
        s_p = self.softmax.out_scale if on_grid else None
        if s_v is None or s_p is None:
            return p @ (v if s_v is None else v * s_v)
        if self.p_group is not None:  # fake-quant: the probabilities dequantized on their row's group grids
            gq = self._prob_groups(p)
            return ((gq.q * gq.scale) @ v) * s_v
        return self.matmul_av.forward_q(to_grid(p, s_p), s_p, v, s_v)[0]

    def attend_partial_sums(self, p: torch.Tensor, v: torch.Tensor, s_v: torch.Tensor,
                            integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouped ``attn v`` as the integer pipeline computes it: (the ``G`` partial sums,
        float-held or, ``integer``, int64; the output merged from them), for probabilities ``p`` and
        the integers ``v``; equal to the fake-quant forward up to float32 rounding."""
        if self.p_group is None:
            raise UsageError("partial sums need softmax groups (set_softmax_groups(G), G > 1)")
        with torch.no_grad():
            gq = self._prob_groups(p)
            fn = matmul_partial_sums_int if integer else matmul_partial_sums
            acc = fn(gq.q, gq.group, self.p_group.groups, v)
            return acc, merge_partial_sums(acc, gq.group_scales, s_v)


class QuantAttention(_QuantAttentionBase):
    """timm ``vision_transformer.Attention`` with an integer softmax slot and integer matmuls."""

    def __init__(self, attn: nn.Module, bits: int, path: str, fine_grid: bool = False, nl_bits: int | None = None):
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise _unsupported("qk_norm", path)
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise _unsupported("scale_norm", path)
        if getattr(attn, "gate", None) is not None:
            raise _unsupported("gated attention", path)
        super().__init__(attn, bits, path, fine_grid, nl_bits)
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UsageError("attention masks are not supported for ViT/DeiT conversion")
        B, N, _ = x.shape
        q, k, v, s = self._qkv(x, self.head_dim)
        out = self._attend(self._logits(q, k, s), v, s)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.attn_dim)))


class QuantWindowAttention(_QuantAttentionBase):
    """timm ``swin_transformer.WindowAttention`` with an integer softmax slot and integer matmuls.

    The relative position bias is added to the logits before the softmax slot quantizes them
    (I-ViT adds it on the logits grid); the shift mask (0 / -inf, or -100 in older timm) becomes a
    boolean that the slot applies as an integer after quantization (spec trap 5).
    """

    def __init__(self, attn: nn.Module, bits: int, path: str, fine_grid: bool = False, nl_bits: int | None = None):
        super().__init__(attn, bits, path, fine_grid, nl_bits)
        self.window_area = attn.window_area
        self.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def _get_rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v, s = self._qkv(x, self.head_dim)
        logits = self._logits(q, k, s) + self._get_rel_pos_bias()
        masked = None
        if mask is not None:
            num_win = mask.shape[0]
            logits = logits.view(-1, num_win, self.num_heads, N, N)
            masked = (mask < -1.0).view(1, num_win, 1, N, N).expand_as(logits).reshape(-1, self.num_heads, N, N)
            logits = logits.reshape(-1, self.num_heads, N, N)
        out = self._attend(logits, v, s, masked)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, -1)))
