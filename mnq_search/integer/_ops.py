"""Integer arithmetic primitives on two kinds of tensors, giving the same integers for both.

- integer tensors (``torch.int64``): the **integer path**, using only integer add, multiply,
  shift, compare and floor division;
- ``torch.float64`` (or float32 where a method proves it exact) tensors that hold integers: the
  **float-held path** used in training. float64 represents every integer below 2**53 exactly,
  floor(a / b) of such integers is exact for |a| < 2**52, and shifts are exact scalings by powers
  of two; the kernels keep their values well below that, so both paths agree bit for bit.

Rounding is half-up everywhere (``floor(x + 1/2)``), never torch's half-to-even, so the two
paths and the dyadic requantizer use one rule.

Range checks (:func:`check_range`) run only on the integer path: they assert that a value held in
a declared register width (an int32 accumulator, an exponential, an output) fits, and that 64-bit
values fit int64. The float-held path skips them, so training does not synchronize.

Also :func:`dyadic`: a ratio of scales as ``m * 2**-e`` (HAWQ-V3), the integer-only rescaling
every layer above uses.
"""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
INT64_SAFE = 2**62  # bound for 64-bit intermediates (products before a shift)


class IntegerOverflowError(ArithmeticError):
    """A value left the register width the method declares for it (integer path only)."""


def is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point()


def check_range(t: torch.Tensor, name: str, bits: int = 32, signed: bool = True) -> torch.Tensor:
    """On the integer path, assert ``t`` fits a ``bits``-bit register; returns ``t`` unchanged."""
    if is_int(t) and t.numel():
        lo = -(2 ** (bits - 1)) if signed else 0
        hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        tmin, tmax = int(t.min()), int(t.max())
        if tmin < lo or tmax > hi:
            raise IntegerOverflowError(f"{name}: values in [{tmin}, {tmax}] leave the {bits}-bit "
                                       f"{'signed' if signed else 'unsigned'} range [{lo}, {hi}]")
    return t


def as_kind(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cast a tensor of integer values (float64 or int) to the kind of ``like``."""
    return value.to(dtype=like.dtype, device=like.device)


def floor_div(a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor:
    """floor(a / b) for integer-valued tensors (either may be a Python int); b must be nonzero."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if is_int(a):
        return torch.div(a, b, rounding_mode="floor")
    return torch.floor(a / b)


def round_div(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """Half-up rounding of a / b for b > 0: floor((2a + b) / 2b)."""
    return floor_div(2 * a + b, 2 * b)


_FLOAT_BITS = {torch.float64: (torch.int64, 52, 1023), torch.float32: (torch.int32, 23, 127)}


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**k for integer-valued ``k`` as ``dtype``, built from its exponent bits (exact, and several
    times cheaper than ``torch.ldexp``, which computes ``pow``); k is clamped to the normal range."""
    if dtype not in _FLOAT_BITS:
        return torch.exp2(k.to(dtype))
    int_dtype, mantissa, bias = _FLOAT_BITS[dtype]
    e = k.to(int_dtype).clamp(1 - bias, bias) + bias
    return torch.bitwise_left_shift(e, mantissa).view(dtype)


def shr(a: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Arithmetic right shift: floor(a / 2**k), k >= 0 (int or tensor)."""
    if is_int(a):
        if isinstance(k, torch.Tensor):
            k = k.clamp(max=62).to(a.dtype)
        return torch.bitwise_right_shift(a, k)
    if isinstance(k, torch.Tensor):
        return torch.floor(a * pow2(-k, a.dtype))
    return torch.floor(a * 2.0 ** (-k))


def shl(a: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Left shift: a * 2**k, k >= 0 (int or tensor)."""
    if is_int(a):
        if isinstance(k, torch.Tensor):
            k = k.to(a.dtype)
        return torch.bitwise_left_shift(a, k)
    if isinstance(k, torch.Tensor):
        return a * pow2(k, a.dtype)
    return a * 2.0**k


def round_shr(a: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Half-up rounding of a / 2**k (k >= 0): floor((a + 2**(k-1)) / 2**k); k = 0 gives a."""
    if isinstance(k, int):
        if k == 0:
            return a
        return shr(a + 2 ** (k - 1), k) if is_int(a) else torch.floor(a * 2.0**-k + 0.5)
    if is_int(a):
        k = k.to(a.dtype)
        return shr(a + shr(shl(torch.ones_like(a), k), 1), k)
    return torch.floor(a * pow2(-k, a.dtype) + 0.5)  # exact for |a| < 2**52


def mul_shr(a: torch.Tensor, b: torch.Tensor | int, k: torch.Tensor | int, name: str = "mul_shr") -> torch.Tensor:
    """floor(a * b / 2**k) with a 64-bit product (as a multiply-high instruction), 32-bit result."""
    prod = check_range(a * b, f"{name} product", bits=63)
    return check_range(shr(prod, k), name)


def bitlen(a: torch.Tensor) -> torch.Tensor:
    """Number of bits of a >= 0 (0 for 0), a < 2**63.

    Integer path: a binary search with six shift-compare steps. Float-held path: the exponent
    of ``frexp``, which is the same number for an exactly held integer (one op instead of 24).
    """
    if not is_int(a):
        return torch.frexp(a).exponent.to(a.dtype)
    n = torch.zeros_like(a)
    x = a
    for s in (32, 16, 8, 4, 2, 1):
        big = x >= 2**s
        x = torch.where(big, shr(x, s), x)
        n = n + big.to(a.dtype) * s
    return n + (x > 0).to(a.dtype)


def isqrt(n: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """floor(sqrt(n)) for 0 <= n < 2**62, exact (I-BERT Alg. 4: Newton from 2**ceil(bits/2)).

    The start is at most twice the root, so the relative error after k steps is below
    2**(1 - 2**k); six steps leave less than one unit for every n < 2**62, after which an iterate
    that does not decrease marks convergence (kept by the ``where``).
    """
    x = shl(torch.ones_like(n), shr(bitlen(n) + 1, 1))
    x = torch.where(n > 0, x, torch.ones_like(n))
    for _ in range(iters):
        y = shr(x + floor_div(n, x), 1)
        x = torch.where((y < x) & (y > 0), y, x)  # y = 0 only for n = 0, which is masked below
    return torch.where(n > 0, x, torch.zeros_like(n))


def dyadic(ratio: torch.Tensor, mantissa_bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose ``ratio`` (any shape, nonzero) into int64 ``(m, e)`` with ratio ~ m * 2**-e.

    |m| lies in [2**(mantissa_bits-1), 2**mantissa_bits] and 0 <= e <= 62: ratios of 2**31 and more
    (which never occur between quantizer scales) saturate m, ratios below 2**-32 lose mantissa bits.
    """
    ratio = ratio.to(torch.float64)
    frac, exp = torch.frexp(ratio)
    m = torch.floor(frac.abs() * 2.0**mantissa_bits + 0.5) * torch.sign(frac)
    e = mantissa_bits - exp.to(torch.float64)
    shift_back = torch.clamp(-e, min=0)  # ratio >= 2**31: fold the excess into m (saturating)
    m = torch.clamp(m * torch.exp2(shift_back), -(2.0**62), 2.0**62)
    e = torch.clamp(e, min=0)
    # ratio < 2**-32: shifts past 62 are not representable on the integer path; fold them into m
    extra = torch.clamp(e - 62, min=0)
    m = torch.floor(m * torch.exp2(-extra) + 0.5)
    e = e - extra
    return m.to(torch.int64), e.to(torch.int64)
