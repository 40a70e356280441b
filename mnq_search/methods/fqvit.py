"""FQ-ViT's integer Softmax and LayerNorm (logarithm / power-of-two family).

Lin, Zhang, Sun, Li, Zhou, "FQ-ViT: Post-Training Quantization for Fully Quantized Vision
Transformer", IJCAI 2022. FQ-ViT has no integer GELU (it keeps GELU in float), so this family
registers no GELU. Facts from ``shared/spec/nonlinear-methods.md`` section 3.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quant import MinMaxObserver
from ..distributed import all_reduce_
from ._base import AffineLayerNorm, NonLinearMethod
from ..integer._compiled import HAVE_NUMBA, bitlen_i64, fast_enabled, floor_div_i64, isqrt_i64, jit
from ._fast import FastPlan, _exp_rows
from ._intops import (as_kind, bitlen, check_range, dyadic, exp_to_uint16, floor_div, i_exp, isqrt, round_div,
                      round_shr, shl, shr)
from ._registry import Family, register_family, register_method
from ._tables import TableSoftmax

LOG_BITS = 4  # FQ-ViT's default width of the log2 code


FAMILY = register_family(Family(
    name="fqvit", title="FQ-ViT", color="tab:green",
    paper="Lin, Zhang, Sun, Li, Zhou, FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer, "
          "IJCAI 2022",
    cost={"softmax": {"element": {"add": 11, "mul": 2, "shift": 7, "div": 2, "compare": 11, "lookup": 1}},
          "layernorm": {"element": {"add": 16, "mul": 5, "shift": 14, "div": 2, "compare": 12, "lookup": 1},
                        "row": {"add": 8, "mul": 2, "shift": 8, "div": 6, "compare": 29, "lookup": 1}}},
    # FQ-ViT keeps GELU in float; its log2 softmax builds on I-BERT's i-exp, so uniform:fqvit takes
    # the polynomial family's i-GELU, its closest integer relative
    stand_ins={"gelu": "ibert"},
))


@jit
def _log2_softmax_kernel(q, out, t0, lo1, t1, kmax, out_scale):
    """Log-Int-Softmax's row part per row (see :meth:`FQViTSoftmax.row_part`), int64 registers."""
    buf = np.empty(q.shape[1], np.int64)
    for r in range(q.shape[0]):
        total = _exp_rows(q, r, buf, t0, lo1, t1)
        if total < 0:
            return False
        for c in range(q.shape[1]):
            e16 = buf[c]
            e = e16 if e16 > 1 else 1
            t = floor_div_i64(2 * total + e, 2 * e)
            k = bitlen_i64(t) - 1
            p2k = np.int64(1) << k
            if 2 * (t - p2k) >= p2k:
                k += 1
            o = (np.int64(1) << (kmax - k)) if (e16 > 0 and k <= kmax) else 0
            out[r, c] = o * out_scale
    return True


