"""Seeded, realistic inputs for the non-linear methods, shared by the tests and the benchmarks.

Each generator returns ``(x, s_x)``: ``x`` on the per-tensor grid of ``s_x`` at the method's
input width, drawn the way ViT activations look:

- softmax: attention logits (rows of N tokens) with a few strong peaks per row;
- gelu: FC1 outputs, mostly around -0.5 with a long Laplace tail;
- layernorm: residual-stream tokens with a handful of outlier channels 20-50x larger than the
  rest, quantized to 16 bits.

Also :func:`sqnr_db`, the signal-to-quantization-noise ratio used throughout the tests.
"""

from __future__ import annotations

import torch


def quantize_symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``x`` on a symmetric ``bits``-bit grid with an absmax scale; returns (x_q, scale)."""
    s = x.abs().max().clamp(min=1e-8) / (2 ** (bits - 1) - 1)
    q = torch.clamp(torch.floor(x / s + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * s, s


def attention_logits(batch: int = 2, heads: int = 3, tokens: int = 197, bits: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, tokens, generator=g) * 1.5
    peaks = torch.randint(0, tokens, (batch, heads, tokens, 3), generator=g)
    height = 4.0 + 6.0 * torch.rand(batch, heads, tokens, 3, generator=g)
    x.scatter_add_(-1, peaks, height)
    return quantize_symmetric(x, bits)


def gelu_inputs(batch: int = 2, tokens: int = 197, channels: int = 768, bits: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g) - 0.5
    tail = torch.rand(batch, tokens, channels, generator=g) < 0.05
    lap = torch.distributions.Laplace(0.0, 3.0).sample((batch, tokens, channels))  # global RNG: reseeded below
    x = torch.where(tail, lap, x)
    return quantize_symmetric(x, bits)


def layernorm_inputs(batch: int = 2, tokens: int = 197, channels: int = 192, outliers: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g) + 0.3 * torch.randn(channels, generator=g)
    idx = torch.randperm(channels, generator=g)[:outliers]
    factor = 20.0 + 30.0 * torch.rand(outliers, generator=g)
    x[..., idx] = x[..., idx] * factor + factor
    return quantize_symmetric(x, 16)


def affine_layernorm(channels: int = 192, seed: int = 0) -> torch.nn.LayerNorm:
    """A LayerNorm with trained-looking affine parameters (gamma ~ 1 +- 0.3, beta ~ 0 +- 0.3)."""
    g = torch.Generator().manual_seed(seed)
    ln = torch.nn.LayerNorm(channels, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.3 * torch.randn(channels, generator=g))
        ln.bias.copy_(0.3 * torch.randn(channels, generator=g))
    return ln


def realistic_input(op: str, bits: int = 8, seed: int = 0, **shape):
    """``(x, s_x)`` for ``op`` at the input width a converted model gives it (16 bits for LayerNorm)."""
    torch.manual_seed(seed)
    if op == "softmax":
        return attention_logits(bits=bits, seed=seed, **shape)
    if op == "gelu":
        return gelu_inputs(bits=bits, seed=seed, **shape)
    if op == "layernorm":
        return layernorm_inputs(seed=seed, **shape)
    raise ValueError(f"unknown op {op!r}")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(sum ref**2 / sum (ref - approx)**2), in dB (inf when equal)."""
    ref, approx = ref.double(), approx.double()
    noise = ((ref - approx) ** 2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10((ref**2).sum() / noise))


def method_sqnr(op: str, method: str, bits: int, seed: int = 0, fine_grid: bool = False) -> tuple[float, float]:
    """(SQNR in dB of ``method`` against the exact float op on the same quantized realistic input,
    the input scale); LayerNorm methods are calibrated on the input first."""
    from .methods import make_nonlinear

    x, s = realistic_input(op, bits, seed)
    mod = make_nonlinear(op, method, bits, affine_layernorm(x.shape[-1]) if op == "layernorm" else None,
                         fine_grid=fine_grid)
    mod.train()
    with torch.no_grad():
        mod(x, s)
    mod.eval()
    with torch.no_grad():
        y, _ = mod(x, s)
        return sqnr_db(mod.float_op(x, *mod.grad_params()), y), float(s)


def fresh_kl(qmodel, float_model, calib, val, setup) -> tuple[float, "torch.Tensor"]:
    """The reference the incremental evaluator's tests compare with: a fresh copy of ``qmodel``,
    changed by ``setup(copy)``, calibrated on the image batches ``calib``; returns (mean KL(float ||
    quantized) per image over the batch ``val``, its quantized logits)."""
    import copy

    import torch.nn.functional as F

    from .calibrate import calibrate

    fresh = copy.deepcopy(qmodel)
    setup(fresh)
    calibrate(fresh, [(x, None) for x in calib])
    with torch.inference_mode():
        logits = fresh(val)
        ref = F.log_softmax(float_model(val).double(), -1)
    kl = float(F.kl_div(F.log_softmax(logits.double(), -1), ref, reduction="sum", log_target=True)) / val.shape[0]
    return kl, logits
