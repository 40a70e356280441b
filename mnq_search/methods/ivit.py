"""I-ViT's integer Softmax (Shiftmax), GELU (ShiftGELU) and LayerNorm (I-LayerNorm): bit-shifts.

Li and Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference",
ICCV 2023. Facts from ``shared/spec/nonlinear-methods.md`` section 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import AffineLayerNorm, NonLinearMethod
from ._intops import (INT32_MAX, check_range, floor_div, isqrt, ln_affine_bias, ln_center, ln_normalize,
                      mul_shr, shift_exp, shr)
from ._registry import register_method

SIGMOID_BITS = 8  # ShiftGELU's internal sigmoid width (I-ViT: 8)


@register_method("softmax", "ivit")
class IViTSoftmax(NonLinearMethod):
    """Shiftmax: row max subtracted, shift-exp (n <= 15), ``f = floor((2**31 - 1) / sum)``,
    ``out = floor(exp f / 2**(32 - B))`` at scale 2**-(B-1), in [0, 2**(B-1)].

    ``bits`` = B (I-ViT uses 16 in ViT/DeiT, 8 in Swin; here the model's bit-width). The output
    reaches 2**(B-1) when one probability is 1: that fits the unsigned B-bit output register,
    so no clamp is needed. n shrinks with the row length so the sum cannot saturate (the reference
    clamps the sum at 2**31 - 1, which then distorts every probability of the row).
    """

    def kernel(self, q, s_x):
        q = q - q.amax(dim=-1, keepdim=True)
        e, _ = shift_exp(q, s_x, n_max=15, headroom_bits=q.shape[-1].bit_length(),
                         s_max=self.exp_s_max)
        total = check_range(torch.clamp(e.sum(dim=-1, keepdim=True), max=INT32_MAX), "softmax sum")
        f = floor_div(INT32_MAX, total)
        out = mul_shr(e, f, 32 - self.bits, "softmax output")
        return out, 2.0 ** -(self.bits - 1)

    def float_op(self, x):
        return torch.softmax(x, dim=-1)


@register_method("gelu", "ivit")
class IViTGELU(NonLinearMethod):
    """ShiftGELU: x * sigmoid(1.702 x), with 1.702 q ~ q + q>>1 + q>>3 + q>>4 and
    sigmoid(z) = e^(z-m) / (e^(z-m) + e^-m) by shift-exp (n <= 23); the sigmoid is 8-bit at scale
    2**-7 and the output ``q * sigmoid`` has scale ``S 2**-7`` (|out| < 2**15 for 8-bit inputs).

    Deviation: m, the row max, is floored at 0 (the reference feeds shift-exp a positive input
    -m when a whole row is negative, where it overflows). ``bits`` sets only the input width.
    """

    def kernel(self, q, s_x):
        q1 = q + shr(q, 1) + shr(q, 3) + shr(q, 4)
        m = torch.clamp(q1.amax(dim=-1, keepdim=True), min=0)
        a, _ = shift_exp(q1 - m, s_x, n_max=23, headroom_bits=1, s_max=self.exp_s_max)
        b, _ = shift_exp(-m, s_x, n_max=23, headroom_bits=1, s_max=self.exp_s_max)
        den = check_range(a + b, "gelu sigmoid denominator")
        f = floor_div(INT32_MAX, den)
        sig = mul_shr(a, f, 32 - SIGMOID_BITS, "gelu sigmoid")
        out = check_range(q * sig, "gelu output")
        return out, s_x * 2.0 ** -(SIGMOID_BITS - 1)

    def float_op(self, x):
        return F.gelu(x)


@register_method("layernorm", "ivit")
class IViTLayerNorm(AffineLayerNorm):
    """I-LayerNorm: integer mean, variance as a 64-bit sum of squares (up to 2**41.6 for C = 768 and
    16-bit inputs), integer square root, ``floor((2**31 - 1) / std)``, affine folded into a bias at
    the per-channel scale ``s_n * gamma``.

    Deviation: the reference runs ten Newton steps from 2**16 with shifts, which does not converge
    for small variances (var = 100 gives 64, not 10; exact only from sqrt(var) ~ 200); here the
    square root is exact (Newton from above to convergence, :func:`._intops.isqrt`). Output
    headroom as in :func:`._intops.ln_normalize`. ``bits`` does not change the kernel.
    """

    def kernel(self, q, s_x):
        y = ln_center(q)
        var = check_range((y * y).sum(dim=-1, keepdim=True), "layernorm variance", bits=63)
        yn, s_n = ln_normalize(y, isqrt(var), numerator_minus_one=True)
        return ln_affine_bias(yn, s_n, self.weight, self.bias)
