"""Rounding to an integer grid with the straight-through estimator (paper Eq. 1 and 2), and the
bit-widths the project supports.

``I = clamp(round_half_up(R / S), -2**(b-1), 2**(b-1) - 1)``; the backward pass lets the gradient
through where ``R / S`` lies inside the clamp range and stops it outside (Eq. 2). Rounding is
half-up, the rule the dyadic requantizer uses too. On the CPU the forward (and the quantizer's
backward) run as one compiled pass that computes the same float32 numbers as the eager ops.
"""

from __future__ import annotations

import torch

from ._compiled import quantize_cpu, quantize_mask_cpu, ste_backward_cpu

BITS_RANGE = (4, 8)  # bit-widths the project supports for weights and activations ("--bits")


def check_bits(bits: int, what: str = "bits") -> int:
    lo, hi = BITS_RANGE
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class _RoundClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, qmin, qmax):
        r = torch.floor(v + 0.5)
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return torch.clamp(r, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


class _QuantizeSTE(torch.autograd.Function):
    """:class:`_RoundClampSTE` applied to ``x / scale`` (constant scale), forward in one fused pass;
    the gradient is the same: ``g * inside / scale``."""

    @staticmethod
    def forward(ctx, x, scale, q, inside):
        ctx.save_for_backward(inside, scale)
        return q

    @staticmethod
    def backward(ctx, g):
        inside, scale = ctx.saved_tensors
        fused = ste_backward_cpu(g, inside, scale)
        return (g * inside) / scale if fused is None else fused, None, None, None


def quantize_ste(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer-valued ``clamp(round_half_up(x / scale))`` with the STE of Eq. 2 (float tensor)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        if not scale.requires_grad:
            fused = quantize_mask_cpu(x, scale, qmin, qmax)
            if fused is not None:
                return _QuantizeSTE.apply(x, scale, *fused)
        return _RoundClampSTE.apply(x / scale, qmin, qmax)
    fused = quantize_cpu(x, scale, qmin, qmax)
    if fused is not None:
        return fused
    return torch.floor_(x / scale + 0.5).clamp_(qmin, qmax)  # no gradient wanted: no masks


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        return torch.floor(v + 0.5)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Half-up rounding with an identity gradient."""
    return _RoundSTE.apply(v)


class _ToGridSTE(torch.autograd.Function):
    """``round_ste(x / scale)`` (constant per-tensor scale) with its forward in one fused pass; the
    gradient is the same, ``g / scale``."""

    @staticmethod
    def forward(ctx, x, scale, q):
        ctx.save_for_backward(scale)
        return q

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g / scale, None, None


def to_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integers of a tensor that lies on the grid of ``scale`` (removes float error, STE)."""
    x = x.float()
    if not scale.requires_grad:
        q = quantize_cpu(x.detach(), scale, -float("inf"), float("inf"))  # floor(x / s + 1/2), one pass
        if q is not None:
            return _ToGridSTE.apply(x, scale, q) if torch.is_grad_enabled() and x.requires_grad else q
    return round_ste(x / scale)
