"""A data-fitted polynomial GELU (IPTQ-ViT's approximation functions fitted to vision data).

Kim, Lee, Kim, "IPTQ-ViT", WACV 2026 (code not released; the issue's summary is the source). The
family has a GELU only; ``uniform:polyfit`` takes I-BERT's softmax and LayerNorm.

**The form.** ``GELU(x) = x/2 (1 + erf(x / sqrt 2))`` with, for ``u = x / sqrt 2``,

    erf(u) ~ sign(u) clamp(E(t), 0, 1),   t = min(|u|, c) - c  (in [-c, 0]),
    E(t) = 1 + a2 t**2 + a3 t**3 + a4 t**4   (``degree=4``, the default)
    E(t) = 1 + a2 t**2                      (``degree=2``: I-BERT's clipped square form)

I-BERT's i-GELU is the degree-2 form with fixed ``c = 1.769, a2 = -0.2888``. Both forms keep
``E = 1`` with zero slope at the clipping point ``|u| = c`` (erf saturates smoothly), so raising the
degree adds freedom where the square is worst, near ``u = 0`` and the knee, without a new
constant for the saturated tail. Measured (``tests/test_polyfit.py``, ``BENCHMARKS.md`` section 1):
fitted degree 2 already beats I-BERT's coefficients on the calibrated range, and degree 4 beats it
by a further margin; both are offered per slot (``degree``, a search variable).

**The fit.** Per slot, on calibration data: the input's integers ``k`` on the slot's grid (scale
``s``) are counted (``|k|``, up to ``2**(bits-1)``); the coefficients ``(c, a2, a3, a4)`` minimise
``sum_k n_k (x_k / 2)**2 (E(t_k) - erf(u_k))**2`` (``x_k = k s``; SciPy ``least_squares``, from
I-BERT's values): the mean squared error of the GELU *output* over the inputs the data actually
produces, so values the data never reaches do not count. Before calibration (and in a module that
never saw data) the coefficients are I-BERT's.

**Integer evaluation** (dyadic constants like I-BERT's): the input integers ``q`` at scale ``S``
(prescaled into ``[2**-10, 1]`` as for I-BERT), ``S_u = S / sqrt 2``,
``t`` on a grid ``S_t = S_u / 2**g`` no coarser than ``2**-10`` (``|q| << g``, exact; I-BERT clips
at ``floor(b / S_u)`` on the input grid, which moves ``c`` by up to a step: 8 % at 6 bits),
``Q_c = round(c / S_t)``, ``t = min(|q| << g, Q_c) - Q_c``, ``S_t ~ m 2**-e`` (15-bit ``m``); Horner
with ``F = min(16, 22 - bitlen(max |q|))`` fraction bits (14 for an 8-bit input): ``acc = A_n``, then
``acc = round((acc t m) / 2**e) + A_j`` down to ``j = 0`` (``A_j = round(a_j 2**F)``, ``A_1 = 0``,
``A_0 = 2**F``); ``erf = sign(q) clamp(acc, 0, 2**F)``; ``out = q (2**F + erf)`` at scale
``S 2**-F / 2``. Products stay below 2**63 and the output below 2**23, so the dequantized output is
exact in float32 (checked on the integer path).
Fast path: the whole kernel as a table over the input grid (:func:`._tables.elementwise_plan`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..distributed import all_reduce_
from ._base import NonLinearMethod
from ._intops import check_range, prescale, round_shr, shl
from ._registry import Family, register_family, register_method
from ._tables import elementwise_plan
from .ibert import ERF_A, ERF_B, GELU_S_RANGE

FRACTION_BITS = 16  # at most: fewer where the input grid is wide, so that |out| < 2**23
OUTPUT_BITS = 24  # signed: |out| < 2**23, exact in float32 (and after any dequantizing product)
MULTIPLIER_BITS = 15
T_GRID = 2.0**-10  # the coarsest grid of t (an exact left shift of the input integers)
SAMPLES_PER_BATCH = 1 << 16
SAMPLES_KEPT = 1 << 18
IBERT_COEF = (-ERF_B, ERF_A, 0.0, 0.0)  # (c, a2, a3, a4) of I-BERT's i-GELU

FAMILY = register_family(Family(
    name="polyfit", title="Polyfit GELU", color="tab:brown",
    paper="Kim, Lee, Kim, IPTQ-ViT (data-fitted polynomial GELU), WACV 2026",
    # per element (degree 4): |q| and the clip (2 compare), t (1 add), Horner: 3 steps of 2 mul,
    # 1 rounding add + 1 shift and 1 add of the coefficient, the clamp (2 compare), the sign and
    # 1 + erf (1 compare, 1 add), the output product (1 mul)
    cost={"gelu": {"element": {"add": 8, "mul": 7, "shift": 3, "compare": 5}}},
    stand_ins={"softmax": "ibert", "layernorm": "ibert"},
))


def erf_poly(u: np.ndarray, coef, degree: int) -> np.ndarray:
    """The float form ``sign(u) clamp(E(min(|u|, c) - c), 0, 1)`` (see the module docstring)."""
    c, a2, a3, a4 = coef
    t = np.minimum(np.abs(u), c) - c
    e = 1 + a2 * t**2 + ((a3 * t**3 + a4 * t**4) if degree == 4 else 0)
    return np.sign(u) * np.clip(e, 0.0, 1.0)


def fit_erf(x: np.ndarray, weights: np.ndarray, degree: int) -> tuple[float, float, float, float]:
    """Coefficients ``(c, a2, a3, a4)`` minimising ``sum w (x/2)**2 (erf_poly - erf)**2`` over the
    points ``x`` (SciPy least squares from I-BERT's values; ``a3 = a4 = 0`` for degree 2)."""
    from scipy.optimize import least_squares
    from scipy.special import erf

    u = x / math.sqrt(2.0)
    target = erf(u)
    scale = np.sqrt(weights) * np.abs(x) / 2

    def residual(theta):
        coef = tuple(theta) + (0.0,) * (4 - len(theta))
        return scale * (erf_poly(u, coef, degree) - target)

    theta0 = np.array(IBERT_COEF[: 2 if degree == 2 else 4])
    lo = [0.5] + [-8.0] * (len(theta0) - 1)
    hi = [6.0] + [8.0] * (len(theta0) - 1)
    sol = least_squares(residual, theta0, bounds=(lo, hi), method="trf", x_scale="jac")
    coef = tuple(float(v) for v in sol.x) + (0.0,) * (4 - len(sol.x))
    if (residual(sol.x[: len(theta0)]) ** 2).sum() > (residual(theta0) ** 2).sum():
        return IBERT_COEF  # never worse than the starting point
    return coef


@register_method("gelu", "polyfit")
class PolyfitGELU(NonLinearMethod):
    """Data-fitted polynomial GELU (see the module docstring).

    Args:
        degree: 4 (``1 + a2 t**2 + a3 t**3 + a4 t**4``) or 2 (I-BERT's form, fitted ``c`` and ``a2``).
    """

    PARAMS = {"degree": (4, 2)}

    def __init__(self, bits: int = 8, float_module=None, fine_grid: bool = False, degree: int = 4):
        super().__init__(bits, float_module, fine_grid)
        self.degree = int(degree)
        self.register_buffer("coef", torch.tensor(IBERT_COEF, dtype=torch.float64))
        self._samples: list[torch.Tensor] = []

    # --- the kernel ----------------------------------------------------------------------------
    def _constants(self, s_x: float):
        _, s = prescale(torch.ones((), dtype=torch.float64), s_x, GELU_S_RANGE[0], GELU_S_RANGE[1])
        s_u = s / math.sqrt(2.0)
        g = max(0, math.ceil(math.log2(s_u / T_GRID)))  # |q| << g: t on a grid no coarser than T_GRID
        s_t = s_u / 2.0**g
        frac, exp = math.frexp(s_t)
        m = int(math.floor(frac * 2**MULTIPLIER_BITS + 0.5))
        e = MULTIPLIER_BITS - exp
        c, *a = (float(v) for v in self.coef)
        q_c = max(1, int(math.floor(c / s_t + 0.5)))
        qmax = 2 ** (self.in_bits - 1) * max(1, round(s_x / s))  # the largest |q| after the prescale
        frac_bits = min(FRACTION_BITS, OUTPUT_BITS - 2 - qmax.bit_length())
        coeffs = [2**frac_bits, 0] + [int(math.floor(v * 2**frac_bits + 0.5)) for v in a]
        return s, g, m, e, q_c, coeffs[: self.degree + 1], frac_bits

    def float32_exact(self, s_x):
        return False

    def kernel(self, q, s_x):
        q, s = prescale(q, s_x, *GELU_S_RANGE)
        _, g, m, e, q_c, coeffs, frac_bits = self._constants(s_x)
        t = torch.clamp(shl(q.abs(), g), max=q_c) - q_c
        acc = torch.full_like(q, coeffs[-1])
        for a_j in reversed(coeffs[:-1]):
            prod = check_range(acc * t * m, "polyfit gelu product", bits=63)
            acc = round_shr(prod, e) + a_j
        erf = torch.sign(q) * torch.clamp(acc, 0, 2**frac_bits)
        out = check_range(q * (2**frac_bits + erf), "polyfit gelu output", bits=OUTPUT_BITS)
        return out, s * 2.0**-frac_bits / 2


    def float_op(self, x):
        return F.gelu(x)

    def fast_plan(self, s_x, row_len, device):
        return elementwise_plan(self, s_x, device)

    def plan_state(self):
        return (self.degree, tuple(float(v) for v in self.coef))

    # --- the fit -------------------------------------------------------------------------------
    def observe(self, x, s_x):
        flat = x.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_BATCH)
        self._samples.append(flat[::step].abs().double().cpu())
        while sum(t.numel() for t in self._samples) > SAMPLES_KEPT and len(self._samples) > 1:
            self._samples.pop(0)
        s = float(s_x)
        kmax = 2 ** (self.in_bits - 1)
        k = torch.clamp(torch.floor(torch.cat(self._samples) / s + 0.5), 0, kmax).long()
        counts = all_reduce_(torch.bincount(k, minlength=kmax + 1).double().to(self.coef.device), "sum").cpu()
        seen = counts.nonzero().flatten()
        if seen.numel() < 2:
            return
        pts = torch.arange(int(seen.max()) + 1, dtype=torch.float64)
        coef = fit_erf((pts * s).numpy(), (counts[: pts.numel()] / counts.sum()).numpy(), self.degree)
        self.coef.copy_(torch.tensor(coef, dtype=torch.float64))

    def reset_calibration(self):
        self.coef.copy_(torch.tensor(IBERT_COEF, dtype=torch.float64))
        self._samples = []

    def extra_repr(self):
        return super().extra_repr() + f", degree={self.degree}"
