"""Integer kernels shared by the method families (I-BERT, FQ-ViT, I-ViT).

Every function here takes tensors of one of two kinds and gives the same integers for both:

- integer tensors (``torch.int64``): the **integer path**, using only integer add, multiply,
  shift, compare and floor division;
- ``torch.float64`` tensors that hold integers: the **float-held path** used in training.
  float64 represents every integer below 2**53 exactly, floor(a / b) of such integers is exact
  for |a| < 2**52, and shifts are exact scalings by powers of two; each kernel keeps its values
  well below that (the method docstrings give the bounds), so both paths agree bit for bit.

Rounding is half-up everywhere (``floor(x + 1/2)``), never torch's half-to-even, so the two
paths and the dyadic requantizer use one rule.

Range checks (:func:`check_range`) run only on the integer path: they assert that a value the
method stores in an int32 register (an accumulator, an exponential, an output) fits, and that
64-bit values fit int64. The float-held path skips them, so training does not synchronize.

The kernels:

- :func:`bitlen`, :func:`isqrt`: bit length and exact integer square root (Newton from above,
  vectorized with a fixed iteration count that is enough for inputs below 2**62);
- :func:`i_exp`: I-BERT's second-order polynomial exponential (Kim et al., ICML 2021, Alg. 2);
- :func:`shift_exp`: I-ViT's shift-based exponential (Li & Gu, ICCV 2023, Alg. 1).
"""

from __future__ import annotations

import math

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


# --- I-BERT i-exp -----------------------------------------------------------------------------

IEXP_A = 0.35815147
IEXP_B = 0.96963238 / IEXP_A
IEXP_C = 1.0 / IEXP_A
LN2 = math.log(2.0)
IEXP_S_RANGE = (2.0**-9, 0.5)  # input scales outside are shifted into it first (see prescale)
SHIFT_EXP_S_RANGE = (2.0**-14, 1.0)
FINE_GRID_SCALE = 2.0**-6  # the coarsest internal grid with fine_grid=True (an exact left shift)


def prescale(q: torch.Tensor, scale: float, s_min: float, s_max: float) -> tuple[torch.Tensor, float]:
    """Bring the input scale into [s_min, s_max] by shifting the integers (exact for a left shift).

    A scale below ``s_min`` makes constants like 1/S**2 leave 32 bits: the integers are shifted
    right (rounding). A scale above ``s_max`` makes the kernel's constants degenerate (e.g. I-BERT's
    c/S**2 floors to 0 for S >= 2, so every exponential is 0): the integers are shifted left, which
    represents the same values on a finer grid. Between the two the kernel runs at the input scale,
    as the references do. The shifts depend on the scale only: they are constants of the kernel.
    """
    down = max(0, math.ceil(math.log2(s_min / scale)))
    up = max(0, math.ceil(math.log2(scale / s_max)))
    if down:
        q = round_shr(q, down)
    if up:
        q = shl(q, up)
    return q, scale * 2.0 ** (down - up)


