"""Quantized Linear, Conv2d and MatMul (HAWQ-V3 / I-ViT style, integer accumulators).

Weights are quantized symmetrically per output channel (``weight_bits``), the bias to int32 at
the accumulator scale ``s_w * s_in``. Each module takes its input on a per-tensor grid
``(x, s_x)`` and returns the int32 accumulator dequantized, with its per-channel scale
``s_x * s_w``: the next :class:`~mnq_search.quant.ActQuant` brings it back to the activation
grid (on the integer path with a dyadic multiplier, see :mod:`._dyadic`).

The fake-quant forward multiplies the *integers* (``x / s_x`` and ``w / s_w``) and scales the
result, so on GPU it may run in TF32: 8-bit operands are exact in TF32 and the fp32 accumulation
is exact below 2**24. (bf16 autocast is not safe here: it rounds the accumulator output.)

``forward_int`` is the integer path: int64 tensors in, int64 accumulators out, range-checked to
int32. On CUDA, where PyTorch has no int64 matmul, it multiplies in float64, which is exact for
these sizes (every partial sum is an integer below 2**53).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..integer import (HAVE_INT_MM, bias_scale_cpu, check_range, fast_enabled, int_linear_cpu, qrange, quantize_ste,
                       round_ste, to_grid)
from ._fake_quant import symmetric_scale


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matmul of int64 tensors (float64 on CUDA, exact below 2**53)."""
    if a.is_cuda:
        return torch.matmul(a.double(), b.double()).round().long()
    return torch.matmul(a, b)


def _int_gemm_ok(q_x: torch.Tensor) -> bool:
    return HAVE_INT_MM and q_x.device.type == "cpu" and q_x.dtype == torch.float32 and fast_enabled()


class _IntGemmSTE(torch.autograd.Function):
    """``q_x @ w_int^T`` for integer-valued float operands (8 bits or fewer) as an int8 x int8 GEMM
    with exact int32 accumulators (``torch._int_mm``, CPU); the backward is the float product rule
    of ``F.linear`` (``g @ w``, ``g^T @ x``), the straight-through estimator's."""

    @staticmethod
    def forward(ctx, q_x, w_int):
        ctx.save_for_backward(q_x, w_int)
        k, n = w_int.shape[1], w_int.shape[0]
        w8t = w_int.detach().to(torch.int8).t().contiguous()
        acc = torch._int_mm(q_x.detach().reshape(-1, k).to(torch.int8), w8t)
        return acc.float().view(*q_x.shape[:-1], n)

    @staticmethod
    def backward(ctx, g):
        q_x, w_int = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        g_x = (g2 @ w_int).view(q_x.shape) if ctx.needs_input_grad[0] else None
        g_w = g2.t() @ q_x.reshape(-1, q_x.shape[-1]) if ctx.needs_input_grad[1] else None
        return g_x, g_w


