"""The data-fitted polynomial GELU (issue 13): before calibration it is I-BERT's form, the fit beats
I-BERT's fixed coefficients on the range the data covers (degree 2 already, degree 4 more), and the
integer kernel keeps what the float fit promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from mnq_search.methods import make_nonlinear
from mnq_search.methods.polyfit import IBERT_COEF, erf_poly, fit_erf
from mnq_search.testing import gelu_inputs, sqnr_db


def calibrated(method, bits, x, s, **params):
    mod = make_nonlinear("gelu", method, bits, **params)
    mod.train()
    mod(x, s)
    return mod.eval()


def test_uncalibrated_is_ibert_and_reset_goes_back():
    mod = make_nonlinear("gelu", "polyfit", 8, degree=2)
    assert tuple(mod.coef.tolist()) == IBERT_COEF == (1.769, -0.2888, 0.0, 0.0)
    x, s = gelu_inputs(bits=8, seed=0)
    calibrated_mod = calibrated("polyfit", 8, x, s, degree=2)
    assert tuple(calibrated_mod.coef.tolist()) != IBERT_COEF
    calibrated_mod.reset_calibration()
    assert tuple(calibrated_mod.coef.tolist()) == IBERT_COEF


def test_the_fit_beats_ibert_coefficients_on_the_weighted_range():
    rng = np.random.default_rng(0)
    x = np.round(np.concatenate([rng.normal(-0.5, 1.0, 20000), rng.laplace(0, 3, 1000)]) / 0.05) * 0.05
    k, counts = np.unique(np.abs(x), return_counts=True)
    w = counts / counts.sum()

    def loss(coef, degree):
        u = k / math.sqrt(2)
        return float((w * (k / 2) ** 2 * (erf_poly(u, coef, degree) - erf(u)) ** 2).sum())

    fit2, fit4 = fit_erf(k, w, 2), fit_erf(k, w, 4)
    assert fit2[2:] == (0.0, 0.0)
    assert loss(fit2, 2) < 0.9 * loss(IBERT_COEF, 2)
    assert loss(fit4, 4) < 0.5 * loss(fit2, 2)


@pytest.mark.parametrize("bits, margin_db", [(8, 2.0), (6, 2.0), (4, 5.0)])
def test_fitted_integer_gelu_beats_ibert_on_realistic_inputs(bits, margin_db):
    """Output SQNR against the float GELU of the same quantized input (integer path). Measured on
    this input on 2026-11-30: 8 bits I-BERT 35.3, degree 2 41.5, degree 4 52.0 dB; 6 bits 20.8, 49.7,
    49.7; 4 bits 29.1, 78.3, 78.3 (at 6 and 4 bits the input grid is coarse enough that both fits are
    nearly exact)."""
    x, s = gelu_inputs(bits=bits, seed=1)
    ref = torch.nn.functional.gelu(x.double())
    q = torch.round(x / s).long()

    def db(mod):
        out, s_y = mod.forward_int(q, s)
        return sqnr_db(ref, out.double() * s_y)

    ibert = db(calibrated("ibert", bits, x, s))
    deg2 = db(calibrated("polyfit", bits, x, s, degree=2))
    deg4 = db(calibrated("polyfit", bits, x, s, degree=4))
    assert deg2 > ibert + margin_db / 2
    assert deg4 > ibert + margin_db
    if bits == 8:
        assert deg4 > deg2 + 5.0


def test_degree_is_a_declared_parameter():
    mod = make_nonlinear("gelu", "polyfit", 8)
    assert mod.degree == 4 and type(mod).PARAMS == {"degree": (4, 2)}