@register_method("softmax", "fqvit")
class FQViTSoftmax(TableSoftmax):
    """Log-Int-Softmax: i-exp (as I-BERT), then probabilities rounded to powers of two.

    ``t = round(sum / exp)``, ``k = floor(log2 t)`` plus one if ``t - 2**k >= 2**(k-1)``;
    ``p = 2**-k`` for ``k <= 2**4 - 1 = 15``, else 0. The output integers are ``2**(15 - k)`` at
    scale 2**-15, so ``attn @ v`` reduces to shifts. Exponentials are shifted to 16 bits before
    the sum (the reference sums n = 30 exponentials in float). ``bits`` does not change the 4-bit
    log2 code (FQ-ViT's default), which already resolves probabilities down to 2**-15.
    Fast path: the 16-bit exponentials as a table of ``rowmax - q`` (:class:`._tables.TableSoftmax`).
    """

    def exp_part(self, q_rel, s_x, row_len):
        e, s_e, bound = i_exp(q_rel, s_x, s_max=self.exp_s_max)
        return exp_to_uint16(e, s_e, bound, row_len)[0]

    def row_part(self, e16):
        total = check_range(e16.sum(dim=-1, keepdim=True), "softmax sum")
        t = round_div(total, torch.clamp(e16, min=1))
        k = bitlen(t) - 1
        p2k = shl(torch.ones_like(k), k)
        k = k + (2 * (t - p2k) >= p2k).to(k.dtype)
        kmax = 2**LOG_BITS - 1
        return torch.where((e16 > 0) & (k <= kmax), shl(torch.ones_like(k), torch.clamp(kmax - k, min=0)),
                           torch.zeros_like(k))

    def out_scale(self):
        return 2.0 ** -(2**LOG_BITS - 1)

    def cpu_row_kernel(self):
        return _log2_softmax_kernel, lambda scale: (2**LOG_BITS - 1, scale)


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
    sum(x_q) / C)``, ``y = round((sign(A) M x_q + B) / 2**N)`` on an unsigned ``bits``-bit grid with a
    zero point: ``s_out = (max - min) / (2**bits - 1)``, ``y`` clamped to ``[-zp, 2**bits - 1 - zp]``.
    That is the grid of FQ-ViT's activation quantizers (unsigned min/max), which quantize the
    reference's output; an earlier version clamped to a symmetric signed grid and lost 2.3 dB at 8 and
    6 bits against the reference (BENCHMARKS.md section 1).
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
        errs = _ptf_errors_cpu(x, float(s8), float(zp), levels)
        if errs is None:
            xd = x.double().reshape(-1, x.shape[-1])
            errs = []
            for a in range(PTF_LEVELS):
                sc = s8 / 2 ** (PTF_LEVELS - 1 - a)
                u = torch.clamp(torch.floor(xd / sc + 0.5) + zp, 0, levels)
                errs.append(((xd - (u - zp) * sc) ** 2).sum(dim=0))
            errs = torch.stack(errs)
        alpha = all_reduce_(errs, "sum").argmin(dim=0)  # errors of the global batch
        if self.alpha.shape != alpha.shape:
            self.alpha = torch.zeros_like(alpha)
        self.alpha.copy_(alpha)

    def reset_calibration(self):
        self.in_observer.reset()
        self.out_observer.reset()
        self.alpha.zero_()

    def plan_state(self):
        bufs = (self.alpha, self.in_observer.min_val, self.in_observer.max_val, self.out_observer.min_val,
                self.out_observer.max_val)
        return tuple((b.data_ptr(), b._version) for b in bufs) + super().plan_state()

    def constants(self, s_x: float, channels: int, device) -> dict[str, torch.Tensor]:
        """The kernel's constants at input scale ``s_x`` (float64 / int64 tensors on ``device``):
        the PTF requantizer (dyadic ``m``, ``e``, zero point ``zp``, per-channel ``alpha``), the affine
        in fixed point (``g_fix`` = |gamma| / s_out * 2**eg, ``sign``, ``b_fix`` = beta / s_out * 2**31)
        and the output grid (scale ``s_out``, integers in ``[out_lo, out_hi]``)."""
        s8, zp = self._ptf_params(device)
        s1 = s8 / 2 ** (PTF_LEVELS - 1)
        m, e = dyadic(s_x / s1)  # s1 is a tensor (from the buffers), so (m, e) are too
        levels = 2**self.bits - 1
        lo = self.out_observer.min_val.double().to(device)
        s_out = torch.clamp(self.out_observer.max_val.double().to(device) - lo, min=1e-8) / levels
        zp_out = torch.clamp(torch.floor(-lo / s_out + 0.5), 0, levels)
        gamma = (self.weight.detach().double() if self.weight is not None
                 else torch.ones(channels, dtype=torch.float64, device=device))
        beta = (self.bias.detach().double() if self.bias is not None else torch.zeros_like(gamma))
        g = gamma.abs() / s_out
        eg = 23 - torch.floor(torch.log2(torch.clamp(g.max(), min=1e-30)))
        return dict(m=m, e=e, zp=zp, alpha=self.alpha, g_fix=torch.floor(g * torch.exp2(eg) + 0.5), eg=eg,
                    sign=torch.where(gamma < 0, -1.0, 1.0).to(torch.float64),
                    b_fix=torch.clamp(torch.floor(beta / s_out * 2.0**31 + 0.5), -(2.0**50), 2.0**50),
                    out_lo=-zp_out, out_hi=levels - zp_out, s_out=s_out)

    def kernel(self, q, s_x):
        channels = q.shape[-1]
        levels = 2**self.bits - 1
        consts = self.constants(s_x, channels, q.device)
        k = {name: as_kind(v, q) for name, v in consts.items() if name != "s_out"}
        alpha, zp = k["alpha"], k["zp"]
        u = round_shr(check_range(q * k["m"], "ptf product", bits=63), k["e"] + alpha)
        u = torch.clamp(u + zp, 0, levels)
        xq = shl(u - zp, alpha)  # integers at base s1
        sx = check_range(xq.sum(dim=-1, keepdim=True), "layernorm sum")
        sxx = check_range((xq * xq).sum(dim=-1, keepdim=True), "layernorm sum of squares", bits=63)
        d = torch.clamp(isqrt(channels * sxx - sx * sx), min=1)

        eg = k["eg"]
        t = floor_div(channels * k["g_fix"] * 2**14, d)  # |A| * 2**(eg + 14)
        log2_a = bitlen(t) - 1 - (eg + 14)
        n = torch.clamp(7 - log2_a, 0, N_MAX)
        sh = eg + 14 - n
        mult = torch.where(sh >= 0, shr(t, torch.clamp(sh, min=0)), shl(t, torch.clamp(-sh, min=0)))
        mult = torch.clamp(mult, 0, 2**M_BITS - 1)
        sign = k["sign"]
        b = round_shr(k["b_fix"], 31 - n) - round_div(sign * mult * sx, channels)
        acc = check_range(sign * mult * xq + check_range(b, "layernorm affine bias"), "layernorm affine")
        y = torch.clamp(round_shr(acc, n), k["out_lo"], k["out_hi"])
        return y, consts["s_out"].reshape(())

    def fast_plan(self, s_x, row_len, device):
        k = self.constants(s_x, row_len, device)
        ints = {name: k[name].cpu().numpy().astype(np.int64) for name in ("alpha", "g_fix", "sign", "b_fix")}
        head = (int(k["m"]), int(k["e"]), int(k["zp"]), 2**self.bits - 1, ints["alpha"], ints["g_fix"],
                int(k["eg"]), ints["sign"], ints["b_fix"], int(k["out_lo"]), int(k["out_hi"]))
        s_out = k["s_out"].reshape(())
        return FastPlan(s_out, _ptf_layernorm_kernel, head + (float(s_out),), lambda: head + (1.0,))


