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
