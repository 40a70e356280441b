"""Layer importance by Layer-wise Relevance Propagation (LRP) for a timm ``VisionTransformer``.

Mix-QViT (Ranjan & Savakis, 2025) ranks layers by how much of the classification they carry,
measured with LRP. The propagation rules here are the conservative transformer rules of Ali et
al. (ICML 2022, "XAI for Transformers: Better Explanations through Conservative Propagation"),
implemented as *gradient x input* on a copy of the model whose forward is modified so that its
gradient realises the rules:

- LayerNorm (LN-rule): ``y = gamma * (x - mean(x)) / sigma + beta`` with ``sigma`` detached, so
  the layer is the linear centering map scaled by a constant;
- attention (AH-rule): ``out = A @ v`` with the softmax weights ``A`` detached, so relevance
  reaches the values only (queries and keys receive none);
- GELU (and other gates ``act(x) = x * s(x)``): ``y = x * s(x)`` with the gate ``s`` detached, so
  relevance passes through unchanged;
- Linear / Conv2d: the epsilon rule ``R_i = sum_j x_i w_ji R_j / (z_j + eps * sign(z_j))``,
  realised by scaling the gradient at ``z`` by the detached factor ``z / (z + eps * sign(z))``
  (``eps = 0`` is LRP-0 on these layers; ``z + eps`` takes ``eps`` with the sign of ``z``, + at 0);
- residual sums, pooling, reshapes, LayerScale: linear, conservative as they are.

With these rules the modified network is affine in its input (every detached factor frozen), so
gradient x input splits the target logit exactly: the relevance of the pixels, of the additive
embeddings (cls / register tokens and position embedding) and what every layer *absorbs*
(Linear/Conv bias and epsilon share, LayerNorm beta) sum to the logit. Within one layer,
``sum(R_in) + absorbed == sum(R_out)`` (see :class:`LayerRelevance`).

Layer importance (:func:`layer_relevance`) is measured at the input of each weight layer
(every ``nn.Linear`` and the patch-embedding ``nn.Conv2d``): ``A_l(n) = sum_i |R_i(n)|`` over all
elements ``i`` of the layer's input (tokens x features, or pixels) for image ``n``, i.e. the
relevance the layer's weights pass on to the network below (its bias and the epsilon stabiliser
keep the rest). Each image's ``A(n)`` is normalised to sum to 1 over the weight layers, then the
shares are averaged over images.

Example:
    >>> import timm, torch
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
    ...                         num_classes=10, embed_dim=32, depth=2, num_heads=2)
    >>> shares = layer_relevance(vit, [torch.randn(4, 1, 28, 28)])
    >>> round(sum(shares.values()), 6)
    1.0
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from mnq_search.errors import UsageError

WEIGHT_KINDS = ("linear", "conv")
_GATE_NAMES = {"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "ReLU"}
_PASS_NAMES = {"Identity", "Dropout", "DropPath", "PatchDropout", "LayerScale"}
_CONTAINER_NAMES = {"Sequential", "ModuleList", "Mlp", "PatchEmbed"}


@dataclass
class LayerRelevance:
    """Relevance at one module, per image (tensors of shape ``(batch,)``).

    Attributes:
        kind: ``"linear"``, ``"conv"``, ``"layernorm"``, ``"activation"`` (GELU and other gated
            activations) or ``"attention"`` (the
            ``A @ v`` product of an attention module: input ``v``, output the per-head context).
        r_in: summed relevance at the module's input (only what flows through this module).
        r_out: summed relevance at its output (everything arriving there).
        abs_in: summed absolute relevance at its input (the importance measure of weight layers).
        absorbed: relevance kept by the module's constant terms: Linear/Conv bias and epsilon
            share, LayerNorm beta, the rounding of a detached gate; 0 for attention.
            ``r_in + absorbed == r_out`` up to floating-point rounding.
    """

    kind: str
    r_in: torch.Tensor
    r_out: torch.Tensor
    abs_in: torch.Tensor
    absorbed: torch.Tensor


@dataclass
class LRPTrace:
    """One LRP pass over a batch.

    Attributes:
        target: the explained class of every image, ``(batch,)``.
        logit: the target logit of every image, ``(batch,)``; the relevance to distribute.
        pixels: the relevance of every input pixel, same shape as the input.
        embeddings: relevance of the additive embeddings (cls / register tokens, position
            embedding) per image, ``(batch,)``.
        layers: module path -> :class:`LayerRelevance`, in forward order.
    """

    target: torch.Tensor
    logit: torch.Tensor
    pixels: torch.Tensor
    embeddings: torch.Tensor
    layers: dict[str, LayerRelevance] = field(default_factory=dict)

    def absorbed(self) -> torch.Tensor:
        """Relevance absorbed by all modules, per image."""
        return sum((lr.absorbed for lr in self.layers.values()), torch.zeros_like(self.logit))


class _Recorder:
    """Collects, during one forward, each module's input tap, output and constant part."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def tap(self, x: torch.Tensor) -> torch.Tensor:
        """A private copy of ``x``: its gradient is the part that flows through one consumer only."""
        return x.clone()

    def add(self, name: str, kind: str, x_in: torch.Tensor, y: torch.Tensor, const: torch.Tensor | None) -> None:
        self.records.append((name, kind, x_in, y, None if const is None else const.detach()))