@jit
def _ptf_layernorm_kernel(q, out, m, e, zp, levels, alpha, g_fix, eg, sign, b_fix, qmin, qmax, s_out):
    """:meth:`FQViTLayerNorm.kernel` per row in int64 registers (the same steps, fused)."""
    channels = q.shape[1]
    xq = np.empty(channels, np.int64)
    for r in range(q.shape[0]):
        sx = 0
        sxx = 0
        for c in range(channels):
            k = e + alpha[c]
            a = np.int64(q[r, c]) * m
            u = a if k <= 0 else (a + (np.int64(1) << (k - 1))) >> k
            u = min(max(u + zp, 0), levels)
            x = (u - zp) << alpha[c]
            xq[c] = x
            sx += x
            sxx += x * x
        d = isqrt_i64(channels * sxx - sx * sx)
        if d < 1:
            d = 1
        for c in range(channels):
            t = floor_div_i64(channels * g_fix[c] * 16384, d)
            n = 7 - (bitlen_i64(t) - 1 - (eg + 14))
            n = min(max(n, 0), N_MAX)
            sh = eg + 14 - n
            mult = (t >> sh) if sh >= 0 else (t << -sh)
            mult = min(max(mult, 0), 2**M_BITS - 1)
            kb = 31 - n
            bb = (b_fix[c] + (np.int64(1) << (kb - 1))) >> kb
            bb -= floor_div_i64(2 * (sign[c] * mult * sx) + channels, 2 * channels)
            acc = sign[c] * mult * xq[c] + bb
            y = acc if n <= 0 else (acc + (np.int64(1) << (n - 1))) >> n
            out[r, c] = np.float64(min(max(y, qmin), qmax)) * s_out
    return True


@jit
def _ptf_errors_kernel(x, s8, zp, levels, errs):
    """Per level a and channel c: sum over rows of (x - (u - zp) s_a)**2 with s_a = s8 / 2**(3 - a),
    u = clamp(round(x / s_a) + zp, 0, levels) (float64, rows summed in order)."""
    for a in range(PTF_LEVELS):
        sc = s8 / 2.0 ** (PTF_LEVELS - 1 - a)
        for r in range(x.shape[0]):
            for c in range(x.shape[1]):
                xd = np.float64(x[r, c])
                u = min(max(np.floor(xd / sc + 0.5) + zp, 0.0), levels)
                d = xd - (u - zp) * sc
                errs[a, c] += d * d


def _ptf_errors_cpu(x: torch.Tensor, s8: float, zp: float, levels: int) -> torch.Tensor | None:
    """The PTF search's squared errors (PTF_LEVELS, C) in one compiled pass (CPU); None elsewhere."""
    if not (HAVE_NUMBA and fast_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel()):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    errs = torch.zeros(PTF_LEVELS, x2.shape[1], dtype=torch.float64)
    _ptf_errors_kernel(x2.numpy(), s8, zp, float(levels), errs.numpy())
    return errs