class _WeightQuantMixin:
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_bits: int

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel symmetric scale (no gradient): from the current weights' absolute
        maximum, or the learned LSQ steps once :meth:`enable_lsq` was called."""
        lsq = self._lsq()
        if lsq is not None:
            return lsq.row_steps(self.weight).detach()
        w = self.weight.detach()
        absmax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
        return symmetric_scale(absmax, self.weight_bits)

    def _lsq(self):
        return self._modules.get("weight_lsq")

    def enable_lsq(self, granularity: str = "channel", num_heads: int | None = None) -> None:
        """Learn the weight steps (LSQ, :class:`mnq_search.vvtq.LsqQuantizer`) at ``granularity``
        (``"channel"``, ``"head"`` with ``num_heads`` for a fused qkv weight, or ``"tensor"``),
        starting from today's absmax scales (a group's step is its widest row's). The steps stay
        in the module (``weight_lsq.step``) and give the integer path its per-row scales."""
        from ..vvtq._lsq import LsqQuantizer

        s_row = self.weight_scale()
        lsq = LsqQuantizer(self.weight_bits, granularity, channels=self.weight.shape[0], num_heads=num_heads)
        lsq = lsq.to(self.weight.device)
        step = s_row if granularity == "channel" else (s_row.max() if granularity == "tensor"
                                                       else s_row.view(lsq.num_steps, -1).amax(dim=1))
        lsq.set_step(step)
        self.weight_lsq = lsq

    def quant_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued float weights with STE, per-channel scale).

        Outside training and autograd the result is cached until the weights change (their
        version counter moves), so evaluation does not quantize the weights at every batch."""
        w = self.weight
        lsq = self._lsq()
        if lsq is not None and self.training and torch.is_grad_enabled() and lsq.step.requires_grad:
            x_hat, s = lsq.fake_quant_parts(w)  # LSQ's gradients for the weights and the steps
            ratio = x_hat / s
            return ratio + (torch.round(ratio) - ratio).detach(), s.reshape(-1)
        cacheable = not self.training and not (torch.is_grad_enabled() and w.requires_grad)
        key = (w._version, w.data_ptr(), w.device, w.dtype, self.weight_bits,
               None if lsq is None else lsq.step._version)
        cache = getattr(self, "_wq_cache", None)
        if cacheable and cache is not None and cache[0] == key:
            return cache[1], cache[2]
        s_w = self.weight_scale()
        shape = (-1,) + (1,) * (w.dim() - 1)
        qmin, qmax = qrange(self.weight_bits)
        w_int = quantize_ste(w, s_w.view(shape), qmin, qmax)
        if cacheable:
            with torch.inference_mode(False), torch.no_grad():
                self._wq_cache = (key, w_int.detach().clone(), s_w.clone())
        else:
            self._wq_cache = None
        return w_int, s_w

    def bias_int(self, s_acc: torch.Tensor) -> torch.Tensor | None:
        """The int32 bias at the accumulator scale (rounded in float64, saturated to int32)."""
        if self.bias is None:
            return None
        b = round_ste(self.bias.double() / s_acc.double())
        return torch.clamp(b, -(2**31), 2**31 - 1)


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """nn.Linear with per-channel ``weight_bits`` weights and an int32 bias.

    forward(x, s_x) -> (y, s_y): with ``s_x=None`` (quantization off) it is the float Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_bits = weight_bits

    @classmethod
    def from_float(cls, mod: nn.Linear, weight_bits: int) -> "QuantLinear":
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, weight_bits,
                device=mod.weight.device, dtype=mod.weight.dtype)
        q.load_state_dict(mod.state_dict())
        return q

    def forward(self, x: torch.Tensor, s_x: torch.Tensor | None = None):
        if s_x is None:
            return F.linear(x, self.weight, self.bias), None
        return self.forward_q(to_grid(x, s_x), s_x)

    def forward_q(self, q_x: torch.Tensor, s_x: torch.Tensor):
        """Like forward, from the integers ``q_x`` (integer-valued float tensor) of the input."""
        w_int, s_w = self.quant_weight()
        s_acc = s_x * s_w
        acc = _IntGemmSTE.apply(q_x, w_int) if _int_gemm_ok(q_x) else F.linear(q_x, w_int).float()
        b = self.bias_int(s_acc)
        if not (torch.is_grad_enabled() and acc.requires_grad):
            if bias_scale_cpu(acc, b, s_acc) is not None:
                return acc, s_acc
        if b is not None:
            acc = acc + b.float()
        return acc * s_acc, s_acc

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight integers as int8, transposed to (in, out) for the GEMM, per-channel scale);
        cached with :meth:`quant_weight`'s cache."""
        w_int, s_w = self.quant_weight()
        cache = getattr(self, "_w8_cache", None)
        if cache is not None and cache[0] is w_int:
            return cache[1], s_w
        w8t = w_int.detach().to(torch.int8).t().contiguous()
        self._w8_cache = (w_int, w8t)
        return w8t, s_w

    @torch.no_grad()
    def forward_int8(self, q8: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward_q` without gradients, from int8 input integers: int8 x int8 GEMM with
        exact int32 accumulators (``torch._int_mm``; CPU). The accumulator equals the float-held
        path's wherever that one is exact (every partial sum below 2**24: K * 2**14 < 2**24, K <= 1024)."""
        w8t, s_w = self.int8_weight()
        s_acc = s_x * s_w
        return int_linear_cpu(q8, w8t, self.bias_int(s_acc), s_acc), s_acc

    @torch.no_grad()
    def forward_int(self, q_x: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_int, s_w = self.quant_weight()
        s_acc = s_x * s_w
        acc = int_matmul(q_x, w_int.long().t())
        b = self.bias_int(s_acc)
        if b is not None:
            acc = acc + b.long()
        return check_range(acc, "linear accumulator"), s_acc

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}"


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    """nn.Conv2d with per-output-channel ``weight_bits`` weights and an int32 bias (patch embedding)."""

    def __init__(self, *args, weight_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_bits = weight_bits

    @classmethod
    def from_float(cls, mod: nn.Conv2d, weight_bits: int) -> "QuantConv2d":
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None, padding_mode=mod.padding_mode,
                weight_bits=weight_bits, device=mod.weight.device, dtype=mod.weight.dtype)
        q.load_state_dict(mod.state_dict())
        return q

    def forward(self, x: torch.Tensor, s_x: torch.Tensor | None = None):
        if s_x is None:
            return self._conv_forward(x, self.weight, self.bias), None
        return self.forward_q(to_grid(x, s_x), s_x)

    def forward_q(self, q_x: torch.Tensor, s_x: torch.Tensor):
        """Like forward, from the integers ``q_x`` (integer-valued float tensor) of the input."""
        w_int, s_w = self.quant_weight()
        s_acc = s_x * s_w
        acc = self._conv_forward(q_x, w_int, None).float()
        b = self.bias_int(s_acc)
        if b is not None:
            acc = acc + b.float().view(1, -1, 1, 1)
        return acc * s_acc.view(1, -1, 1, 1), s_acc

    @torch.no_grad()
    def forward_int(self, q_x: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # convolution as an exact float64 product of integers (no int64 conv kernel in PyTorch)
        w_int, s_w = self.quant_weight()
        s_acc = s_x * s_w
        acc = self._conv_forward(q_x.double(), w_int.double(), None).round().long()
        b = self.bias_int(s_acc)
        if b is not None:
            acc = acc + b.long().view(1, -1, 1, 1)
        return check_range(acc, "conv accumulator"), s_acc


class QuantMatMul(nn.Module):
    """Product of two quantized activations (q @ k^T, attn @ v): integer product, scale s_a * s_b."""

    def forward(self, a: torch.Tensor, s_a: torch.Tensor | None, b: torch.Tensor, s_b: torch.Tensor | None):
        if s_a is None or s_b is None:
            return a @ b, None
        return self.forward_q(to_grid(a, s_a), s_a, to_grid(b, s_b), s_b)

    def forward_q(self, qa: torch.Tensor, s_a: torch.Tensor, qb: torch.Tensor, s_b: torch.Tensor):
        """Like forward, from the integers of both operands (integer-valued float tensors)."""
        return (qa @ qb) * (s_a * s_b), s_a * s_b

    @torch.no_grad()
    def forward_int(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        return check_range(int_matmul(qa, qb), "matmul accumulator")
