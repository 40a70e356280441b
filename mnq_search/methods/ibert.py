"""I-BERT's integer Softmax, GELU and LayerNorm (polynomial family).

Kim, Gholami, Yao, Mahoney, Keutzer, "I-BERT: Integer-only BERT Quantization", ICML 2021.
Facts from ``shared/spec/nonlinear-methods.md`` section 2; deviations are named per class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_
from ._base import AffineLayerNorm, NonLinearMethod
from ..integer._compiled import HAVE_NUMBA, fast_enabled, jit
from ._fast import softmax_divide_kernel
from ._intops import (bitlen, check_range, exp_to_uint16, floor_div, i_exp, isqrt, ln_affine_bias, ln_center,
                      ln_normalize, mul_shr, prescale, shl, shr)
from ._registry import Family, register_family, register_method
from ._tables import TableSoftmax, elementwise_plan, layernorm_plan


FAMILY = register_family(Family(
    name="ibert", title="I-BERT", color="tab:blue",
    paper="Kim, Gholami, Yao, Mahoney, Keutzer, I-BERT: Integer-only BERT Quantization, ICML 2021",
    # integer operations of each kernel (the integer path), per element and per row; see objectives/cost.py
    cost={"softmax": {"element": {"add": 6, "mul": 3, "shift": 3, "div": 1, "compare": 6}, "row": {"div": 1}},
          "gelu": {"element": {"add": 4, "mul": 3, "shift": 1, "compare": 3}},
          "layernorm": {"element": {"add": 4, "mul": 2, "shift": 2},
                        "row": {"add": 8, "shift": 11, "div": 8, "compare": 30, "lookup": 1}}},
))


@register_method("softmax", "ibert")
class IBertSoftmax(TableSoftmax):
    """Softmax with i-exp, a 16-bit requantization of the exponentials and one integer division.

    Row max subtracted -> i-exp (n <= 15, see :func:`._intops.i_exp`) -> shift to unsigned 16 bits
    -> ``sum`` (int32) -> ``f = floor(2**32 / sum)`` -> ``out = floor(exp * f / 2**(32 - B))``.

    ``bits`` = B: the output is unsigned B-bit at scale 2**-B. A probability of 1 would give 2**B,
    which is clamped to 2**B - 1. The 16-bit requantization uses a right shift by the known bound
    of the exponential (the reference uses a calibrated 16-bit activation quantizer).
    Fast path: the 16-bit exponentials as a table of ``rowmax - q`` (:class:`._tables.TableSoftmax`).
    """

    def exp_part(self, q_rel, s_x, row_len):
        e, s_e, bound = i_exp(q_rel, s_x, s_max=self.exp_s_max)
        return exp_to_uint16(e, s_e, bound, row_len)[0]

    def row_part(self, e16):
        total = check_range(e16.sum(dim=-1, keepdim=True), "softmax sum")
        f = check_range(floor_div(2**32, total), "softmax factor")
        return torch.clamp(mul_shr(e16, f, 32 - self.bits, "softmax output"), 0, 2**self.bits - 1)

    def out_scale(self):
        return 2.0**-self.bits

    def cpu_row_kernel(self):
        return softmax_divide_kernel, lambda scale: (2**32, 32 - self.bits, 2**self.bits - 1, 2**62, scale)


ERF_A = -0.2888
ERF_B = -1.769
GELU_S_RANGE = (2.0**-10, 1.0)  # input scales outside are shifted into it first (see prescale)


@register_method("gelu", "ibert")
class IBertGELU(NonLinearMethod):
    """i-GELU: x/2 * (1 + erf(x/sqrt 2)) with erf(u) ~ sign(u) [a (min(|u|, -b) + b)**2 + 1].

    With Se = S/sqrt 2: ``y = sign(q) ((min(|q|, -bq) + bq)**2 + cq)``, ``bq = floor(b/Se)``,
    ``cq = floor(1/(a Se**2))``; ``y >>= k``; ``out = q (y + floor(1/se))`` at scale S se / 2.

    Deviations: the reference fixes k = 14 because it feeds the raw 32-bit FC1 accumulator; here the
    input is the slot's ``bits``-bit grid, so k = max(0, bitlen(|cq|) - 15) keeps the erf value at
    about 15 bits whatever the input scale (k = 14 would leave ~1 bit for an 8-bit input), raised
    where needed so that |out| < 2**24 (float32-exact) for the largest input. The reference's scale
    se is negative; the output is negated here so its scale is positive.
    """

    @property
    def _s_range(self) -> tuple[float, float]:
        return GELU_S_RANGE[0], self.exp_s_max or GELU_S_RANGE[1]

    def _constants(self, s_x: float) -> tuple[float, int, int, int, int, int]:
        """(scale after prescale, |q| bound, bq, cq, erf shift k, one). k keeps the output
        |q| (y + one) below 2**24 (float32-exact) for the largest |q| of the input grid."""
        q0, s = prescale(torch.ones((), dtype=torch.float64), s_x, *self._s_range)
        qmax = 2 ** (self.in_bits - 1) * max(1, int(q0))
        se = s / math.sqrt(2.0)
        bq, cq = math.floor(ERF_B / se), math.floor(1.0 / (ERF_A * se**2))
        k = max(0, (-cq).bit_length() - 15, qmax.bit_length() + 1 + (-cq).bit_length() - 23)
        one = math.floor(1.0 / (ERF_A * se**2 * 2.0**k))
        return s, qmax, bq, cq, k, one

    def float32_exact(self, s_x):
        # intermediates: |(min(|q|, -bq) + bq)**2 + cq| <= max(bq**2, |cq|); |out| <= |q|max (2|one| + 2)
        _, qmax, bq, cq, _, one = self._constants(s_x)
        return max(bq * bq, -cq, qmax * (2 * abs(one) + 2)) < 2**24

    def kernel(self, q, s_x):
        q, s = prescale(q, s_x, *self._s_range)
        _, _, bq, cq, k, one = self._constants(s_x)
        qa = torch.clamp(q.abs(), max=-bq)
        y = shr(torch.sign(q) * ((qa + bq) ** 2 + cq), k)
        out = check_range(-(q * (y + one)), "gelu output")
        se = s / math.sqrt(2.0)
        return out, -s * ERF_A * se**2 * 2.0**k / 2

    def float_op(self, x):
        return F.gelu(x)

    def fast_plan(self, s_x, row_len, device):
        return elementwise_plan(self, s_x, device)


@register_method("layernorm", "ibert")
class IBertLayerNorm(AffineLayerNorm):
    """Integer LayerNorm: integer mean, variance of the input shifted right by a calibrated
    ``var_shift`` (buffer) so the sum of squares stays in unsigned 32 bits, integer Newton square root
    (I-BERT Alg. 4, to convergence; the fairseq code takes a float sqrt), ``floor(2**31 / std)``.

    ``var_shift`` grows in ``train()`` mode until the largest observed sum is below 2**31 (one bit
    of headroom); in ``eval()`` a larger sum saturates at 2**32 - 1. The output keeps
    :func:`._intops.ln_headroom` bits free (see :func:`._intops.ln_normalize`) and the affine is
    folded into a bias at the per-channel scale ``s_n * gamma`` (:func:`._intops.ln_affine_bias`).
    ``bits`` does not change the kernel: its 16-bit input and 23-bit output are requantized by the
    model's quantizers.
    """

    def __init__(self, bits: int = 8, float_module: nn.Module | None = None, fine_grid: bool = False):
        super().__init__(bits, float_module, fine_grid)
        self.register_buffer("var_shift", torch.zeros((), dtype=torch.int64))

    def observe(self, x, s_x):
        var_max = _max_row_variance_cpu(x, float(s_x))
        if var_max is None:
            q = torch.floor(x.double() / float(s_x) + 0.5)
            y = ln_center(q)
            var_max = (y * y).sum(dim=-1).max()
        var_max = all_reduce_(var_max, "max")
        need = torch.clamp(torch.ceil((bitlen(var_max) - 31) / 2), min=0).to(torch.int64)
        self.var_shift.copy_(torch.maximum(self.var_shift, need))

    def kernel(self, q, s_x):
        y = ln_center(q)
        shift = int(self.var_shift)
        ys = shr(y, shift)
        var = torch.clamp((ys * ys).sum(dim=-1, keepdim=True), max=2**32 - 1)
        check_range(var, "layernorm variance", bits=32, signed=False)
        std = shl(isqrt(var), shift)
        yn, s_n = ln_normalize(y, std)
        return ln_affine_bias(yn, s_n, self.weight, self.bias)

    def reset_calibration(self):
        self.var_shift.zero_()

    def plan_state(self):
        return (self.var_shift._version, self.var_shift.data_ptr(), *super().plan_state())

    def fast_plan(self, s_x, row_len, device):
        return layernorm_plan(self, row_len, device, int(self.var_shift), 2**32 - 1, 2**31)



@jit
def _max_row_variance_kernel(x, s):
    """max over rows of sum (q - round(mean q))**2, q = round(x / s): :meth:`IBertLayerNorm.observe`."""
    best = 0.0
    channels = x.shape[1]
    for r in range(x.shape[0]):
        total = 0
        for c in range(channels):
            total += np.int64(np.floor(np.float64(x[r, c]) / s + 0.5))
        mean = (2 * total + channels) // (2 * channels)
        var = 0
        for c in range(channels):
            y = np.int64(np.floor(np.float64(x[r, c]) / s + 0.5)) - mean
            var += y * y
        if var > best:
            best = np.float64(var)
    return best


def _max_row_variance_cpu(x: torch.Tensor, s: float) -> torch.Tensor | None:
    if not (HAVE_NUMBA and fast_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel()):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous().numpy()
    return torch.tensor(_max_row_variance_kernel(x2, s), dtype=torch.float64)
