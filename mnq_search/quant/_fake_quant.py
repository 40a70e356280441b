"""Symmetric uniform quantization with the straight-through estimator (paper Eq. 1 and 2).

``S = alpha / (2**(b-1) - 1)`` with ``alpha = max(|r_min|, |r_max|)`` (the spec's form of Eq. 1,
floored at a tiny epsilon); ``I = clamp(round_half_up(R / S), -2**(b-1), 2**(b-1) - 1)``.
The backward pass lets the gradient through where ``R / S`` lies inside the clamp range and
stops it outside (Eq. 2). Rounding is half-up, the rule the dyadic requantizer uses too.
"""

from __future__ import annotations

import torch
from torch import nn

from ._observer import MinMaxObserver

SCALE_EPS = 1e-8
BITS_RANGE = (4, 8)  # bit-widths the project supports for weights and activations ("--bits")


def check_bits(bits: int, what: str = "bits") -> int:
    lo, hi = BITS_RANGE
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(absmax, min=SCALE_EPS) / (2 ** (bits - 1) - 1)


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
        from ..methods._fast import ste_backward_cpu

        fused = ste_backward_cpu(g, inside, scale)
        return (g * inside) / scale if fused is None else fused, None, None, None


def quantize_ste(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer-valued ``clamp(round_half_up(x / scale))`` with the STE of Eq. 2 (float tensor)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        if not scale.requires_grad:
            from ..methods._fast import quantize_mask_cpu

            fused = quantize_mask_cpu(x, scale, qmin, qmax)
            if fused is not None:
                return _QuantizeSTE.apply(x, scale, *fused)
        return _RoundClampSTE.apply(x / scale, qmin, qmax)
    from ..methods._fast import quantize_cpu

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
        from ..methods._fast import quantize_cpu

        q = quantize_cpu(x.detach(), scale, -float("inf"), float("inf"))  # floor(x / s + 1/2), one pass
        if q is not None:
            return _ToGridSTE.apply(x, scale, q) if torch.is_grad_enabled() and x.requires_grad else q
    return round_ste(x / scale)


class ActQuant(nn.Module):
    """Per-tensor symmetric activation quantizer with an EMA min/max observer.

    In ``train()`` mode (calibration and QAT) the observer follows the batches; in ``eval()`` the
    range is frozen. :meth:`set_enabled` switches quantization off for the float reference (kept
    as a buffer for ``state_dict`` and mirrored in a Python bool so ``forward`` never syncs).

    forward(x) -> (x_q, scale): ``x_q`` is dequantized (``x_q / scale`` integer), float32.
    """

    def __init__(self, bits: int, momentum: float | None = 0.95):
        super().__init__()
        self.bits = bits
        self.observer = MinMaxObserver(momentum)
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self._enabled = True

    def set_enabled(self, on: bool) -> None:
        self.enabled.fill_(on)
        self._enabled = bool(on)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._enabled = bool(self.enabled)

    @property
    def scale(self) -> torch.Tensor:
        return symmetric_scale(self.observer.absmax(), self.bits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, s = self.quantize(x)
        return (q, None) if s is None else (q * s, s)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the integers of x on this quantizer's grid as a float tensor, scale); (x, None) when off."""
        if not self._enabled:
            return x, None
        x = x.float()
        if self.training:
            self.observer.update(x)
        s = self.scale
        qmin, qmax = qrange(self.bits)
        return quantize_ste(x, s, qmin, qmax), s

    def quantize_int8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Without gradients: (the integers of x as an int8 tensor, scale) in one fused pass on the
        CPU, for the integer GEMM of the linear layers; None where that path does not apply (off,
        gradients wanted, other devices)."""
        if not self._enabled or torch.is_grad_enabled():
            return None
        from ..methods._fast import quantize_int8_cpu

        x = x.float()
        if x.device.type != "cpu":
            return None
        if self.training:
            self.observer.update(x)
        s = self.scale
        q8 = quantize_int8_cpu(x, s, *qrange(self.bits))
        return None if q8 is None else (q8, s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
