"""Dyadic requantization (HAWQ-V3, Yao et al., ICML 2021): rescaling by m * 2**-e with integers only.

A ratio of scales ``r = s_in / s_out`` is written as ``m * 2**-e`` with ``m`` a signed 31-bit
mantissa (``round_half_up(frac * 2**31)``, frac in [0.5, 1)) and ``e = 31 - exponent``, so that
``requantize(q) = round_half_up(q * m / 2**e)`` needs one 64-bit product and one shift. The
decomposition is vectorized with ``torch.frexp`` and works per tensor or per channel, including
negative ratios (the signed per-channel scales out of I-ViT/I-BERT LayerNorm).
"""

from __future__ import annotations

import torch

from ..integer import as_kind, check_range, dyadic, round_shr

__all__ = ["dyadic", "dyadic_value", "requantize"]


def requantize(q: torch.Tensor, m: torch.Tensor, e: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round_half_up(q * m / 2**e), qmin, qmax) on the integer or the float-held path."""
    prod = check_range(q * as_kind(m, q), "requantize product", bits=63)
    return torch.clamp(round_shr(prod, as_kind(e, q)), qmin, qmax)


def dyadic_value(m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The float64 value m * 2**-e (for tests and for the float reference of a requantization)."""
    return m.to(torch.float64) * torch.exp2(-e.to(torch.float64))
