"""Integer kernels shared by the method families (I-BERT, FQ-ViT, I-ViT): I-BERT's polynomial
exponential, I-ViT's shift exponential, and the LayerNorm pieces of I-BERT and I-ViT.

They run on the two kinds of integer tensors of :mod:`mnq_search.integer` (int64, or float-held
integers) and give the same integers for both; the primitives (shifts, rounding, range checks,
integer square root) come from there.

- :func:`i_exp`: I-BERT's second-order polynomial exponential (Kim et al., ICML 2021, Alg. 2);
- :func:`shift_exp`: I-ViT's shift-based exponential (Li & Gu, ICCV 2023, Alg. 1);
- :func:`ln_center`, :func:`ln_normalize`, :func:`ln_affine_bias`: integer mean, normalization and
  folded affine of I-BERT / I-ViT LayerNorm.
"""

from __future__ import annotations

import math

import torch

from ..integer._ops import (INT32_MAX, INT32_MIN, INT64_SAFE, IntegerOverflowError, as_kind, bitlen,  # noqa: F401
                            check_range, dyadic, floor_div, is_int, isqrt, mul_shr, pow2, round_div, round_shr,
                            shl, shr)

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
