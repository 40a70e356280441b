"""The per-tensor symmetric activation quantizer (paper Eq. 1 and 2) and its scale.

``S = alpha / (2**(b-1) - 1)`` with ``alpha = max(|r_min|, |r_max|)`` (the spec's form of Eq. 1,
floored at a tiny epsilon); the rounding with its straight-through estimator is
:func:`mnq_search.integer.quantize_ste`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..integer import BITS_RANGE, check_bits, qrange, quantize_int8_cpu, quantize_ste, round_ste, to_grid  # noqa: F401
from ._observer import MinMaxObserver

SCALE_EPS = 1e-8


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(absmax, min=SCALE_EPS) / (2 ** (bits - 1) - 1)


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
        # an upper bound on the calibrated |range| (a clipping threshold chosen offline, e.g. by the
        # post-LayerNorm reparameterisation); +inf: the observed range as is. Kept across calibrations.
        self.register_buffer("cap", torch.full((), float("inf")))
        self._enabled = True
        self._capped = False

    def set_cap(self, value: float) -> None:
        """Clip the range at ``value`` (> 0), or remove the clip with ``inf``."""
        if not value > 0:
            raise ValueError(f"cap must be positive, got {value!r}")
        self.cap.fill_(float(value))
        self._capped = bool(torch.isfinite(self.cap))

    def set_enabled(self, on: bool) -> None:
        self.enabled.fill_(on)
        self._enabled = bool(on)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "cap" not in state_dict:  # saved before quantizers had a cap: none
            state_dict[prefix + "cap"] = torch.full((), float("inf"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._enabled = bool(self.enabled)
        self._capped = bool(torch.isfinite(self.cap))

    @property
    def scale(self) -> torch.Tensor:
        absmax = self.observer.absmax()
        return symmetric_scale(torch.minimum(absmax, self.cap) if self._capped else absmax, self.bits)

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