def i_exp(q: torch.Tensor, scale: float, n_max: int = 15, s_max: float | None = None
          ) -> tuple[torch.Tensor, float, int]:
    """I-BERT integer exponential of q * scale for q <= 0.

    exp(x) = 2**-z * exp(r) with x = -z ln2 + r, r in (-ln2, 0], exp(r) ~ a (r + b)**2 + c; in
    integers: ``x0 = floor(-ln2/S)``, ``z = floor(q/x0)``, ``r = q - x0 z``,
    ``p = r (r + floor(b/S)) + floor(c/S**2)`` at scale a S**2, ``exp = p << (n - z)``.

    Deviations from the reference, all for int32 safety: the reference clamps at 30 ln2 (n = 30)
    and overflows int32; here n = min(n_max, 30 - bitlen(c/S**2)) (15 for typical softmax input
    scales), so the largest exponential c/S**2 * 2**n stays below 2**30; inputs below the clamp
    at n ln2 give 0 (the reference's clamp at 30 ln2 leaves a floor of 2**-30, which is 0 in
    effect; a floor of 2**-15 would add up over long rows and unmask Swin's masked logits);
    scales outside [2**-9, 0.5] are first shifted into it (:func:`prescale`).

    Returns (exp_int, exp_scale, exp_bound): exp_int in [0, exp_bound], exp_bound = c/S**2 * 2**n
    < 2**30 (the value at x = 0), exp_scale = a S**2 / 2**n.
    """
    q, s = prescale(q, scale, IEXP_S_RANGE[0], s_max or IEXP_S_RANGE[1])
    x0 = math.floor(-LN2 / s)
    bq = math.floor(IEXP_B / s)
    cq = math.floor(IEXP_C / s**2)
    n = max(0, min(n_max, 30 - cq.bit_length()))
    under = q < n * x0  # exp below 2**-n of the maximum: 0 (with n = 30 the reference's clamp
    q = torch.clamp(q, min=n * x0)  # floor of 2**-30 was 0 in effect; at n = 15 it would not be)
    z = floor_div(q, x0)
    r = q - x0 * z
    p = check_range(r * (r + bq) + cq, "i-exp polynomial")
    e = check_range(shl(p, n - z), "i-exp").masked_fill_(under, 0)
    return e, IEXP_A * s**2 / 2.0**n, cq << n


def exp_to_uint16(e: torch.Tensor, exp_scale: float, bound: int, row_len: int) -> tuple[torch.Tensor, float]:
    """Bring exponentials in [0, bound] to unsigned 16 bits with a right shift (I-BERT's 16-bit
    requantization before the sum, done with a shift since the bound is known), plus one more bit
    per doubling of the row length past 2**15 so that the row sum stays in int32."""
    k = max(0, bound.bit_length() - 16) + max(0, row_len.bit_length() - 15)
    return shr(e, k), exp_scale * 2.0**k


def shift_exp(q: torch.Tensor, scale: float, n_max: int, headroom_bits: int = 0, s_max: float | None = None
              ) -> tuple[torch.Tensor, float]:
    """I-ViT shift-based exponential of q * scale for q <= 0.

    q * log2(e) ~ q + q>>1 - q>>4; with x0 = floor(-1/S), z = floor(q / x0), r = q - x0 z:
    2**(q S) ~ 2**-z (1 + r S / 2), held as (r>>1 - x0) << (n - z) at scale S / 2**n.

    The reference multiplies r by 1/2 without flooring (the TVM deployment shifts): both paths here
    shift. Flooring r / 2 lowers each exponential by at most half a step, which offsets the linear
    2**f ~ 1 + f/2 overestimate inside an octave: keeping the bit measured 1.6-1.8 dB *worse* for
    Shiftmax on the realistic attention logits (29.2 -> 27.7 dB at 8 bits, 15.8 -> 14.0 at 6). n = min(n_max, 30 - headroom_bits - bitlen(-x0)) so that the largest exponential, times
    2**headroom_bits (e.g. the row length a caller sums over), stays below 2**31 (the reference
    overflows for small S). Scales outside [2**-14, 1] are shifted into it first (:func:`prescale`;
    above 1, x0 = floor(-1/S) = -1 would misplace every power of two).

    Returns (exp_int, exp_scale) with exp_scale = S / 2**n.
    """
    q, s = prescale(q, scale, SHIFT_EXP_S_RANGE[0], s_max or SHIFT_EXP_S_RANGE[1])
    q = q + shr(q, 1) - shr(q, 4)
    x0 = math.floor(-1.0 / s)
    n = max(0, min(n_max, 30 - headroom_bits - (-x0).bit_length()))
    q = torch.clamp(q, min=n * x0)
    z = floor_div(q, x0)
    r = q - x0 * z
    e = shr(r, 1) - x0
    out = check_range(shl(e, n - z), "shift-exp")
    return out, s / 2.0**n


# --- LayerNorm pieces shared by I-BERT and I-ViT ------------------------------------------------

