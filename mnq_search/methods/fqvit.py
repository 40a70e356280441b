"""FQ-ViT's integer Softmax and LayerNorm (logarithm / power-of-two family).

Lin, Zhang, Sun, Li, Zhou, "FQ-ViT: Post-Training Quantization for Fully Quantized Vision
Transformer", IJCAI 2022. FQ-ViT has no integer GELU (it keeps GELU in float), so this family
registers no GELU. Facts from ``shared/spec/nonlinear-methods.md`` section 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant._fake_quant import qrange, symmetric_scale
from ..quant._observer import MinMaxObserver
from ..distributed import all_reduce_
from ._base import AffineLayerNorm, NonLinearMethod
from ._intops import (as_kind, bitlen, check_range, dyadic, exp_to_uint16, floor_div, i_exp, isqrt, round_div,
                      round_shr, shl, shr)
from ._registry import register_method

LOG_BITS = 4  # FQ-ViT's default width of the log2 code


@register_method("softmax", "fqvit")
class FQViTSoftmax(NonLinearMethod):
    """Log-Int-Softmax: i-exp (as I-BERT), then probabilities rounded to powers of two.

    ``t = round(sum / exp)``, ``k = floor(log2 t)`` plus one if ``t - 2**k >= 2**(k-1)``;
    ``p = 2**-k`` for ``k <= 2**4 - 1 = 15``, else 0. The output integers are ``2**(15 - k)`` at
    scale 2**-15, so ``attn @ v`` reduces to shifts. Exponentials are shifted to 16 bits before
    the sum (the reference sums n = 30 exponentials in float). ``bits`` does not change the 4-bit
    log2 code (FQ-ViT's default), which already resolves probabilities down to 2**-15.
    """

    def kernel(self, q, s_x):
        q = q - q.amax(dim=-1, keepdim=True)
        e, s_e, bound = i_exp(q, s_x, s_max=self.exp_s_max)
        e16, _ = exp_to_uint16(e, s_e, bound, q.shape[-1])
        total = check_range(e16.sum(dim=-1, keepdim=True), "softmax sum")
        t = round_div(total, torch.clamp(e16, min=1))
        k = bitlen(t) - 1
        p2k = shl(torch.ones_like(k), k)
        k = k + (2 * (t - p2k) >= p2k).to(k.dtype)
        kmax = 2**LOG_BITS - 1
        out = torch.where((e16 > 0) & (k <= kmax), shl(torch.ones_like(k), torch.clamp(kmax - k, min=0)),
                          torch.zeros_like(k))
        return out, 2.0**-kmax

    def float_op(self, x):
        return torch.softmax(x, dim=-1)


PTF_LEVELS = 4  # alpha in {0, 1, 2, 3}: channel scales s1 * 2**alpha, s1 = s8 / 8
M_BITS = 8      # width of the folded affine multiplier
N_MAX = 22      # largest shift of the folded affine (the reference allows 31; 22 keeps B in int32)


@register_method("layernorm", "fqvit")
class FQViTLayerNorm(AffineLayerNorm):
    """Power-of-two-factor (PTF) input quantization, integer statistics, folded integer affine.

    Input: the 16-bit residual grid is requantized (dyadic multiplier plus a per-channel shift) to
    unsigned ``bits``-bit codes with one layer-wise zero point and channel scales ``s1 * 2**alpha_c``
    (``s1 = s8 / 8``, ``s8 = (max - min) / (2**bits - 1)``); ``alpha_c`` minimizes each channel's
    L2 error in ``train()`` mode (calibration), and is frozen in ``eval()``.

    Statistics on ``x_q`` (integers at base ``s1``): ``D = isqrt(C sum x_q**2 - (sum x_q)**2)``
    (= C sigma / s1; the reference takes a float sqrt with no guard, D = 0 gives inf; here D >= 1).
    Affine: ``A_c = (C / D) gamma_c / s_out`` is formed in fixed point, ``N = clamp(7 - floor(log2|A|),
    0, 22)``, ``M = clamp(floor(|A| 2**N), 0, 255)``, ``B = round(beta 2**N / s_out) - round(sign(A) M
    sum(x_q) / C)``, ``y = round((sign(A) M x_q + B) / 2**N)``, clamped to signed ``bits`` at ``s_out``.
    ``s_out`` comes from the module's own output observer (the reference borrows the next
    quantizer's scale). The sums of squares are 64-bit (they pass 2**31 for C >= 512).
    """

    def __init__(self, bits: int = 8, float_module: nn.Module | None = None, fine_grid: bool = False):
        super().__init__(bits, float_module, fine_grid)
        channels = self.weight.shape[0] if self.weight is not None else 0
        self.in_observer = MinMaxObserver()
        self.out_observer = MinMaxObserver()
        self.register_buffer("alpha", torch.zeros(channels, dtype=torch.int64))

    def _ptf_params(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        levels = 2**self.bits - 1
        lo = self.in_observer.min_val.double().to(device)
        hi = self.in_observer.max_val.double().to(device)
        s8 = torch.clamp(hi - lo, min=1e-8) / levels
        zp = torch.clamp(torch.floor(-lo / s8 + 0.5), 0, levels)
        return s8, zp

    def observe(self, x, s_x):
        self.in_observer.update(x)
        self.out_observer.update(F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps))
        s8, zp = self._ptf_params(x.device)
        levels = 2**self.bits - 1
        xd = x.double().reshape(-1, x.shape[-1])
        errs = []
        for a in range(PTF_LEVELS):
            sc = s8 / 2 ** (PTF_LEVELS - 1 - a)
            u = torch.clamp(torch.floor(xd / sc + 0.5) + zp, 0, levels)
            errs.append(((xd - (u - zp) * sc) ** 2).sum(dim=0))
        alpha = all_reduce_(torch.stack(errs), "sum").argmin(dim=0)  # errors of the global batch
        if self.alpha.shape != alpha.shape:
            self.alpha = torch.zeros_like(alpha)
        self.alpha.copy_(alpha)

    def kernel(self, q, s_x):
        channels = q.shape[-1]
        levels = 2**self.bits - 1
        s8, zp = self._ptf_params(q.device)
        s1 = s8 / 2 ** (PTF_LEVELS - 1)
        m, e = dyadic(s_x / s1)  # s1 is a tensor (from the buffers), so (m, e) are too
        alpha = as_kind(self.alpha, q)
        zp = as_kind(zp, q)
        u = round_shr(check_range(q * as_kind(m, q), "ptf product", bits=63), as_kind(e, q) + alpha)
        u = torch.clamp(u + zp, 0, levels)
        xq = shl(u - zp, alpha)  # integers at base s1
        sx = check_range(xq.sum(dim=-1, keepdim=True), "layernorm sum")
        sxx = check_range((xq * xq).sum(dim=-1, keepdim=True), "layernorm sum of squares", bits=63)
        d = torch.clamp(isqrt(channels * sxx - sx * sx), min=1)

        qmin, qmax = qrange(self.bits)
        s_out = symmetric_scale(self.out_observer.absmax(), self.bits).double().to(q.device)
        gamma = (self.weight.detach().double() if self.weight is not None
                 else torch.ones(channels, dtype=torch.float64, device=q.device))
        beta = (self.bias.detach().double() if self.bias is not None else torch.zeros_like(gamma))
        g = gamma.abs() / s_out
        eg = 23 - torch.floor(torch.log2(torch.clamp(g.max(), min=1e-30)))
        g_fix = as_kind(torch.floor(g * torch.exp2(eg) + 0.5), q)  # |gamma| / s_out in fixed point
        eg = as_kind(eg, q)
        t = floor_div(channels * g_fix * 2**14, d)  # |A| * 2**(eg + 14)
        log2_a = bitlen(t) - 1 - (eg + 14)
        n = torch.clamp(7 - log2_a, 0, N_MAX)
        sh = eg + 14 - n
        mult = torch.where(sh >= 0, shr(t, torch.clamp(sh, min=0)), shl(t, torch.clamp(-sh, min=0)))
        mult = torch.clamp(mult, 0, 2**M_BITS - 1)
        sign = as_kind(torch.where(gamma < 0, -1.0, 1.0), q)
        b_fix = as_kind(torch.clamp(torch.floor(beta / s_out * 2.0**31 + 0.5), -(2.0**50), 2.0**50), q)
        b = round_shr(b_fix, 31 - n) - round_div(sign * mult * sx, channels)
        acc = check_range(sign * mult * xq + check_range(b, "layernorm affine bias"), "layernorm affine")
        y = torch.clamp(round_shr(acc, n), qmin, qmax)
        return y, s_out.reshape(())
