"""I-ViT's integer Softmax (Shiftmax), GELU (ShiftGELU) and LayerNorm (I-LayerNorm): bit-shifts.

Li and Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference",
ICCV 2023. Facts from ``shared/spec/nonlinear-methods.md`` section 4.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._base import AffineLayerNorm, NonLinearMethod
from ._fast import FastPlan, floor_div_i64, jit, softmax_divide_kernel
from ._intops import (INT32_MAX, check_range, floor_div, isqrt, ln_affine_bias, ln_center, ln_normalize,
                      mul_shr, shift_exp, shr)
from ._registry import register_method
from ._tables import TableSoftmax, layernorm_plan

SIGMOID_BITS = 8  # ShiftGELU's internal sigmoid width (I-ViT: 8)


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
    """ShiftGELU: x * sigmoid(1.702 x), with 1.702 q ~ q + q>>1 + q>>3 + q>>4 and
    sigmoid(z) = e^(z-m) / (e^(z-m) + e^-m) by shift-exp (n <= 23); the sigmoid is 8-bit at scale
    2**-7 and the output ``q * sigmoid`` has scale ``S 2**-7`` (|out| < 2**15 for 8-bit inputs).

    Deviation: m, the row max, is floored at 0 (the reference feeds shift-exp a positive input
    -m when a whole row is negative, where it overflows). ``bits`` sets only the input width.
    """

    @staticmethod
    def scale_1702(q: torch.Tensor) -> torch.Tensor:
        """1.702 q ~ q + q>>1 + q>>3 + q>>4 (non-decreasing in q)."""
        return q + shr(q, 1) + shr(q, 3) + shr(q, 4)

    def exp_part(self, z: torch.Tensor, s_x: float) -> torch.Tensor:
        """shift-exp of ``z <= 0`` (n <= 23)."""
        return shift_exp(z, s_x, n_max=23, headroom_bits=1, s_max=self.exp_s_max)[0]

    def sigmoid_part(self, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``q * sigmoid`` from ``a = exp(q1 - m)`` and ``b = exp(-m)``: 8-bit sigmoid a / (a + b)."""
        den = check_range(a + b, "gelu sigmoid denominator")
        f = floor_div(INT32_MAX, den)
        sig = mul_shr(a, f, 32 - SIGMOID_BITS, "gelu sigmoid")
        return check_range(q * sig, "gelu output")

    def out_scale(self, s_x: float) -> float:
        return s_x * 2.0 ** -(SIGMOID_BITS - 1)

    def kernel(self, q, s_x):
        q1 = self.scale_1702(q)
        m = torch.clamp(q1.amax(dim=-1, keepdim=True), min=0)
        return self.sigmoid_part(q, self.exp_part(q1 - m, s_x), self.exp_part(-m, s_x)), self.out_scale(s_x)

    def float_op(self, x):
        return F.gelu(x)

    def fast_plan(self, s_x, row_len, device):
        """Both exponentials from one table ``E[j] = exp(-j)`` over the differences ``m - q1`` and the
        maxima ``m`` an ``in_bits``-bit input gives; the rest per element in a compiled loop."""
        lo, hi = -(2 ** (self.in_bits - 1)), 2 ** (self.in_bits - 1) - 1
        q1_lo, q1_hi = (int(self.scale_1702(torch.tensor(v))) for v in (lo, hi))
        table = self.exp_part(-torch.arange(max(q1_hi, 0) - min(q1_lo, 0) + 1, dtype=torch.int64), s_x)
        s_y = torch.tensor(self.out_scale(s_x), dtype=torch.float64, device=device)
        table_t = table.to(device)

        def torch_fn(qf, integers):
            q = qf.long()
            if bool((q < lo).any() | (q > hi).any()):
                return None
            q1 = self.scale_1702(q)
            m = torch.clamp(q1.amax(dim=-1, keepdim=True), min=0)
            o = self.sigmoid_part(q, table_t[m - q1], table_t[m])
            return o.double() if integers else (o.double() * s_y).float()

        head = (table.numpy(), lo, hi)
        return FastPlan(s_y, _shift_gelu_kernel, head + (float(s_y),), lambda: head + (1.0,), torch_fn)


@jit
def _shift_gelu_kernel(q, out, table, lo, hi, out_scale):
    """:meth:`IViTGELU.kernel` per row with ``exp(-j) = table[j]``, int64 registers. The output is a
    function of (m, q): it is computed once per value of m met in this call, for every q of the grid,
    and then looked up (rows with the same m share it)."""
    span = hi - lo + 1
    m_max = hi + (hi >> 1) + (hi >> 3) + (hi >> 4)
    cache = np.empty((max(m_max, 0) + 1, span), np.float64)
    filled = np.zeros(max(m_max, 0) + 1, np.bool_)
    for r in range(q.shape[0]):
        v = q[r, 0]
        for c in range(1, q.shape[1]):
            if q[r, c] > v:
                v = q[r, c]
        vi = np.int64(v)
        if vi < lo or vi > hi:
            return False
        m = vi + (vi >> 1) + (vi >> 3) + (vi >> 4)
        if m < 0:
            m = 0
        if not filled[m]:
            b = table[m]
            for i in range(span):
                qi = lo + i
                d = m - (qi + (qi >> 1) + (qi >> 3) + (qi >> 4))
                if d < 0:  # q above every row maximum with this m: never looked up
                    cache[m, i] = 0.0
                    continue
                a = table[d]
                f = floor_div_i64(INT32_MAX, a + b)
                cache[m, i] = np.float64(qi * ((a * f) >> (32 - SIGMOID_BITS))) * out_scale
            filled[m] = True
        for c in range(q.shape[1]):
            i = np.int64(q[r, c]) - lo
            if i < 0:
                return False
            out[r, c] = cache[m, i]
    return True


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