def _eps_stabilise(z: torch.Tensor, bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output equal to ``z`` whose gradient is scaled by ``z / (z + eps sign z)``, its constant part).

    The constant part is what the epsilon rule does not pass to the input: ``c * b + (1 - c) * z``.
    """
    b = torch.zeros_like(z) if bias is None else bias.expand_as(z)
    if eps == 0:
        return z, b
    stab = torch.where(z >= 0, torch.full_like(z, eps), torch.full_like(z, -eps))
    c = (z / (z + stab)).detach()
    y = z * c + (z * (1 - c)).detach()
    return y, c * b + (1 - c) * z.detach()


class _EpsLinear(nn.Module):
    def __init__(self, name: str, layer: nn.Linear, eps: float, rec: _Recorder):
        super().__init__()
        self.layer, self.name, self.eps, self.rec = layer, name, eps, rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rec.tap(x)
        z = F.linear(x_in, self.layer.weight, self.layer.bias)
        y, const = _eps_stabilise(z, self.layer.bias, self.eps)
        self.rec.add(self.name, "linear", x_in, y, const)
        return y


class _EpsConv2d(nn.Module):
    def __init__(self, name: str, layer: nn.Conv2d, eps: float, rec: _Recorder):
        super().__init__()
        self.layer, self.name, self.eps, self.rec = layer, name, eps, rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rec.tap(x)
        z = self.layer._conv_forward(x_in, self.layer.weight, self.layer.bias)
        bias = None if self.layer.bias is None else self.layer.bias.view(1, -1, 1, 1)
        y, const = _eps_stabilise(z, bias, self.eps)
        self.rec.add(self.name, "conv", x_in, y, const)
        return y


class _LNLayerNorm(nn.Module):
    """LayerNorm with the normalisation factor detached (LN-rule)."""

    def __init__(self, name: str, layer: nn.LayerNorm, rec: _Recorder):
        super().__init__()
        if len(layer.normalized_shape) != 1:
            raise UsageError(f"{name}: LayerNorm over {tuple(layer.normalized_shape)} has no LRP rule here "
                             "(only the last dimension)")
        self.layer, self.name, self.rec = layer, name, rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rec.tap(x)
        centred = x_in - x_in.mean(dim=-1, keepdim=True)
        sigma = (centred.detach().pow(2).mean(dim=-1, keepdim=True) + self.layer.eps).sqrt()
        y = centred / sigma
        if self.layer.weight is not None:
            y = y * self.layer.weight
        const = None
        if self.layer.bias is not None:
            y = y + self.layer.bias
            const = self.layer.bias.expand_as(y)
        self.rec.add(self.name, "layernorm", x_in, y, const)
        return y


class _GatedAct(nn.Module):
    """``act(x) = x * s(x)`` with the gate ``s`` detached: relevance passes through unchanged."""

    def __init__(self, name: str, act: nn.Module, rec: _Recorder):
        super().__init__()
        self.act, self.name, self.rec = act, name, rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rec.tap(x)
        xd = x_in.detach()
        a = self.act(xd)
        gate = torch.where(xd != 0, a / torch.where(xd != 0, xd, torch.ones_like(xd)), torch.zeros_like(xd))
        const = a - xd * gate  # the gate's rounding only: keeps the forward value exact
        y = x_in * gate + const
        self.rec.add(self.name, "activation", x_in, y, const)
        return y


class _AHAttention(nn.Module):
    """timm ``Attention`` with the softmax weights detached (AH-rule); same child modules."""

    def __init__(self, name: str, attn: Attention, rec: _Recorder):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise UsageError(f"{name}: gated attention has no LRP rule here")
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.norm, self.proj = getattr(attn, "norm", nn.Identity()), attn.proj
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.head_dim = getattr(attn, "head_dim", None)
        self.name, self.rec = name, rec

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UsageError(f"{self.name}: masked attention has no LRP rule here")
        b, n, _ = x.shape
        qkv = self.qkv(x)
        head_dim = self.head_dim or qkv.shape[-1] // (3 * self.num_heads)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach()
        v_in = self.rec.tap(v)
        ctx = weights @ v_in
        self.rec.add(self.name, "attention", v_in, ctx, None)
        out = ctx.transpose(1, 2).reshape(b, n, self.num_heads * head_dim)
        return self.proj(self.norm(out))


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _check_vit(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UsageError(f"LRP needs a float timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise UsageError("LRP: attention-pool heads (global_pool='map') have no rule here")


class _LRPModel:
    """A modified copy of a ViT whose gradient x input is LRP, with the taps to read it."""

    def __init__(self, model: nn.Module, eps: float):
        _check_vit(model)
        if eps < 0:
            raise UsageError(f"LRP epsilon must be >= 0, got {eps}")
        self.rec = _Recorder()
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        for path, mod in list(net.named_modules()):
            if isinstance(mod, Attention):
                if type(mod) is not Attention:
                    raise UsageError(f"{path}: {type(mod).__name__} has no LRP rule here")
                _set_submodule(net, path, _AHAttention(path, mod, self.rec))
        for path, mod in list(net.named_modules()):
            if isinstance(mod, (_EpsLinear, _EpsConv2d, _LNLayerNorm, _GatedAct)) or not path:
                continue
            if isinstance(mod, nn.Linear):
                _set_submodule(net, path, _EpsLinear(path, mod, eps, self.rec))
            elif isinstance(mod, nn.Conv2d):
                _set_submodule(net, path, _EpsConv2d(path, mod, eps, self.rec))
            elif isinstance(mod, nn.LayerNorm):
                _set_submodule(net, path, _LNLayerNorm(path, mod, self.rec))
            elif type(mod).__name__ in _GATE_NAMES or isinstance(mod, (nn.GELU, nn.SiLU, nn.ReLU)):
                _set_submodule(net, path, _GatedAct(path, mod, self.rec))
        self._check_supported(net)
        self.net = net
        self._taps: dict[str, torch.Tensor] = {}
        net.patch_embed.register_forward_hook(self._tap_hook("tokens"))
        net.norm_pre.register_forward_pre_hook(self._tap_pre_hook("stream"))

    @staticmethod
    def _check_supported(net: nn.Module) -> None:
        mine = (_EpsLinear, _EpsConv2d, _LNLayerNorm, _GatedAct, _AHAttention)
        for path, mod in net.named_modules():
            if not path or isinstance(mod, mine) or isinstance(mod, (Block, VisionTransformer)):
                continue
            if any(isinstance(parent, mine) for parent in _parents(net, path)):
                continue
            name = type(mod).__name__
            if name in _PASS_NAMES or name in _CONTAINER_NAMES:
                continue
            raise UsageError(f"{path}: {name} has no LRP rule here")

    def _tap_hook(self, key: str):
        def hook(_mod, _inp, out):
            out = out.clone()
            self._taps[key] = out
            return out
        return hook

    def _tap_pre_hook(self, key: str):
        def hook(_mod, inp):
            x = inp[0].clone()
            self._taps[key] = x
            return (x,) + tuple(inp[1:])
        return hook

    def run(self, x: torch.Tensor, target: str | int | torch.Tensor, labels: torch.Tensor | None) -> LRPTrace:
        """One LRP pass over the batch ``x``."""
        dtype = next(self.net.parameters()).dtype
        self.rec.records.clear()
        self._taps.clear()
        x = x.detach().to(dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = self.net(x)
            tgt = _resolve_target(target, logits, labels)
            chosen = logits.gather(1, tgt.view(-1, 1)).squeeze(1)
            recs = self.rec.records
            wrt = [r[2] for r in recs] + [r[3] for r in recs] + [self._taps["tokens"], self._taps["stream"]]
            grads = torch.autograd.grad(chosen.sum(), wrt, allow_unused=True)
        n = len(recs)
        g_in, g_out, (g_tok, g_stream) = grads[:n], grads[n:2 * n], grads[2 * n:]

        def per_image(t: torch.Tensor) -> torch.Tensor:
            return t.detach().reshape(t.shape[0], -1).sum(dim=1)

        layers: dict[str, LayerRelevance] = {}
        pixels = None
        for (name, kind, x_in, y, const), gi, go in zip(recs, g_in, g_out):
            gi = torch.zeros_like(x_in) if gi is None else gi
            go = torch.zeros_like(y) if go is None else go
            r_in = x_in.detach() * gi
            if kind == "conv" and pixels is None:
                pixels = r_in
            absorbed = per_image(go * const) if const is not None else torch.zeros_like(chosen.detach())
            layers[name] = LayerRelevance(kind, per_image(r_in), per_image(y.detach() * go),
                                          per_image(r_in.abs()), absorbed)
        g_tok = torch.zeros_like(self._taps["tokens"]) if g_tok is None else g_tok
        g_stream = torch.zeros_like(self._taps["stream"]) if g_stream is None else g_stream
        stream, tokens = self._taps["stream"].detach(), self._taps["tokens"].detach()
        embeddings = per_image(stream * g_stream) - per_image(tokens * g_tok)
        if pixels is None:
            pixels = x.detach() * torch.zeros_like(x)
        return LRPTrace(tgt, chosen.detach(), pixels.detach(), embeddings, layers)


def _parents(root: nn.Module, path: str) -> list[nn.Module]:
    parts = path.split(".")
    return [root.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _resolve_target(target: str | int | torch.Tensor, logits: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
    n, classes = logits.shape
    if isinstance(target, str):
        if target == "pred":
            return logits.detach().argmax(dim=1)
        if target == "label":
            if labels is None:
                raise UsageError("LRP target 'label' needs (images, labels) batches")
            return labels.to(logits.device).long().view(-1)
        raise UsageError(f"unknown LRP target {target!r}; use 'pred', 'label' or a class index")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise UsageError(f"LRP target class {target} is outside 0..{classes - 1}")
        return torch.full((n,), target, dtype=torch.long, device=logits.device)
    tgt = torch.as_tensor(target, device=logits.device).long().view(-1)
    if tgt.numel() != n:
        raise UsageError(f"LRP target has {tgt.numel()} classes for {n} images")
    return tgt


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise UsageError(f"a batch must be an image tensor or an (images, labels) pair, got {type(batch).__name__}")


def lrp_trace(model: nn.Module, x: torch.Tensor, target: str | int | torch.Tensor = "pred",
              eps: float = 1e-6, labels: torch.Tensor | None = None) -> LRPTrace:
    """Explain one batch with conservative transformer LRP (the model itself is not modified).

    Args:
        model: a float timm ``VisionTransformer``.
        x: images ``(batch, channels, height, width)``.
        target: ``"pred"`` (the predicted class), ``"label"`` (needs ``labels``), a class index,
            or one class per image.
        eps: the epsilon of the Linear/Conv rule (0: LRP-0).
        labels: the true classes, for ``target="label"``.

    Returns:
        The :class:`LRPTrace` with every module's relevance.
    """
    return _LRPModel(model, eps).run(x, target, labels)


def layer_relevance(model: nn.Module, batches: Iterable, target: str | int = "pred",
                    eps: float = 1e-6) -> dict[str, float]:
    """Share of the relevance that flows through each weight layer (Mix-QViT's layer importance).

    For image ``n`` and weight layer ``l`` (every ``nn.Linear``: qkv, proj, fc1, fc2, head; the
    patch-embedding ``nn.Conv2d``), ``A_l(n)`` is the sum of ``|R|`` over every element of the
    layer's input. Each image's values are divided by their sum over the layers, then averaged
    over the images: the result sums to 1.

    Args:
        model: a float timm ``VisionTransformer``.
        batches: image tensors or ``(images, labels)`` pairs.
        target: ``"pred"``, ``"label"`` or a class index (see :func:`lrp_trace`).
        eps: the epsilon of the Linear/Conv rule.

    Returns:
        Layer path -> share in [0, 1], in forward order.
    """
    lrp = _LRPModel(model, eps)
    total: dict[str, float] = {}
    images = 0
    for batch in batches:
        x, labels = _split_batch(batch)
        trace = lrp.run(x, target, labels)
        weight = {k: v.abs_in.double() for k, v in trace.layers.items() if v.kind in WEIGHT_KINDS}
        per_image = torch.stack(list(weight.values())).sum(dim=0)
        keep = per_image > 0
        for name, a in weight.items():
            total[name] = total.get(name, 0.0) + float((a[keep] / per_image[keep]).sum())
        images += int(keep.sum())
    if images == 0:
        raise UsageError("LRP found no relevance: no batches, or every image explains to 0")
    return {name: value / images for name, value in total.items()}