def ln_center(q: torch.Tensor) -> torch.Tensor:
    """q - round_half_up(mean(q)) over the last dim (|sum| < 2**31 for 16-bit inputs, C < 2**15)."""
    total = check_range(q.sum(-1, keepdim=True), "layernorm sum")
    return q - round_div(total, q.shape[-1])


def ln_headroom(channels: int) -> int:
    """Bits kept free in the normalized output so it stays below 2**22 even when one channel
    holds the whole variance (|y| / std <= sqrt(C)); see :func:`ln_normalize`."""
    return 8 + math.ceil(math.log2(math.sqrt(channels)))


def ln_normalize(y: torch.Tensor, std: torch.Tensor, numerator_minus_one: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(y * floor(2**31 / std) / 2**(1 + k)) at scale sqrt(C) / 2**(30 - k), k = :func:`ln_headroom`.

    The references stop at ``/ 2`` (k = 0; I-BERT 2**31, I-ViT 2**31 - 1): their output reaches
    sqrt(C) * 2**30, which overflows int32 for any C > 4 when one channel is an outlier. Here the
    64-bit product is shifted k bits further, so the output stays below 2**22 (2**18 steps per
    standard deviation for C = 192) and fits float32 exactly; the factor keeps the references'
    precision (f >= 2**14 for std <= 2**17).
    std = 0 (a constant row) is treated as 1: the centered row is 0, so the output is the bias.
    """
    channels = y.shape[-1]
    k = ln_headroom(channels)
    # f is positive: an unsigned 32-bit register (I-BERT's 2**31 / 1 does not fit a signed one)
    f = check_range(floor_div(2**31 - (1 if numerator_minus_one else 0), torch.clamp(std, min=1)),
                    "layernorm factor", bits=32, signed=False)
    yn = mul_shr(y, f, 1 + k, "layernorm normalized")
    return yn, ln_scale_n(channels, y.device)


def ln_scale_n(channels: int, device=None) -> torch.Tensor:
    """The scale of :func:`ln_normalize`'s output, sqrt(C) / 2**(30 - k) (float64, 0-dim)."""
    return torch.tensor(math.sqrt(channels) / 2 ** (30 - ln_headroom(channels)), dtype=torch.float64, device=device)


def ln_affine_constants(s_n: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer bias b_q, per-channel output scale s_n * gamma), float64, of :func:`ln_affine_bias`.

    The scale may be negative (gamma < 0). |gamma| is floored at |beta| / (s_n 2**22) so that the
    integer bias stays below 2**22 (for gamma near 0 the reference's bias overflows); for C = 192
    that floor is |beta| / 192, where the channel's output is beta up to 0.5 % of its normalized input.
    Without an affine: a zero bias and ``s_n`` in every channel.
    """
    if weight is None:
        return torch.zeros(channels, dtype=torch.float64, device=s_n.device), s_n.expand(channels)
    gamma = weight.detach().to(torch.float64)
    beta = (bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(gamma))
    g_min = torch.clamp(beta.abs() / (s_n * 2.0**22), min=1e-12)
    sign = torch.where(gamma < 0, -1.0, 1.0).to(torch.float64)
    gamma = torch.where(gamma.abs() < g_min, sign * g_min, gamma)
    b_q = torch.clamp(torch.floor(beta / gamma / s_n), -(2.0**22), 2.0**22)
    return b_q, s_n * gamma


def ln_affine_bias(yn: torch.Tensor, s_n: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """I-BERT/I-ViT affine: out = yn + floor((beta / gamma) / s_n) at per-channel scale s_n * gamma
    (constants from :func:`ln_affine_constants`)."""
    if weight is None:
        return yn, s_n.expand(yn.shape[-1]) if s_n.dim() == 0 else s_n
    b_q, scale = ln_affine_constants(s_n, weight, bias, yn.shape[-1])
    out = check_range(yn + as_kind(b_q, yn), "layernorm output")
    return out, scale
