"""I-ViT's integer Softmax (Shiftmax), GELU (ShiftGELU) and LayerNorm (I-LayerNorm): bit-shifts.

Li and Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference",
ICCV 2023. Facts from ``shared/spec/nonlinear-methods.md`` section 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import AffineLayerNorm, NonLinearMethod
from ._fast import softmax_divide_kernel
from ._intops import (INT32_MAX, check_range, floor_div, isqrt, ln_affine_bias, ln_center, ln_normalize,
                      mul_shr, shift_exp)
from ._registry import Family, register_family, register_method
from ._tables import TableSoftmax, elementwise_plan, layernorm_plan

SIGMOID_BITS = 8  # ShiftGELU's internal sigmoid width (I-ViT: 8)


FAMILY = register_family(Family(
    name="ivit", title="I-ViT", color="tab:orange",
    paper="Li and Gu, I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference, ICCV 2023",
    cost={"softmax": {"element": {"add": 7, "mul": 2, "shift": 5, "div": 1, "compare": 2},
                      "row": {"div": 1, "compare": 1}},
          # ShiftGELU with e^-m per element: two shift-exps, the sigmoid's division, q * sigmoid
          "gelu": {"element": {"add": 10, "mul": 4, "shift": 9, "div": 3, "compare": 3}},
          "layernorm": {"element": {"add": 4, "mul": 2, "shift": 1},
                        "row": {"add": 8, "shift": 10, "div": 8, "compare": 29, "lookup": 1}}},
))


@register_method("softmax", "ivit")
class IViTSoftmax(TableSoftmax):
    """Shiftmax: row max subtracted, shift-exp (n <= 15), ``f = floor((2**31 - 1) / sum)``,
    ``out = floor(exp f / 2**(32 - B))`` at scale 2**-(B-1), in [0, 2**(B-1)].

    ``bits`` = B (I-ViT uses 16 in ViT/DeiT, 8 in Swin; here the model's bit-width). The output
    reaches 2**(B-1) when one probability is 1: that fits the unsigned B-bit output register,
    so no clamp is needed. n shrinks with the row length so the sum cannot saturate (the reference
    clamps the sum at 2**31 - 1, which then distorts every probability of the row).
    Fast path: the exponentials as a table of ``rowmax - q`` (:class:`._tables.TableSoftmax`).
    """

    def exp_part(self, q_rel, s_x, row_len):
        return shift_exp(q_rel, s_x, n_max=15, headroom_bits=row_len.bit_length(), s_max=self.exp_s_max)[0]

    def row_part(self, e):
        total = check_range(torch.clamp(e.sum(dim=-1, keepdim=True), max=INT32_MAX), "softmax sum")
        f = floor_div(INT32_MAX, total)
        return mul_shr(e, f, 32 - self.bits, "softmax output")

    def out_scale(self):
        return 2.0 ** -(self.bits - 1)

    def cpu_row_kernel(self):
        return softmax_divide_kernel, lambda scale: (INT32_MAX, 32 - self.bits, 2**62, INT32_MAX, scale)


@register_method("gelu", "ivit")
class IViTGELU(NonLinearMethod):
    """ShiftGELU: x * sigmoid(1.702 x), sigmoid(z) = e^(z-m) / (e^(z-m) + e^-m) by shift-exp (n <= 23)
    at the scale 1.702 S (the 1.702 is a constant of the scale, as in the reference); the sigmoid is
    8-bit at scale 2**-7 and the output ``q * sigmoid`` has scale ``S 2**-7`` (|out| < 2**15 for
    8-bit inputs).

    Deviation: m = max(0, q) per element, where the reference takes the row maximum. Both keep every
    exponent at or below 0 and give the same sigmoid in exact arithmetic; with the row maximum, a row
    holding one large value pushes every other element's e^(z-m) and the shared e^-m below shift-exp's
    2**-n floor, where the sigmoid of the whole row collapses to 1/2 (on long-tailed FC1 outputs the
    reference loses 4-8 dB to this, see BENCHMARKS.md section 1). Per element, nothing couples the
    elements of a row, so the method is an element-wise table. ``bits`` sets only the input width.
    (Earlier versions took the row maximum, and multiplied the integers by 1.702 with shifts,
    q + q>>1 + q>>3 + q>>4 = 1.6875 q floored term by term.)
    """

    SIGMOID_GAIN = 1.702

    def exp_part(self, z: torch.Tensor, s_x: float) -> torch.Tensor:
        """shift-exp of ``z <= 0`` at scale 1.702 s_x (n <= 23)."""
        return shift_exp(z, self.SIGMOID_GAIN * s_x, n_max=23, headroom_bits=1, s_max=self.exp_s_max)[0]

    def kernel(self, q, s_x):
        m = torch.clamp(q, min=0)
        a, b = self.exp_part(q - m, s_x), self.exp_part(-m, s_x)
        den = check_range(a + b, "gelu sigmoid denominator")
        f = floor_div(INT32_MAX, den)
        sig = mul_shr(a, f, 32 - SIGMOID_BITS, "gelu sigmoid")
        return check_range(q * sig, "gelu output"), s_x * 2.0 ** -(SIGMOID_BITS - 1)

    def float_op(self, x):
        return F.gelu(x)

    def fast_plan(self, s_x, row_len, device):
        return elementwise_plan(self, s_x, device)


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

    def fast_plan(self, s_x, row_len, device):
        return layernorm_plan(self, row_len, device, 0, 2**62, INT32_MAX)
