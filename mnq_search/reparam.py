"""Clipped channel-wise quantization of post-LayerNorm activations, folded into a per-tensor quantizer
(Mix-QViT's post-LayerNorm PTQ, with RepQ-ViT's scale reparameterisation).

The inputs of ``qkv`` and ``fc1`` are LayerNorm outputs whose channels span very different ranges,
so one per-tensor scale wastes most of the grid on a few wide channels. Per channel ``c`` this module

1. chooses a clipping range ``[lo_c, hi_c]`` on calibration tokens: the tail fraction ``t`` in
   :data:`TAILS` (``lo = quantile(t)``, ``hi = quantile(1 - t)``) whose centred ``bits``-bit grid
   (centre ``m_c = (lo + hi) / 2``, half range ``h_c = (hi - lo) / 2``, step ``h_c / (2**(b-1) - 1)``)
   gives the channel the smallest mean squared quantization error;
2. maps every channel onto one common range ``[-h, h]`` (``h`` = the mean of ``h_c``) with
   ``x' = (x - m) / r``, ``r_c = h_c / h``, folded into the float model: the LayerNorm affine becomes
   ``gamma / r`` and ``(beta - m) / r``; the next linear ``W diag(r)`` and ``b + W m``. The float model
   computes the same function (checked on the calibration images);
3. gives the linear's per-tensor input quantizer the range ``h`` (:meth:`ActQuant.set_cap`), so each
   channel is quantized on the grid its clipped range chose, with one scale: the integer path is
   that of any per-tensor input (no per-channel rescaling at run time).

The price is on the weight side: the columns of ``W`` are scaled by ``r`` before the per-row weight
quantization, as in RepQ-ViT. Supported: ViT/DeiT blocks and Swin blocks whose resolution needs no
window padding (padding would feed zeros that no longer mean zero).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

TAILS = (0.0, 1e-4, 1e-3, 1e-2)  # candidate clipped fraction at each end of a channel's distribution
MAX_ROWS = 16384  # calibration tokens kept per LayerNorm (a deterministic sample)
MIN_RATIO = 1e-3  # r_c floor (constant channels)


@dataclass
class PostLNPair:
    """A LayerNorm and the one linear that reads its output (module paths in the float model)."""

    norm: str
    linear: str


def post_ln_pairs(model: nn.Module) -> list[PostLNPair]:
    """``(norm1, attn.qkv)`` and ``(norm2, mlp.fc1)`` of every transformer block that has them with
    affine LayerNorms and plain linears (and, for Swin blocks, no window padding)."""
    pairs = []
    for path, block in model.named_modules():
        if not _unpadded(block):
            continue
        for norm, lin in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            n = getattr(block, norm, None)
            try:
                linear = block.get_submodule(lin)
            except AttributeError:
                continue
            if (isinstance(n, nn.LayerNorm) and n.elementwise_affine and type(linear) is nn.Linear
                    and linear.in_features == n.normalized_shape[-1]):
                prefix = f"{path}." if path else ""
                pairs.append(PostLNPair(prefix + norm, prefix + lin))
    return pairs


def _unpadded(block: nn.Module) -> bool:
    res, ws = getattr(block, "input_resolution", None), getattr(block, "window_size", None)
    if res is None or ws is None:
        return True
    ws = (ws, ws) if isinstance(ws, int) else tuple(ws)
    return res[0] % ws[0] == 0 and res[1] % ws[1] == 0


@torch.no_grad()
def collect_outputs(model: nn.Module, batches: Iterable, norms: list[str], max_rows: int = MAX_ROWS
                    ) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` output tokens ``[rows, C]`` of each named LayerNorm on ``batches`` (a fixed
    random sample of all tokens seen, the same for the same data)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in norms}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: seen[n].append(out.detach().reshape(-1, out.shape[-1]).float().cpu()))
        for n in norms]
    try:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        for x, *_ in batches:
            model(x.to(device))
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n, parts in seen.items():
        rows = torch.cat(parts)
        if rows.shape[0] > max_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        out[n] = rows
    return out


def clip_ranges(x: torch.Tensor, bits: int, tails: Iterable[float] = TAILS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (columns of ``x``): the centre ``m`` and half range ``h`` of the clipping range in
    ``tails`` with the least mean squared error of the centred ``bits``-bit grid."""
    qmax = 2 ** (bits - 1) - 1
    x = x.double()
    best_err = best_m = best_h = None
    for t in tails:
        lo, hi = (torch.quantile(x, q, dim=0) for q in (t, 1.0 - t)) if t > 0 else (x.amin(0), x.amax(0))
        m, h = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(1e-12)
        s = h / qmax
        q = torch.clamp(torch.floor((x - m) / s + 0.5), -qmax - 1, qmax) * s + m
        err = ((q - x) ** 2).mean(0)
        if best_err is None:
            best_err, best_m, best_h = err, m, h
        else:
            take = err < best_err
            best_err, best_m, best_h = (torch.where(take, err, best_err), torch.where(take, m, best_m),
                                        torch.where(take, h, best_h))
    return best_m.float(), best_h.float()


@dataclass
class Reparam:
    """What :func:`reparam_post_ln` did: per linear path, the common half range (its input cap), and
    per channel the centre and the ratio ``r``."""

    caps: dict[str, float]
    centres: dict[str, torch.Tensor]
    ratios: dict[str, torch.Tensor]


@torch.no_grad()
def reparam_post_ln(model: nn.Module, batches: list, bits: int, tails: Iterable[float] = TAILS,
                    rtol: float = 1e-3) -> tuple[nn.Module, Reparam]:
    """A copy of the float ``model`` with every post-LayerNorm pair reparameterised (see the module
    docstring) for ``bits``-bit inputs, and the caps to give the converted model
    (:func:`apply_caps`). One-line error when the model has no supported pair."""
    pairs = post_ln_pairs(model)
    if not pairs:
        raise UsageError("--post-ln channel: this model has no LayerNorm -> linear pair it can fold "
                         "(ViT/DeiT blocks, or Swin blocks without window padding)")
    new = copy.deepcopy(model)
    outputs = collect_outputs(model, batches, [p.norm for p in pairs])
    rec = Reparam({}, {}, {})
    for p in pairs:
        m, h = clip_ranges(outputs[p.norm], bits, tails)
        target = float(h.mean())
        r = (h / target).clamp_min(MIN_RATIO)
        norm, lin = new.get_submodule(p.norm), new.get_submodule(p.linear)
        dev = lin.weight.device
        m, r = m.to(dev), r.to(dev)
        w = lin.weight.clone()
        shift = w.double() @ m.double()
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=dev, dtype=lin.weight.dtype))
        lin.bias.add_(shift.to(lin.bias.dtype))
        lin.weight.mul_(r[None, :])
        norm.bias.sub_(m).div_(r)
        norm.weight.div_(r)
        rec.caps[p.linear], rec.centres[p.linear], rec.ratios[p.linear] = target, m.cpu(), r.cpu()
    _check_same_function(model, new, batches[:1], rtol)
    return new, rec


def _check_same_function(old: nn.Module, new: nn.Module, batches: list, rtol: float) -> None:
    device = next(old.parameters()).device
    for x, *_ in batches:
        a, b = old.eval()(x.to(device)), new.eval()(x.to(device))
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        if err > rtol:
            raise RuntimeError(f"post-LayerNorm reparameterisation changed the float model's outputs "
                               f"(relative error {err:.2g}); this architecture is not supported")


def apply_caps(qmodel, caps: dict[str, float]) -> None:
    """Give each named linear's per-tensor input quantizer its clipping range."""
    root = getattr(qmodel, "model", qmodel)
    for path, cap in caps.items():
        layer = root.get_submodule(path)
        if not hasattr(layer, "q_in"):
            raise RuntimeError(f"{path} is not an input-quantized linear in the converted model")
        layer.q_in.set_cap(cap)
