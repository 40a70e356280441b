"""Dyadic requantization (``mnq_search.quant._dyadic``; ``dyadic`` lives in ``methods._intops``).

References are exact: Python ints and ``fractions.Fraction`` of the float64 ratio.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from mnq_search.methods import _intops
from mnq_search.integer import IntegerOverflowError
from mnq_search.quant import _dyadic, dyadic, dyadic_value, requantize

I64 = torch.int64
F64 = torch.float64


def random_ratios(n: int, lo: float = 1e-6, hi: float = 1e3) -> torch.Tensor:
    """Log-uniform ratios in [lo, hi] plus both ends and a few exact powers of two."""
    r = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(lo), math.log(hi)))
    return torch.cat([r, torch.tensor([lo, hi, 1.0, 0.5, 2.0**-19, 512.0, 0.1, 1 / 3], dtype=F64)])


def exact_requant(q: int, m: int, e: int, qmin: int, qmax: int) -> int:
    """clamp(floor(q * m / 2**e + 1/2)) with Python ints."""
    v = (q * m + (1 << (e - 1))) >> e if e > 0 else q * m
    return min(max(v, qmin), qmax)


def test_dyadic_is_the_one_from_intops():
    assert dyadic is _intops.dyadic
    assert _dyadic.dyadic is _intops.dyadic


def test_dyadic_relative_error_is_at_most_2_pow_minus_31():
    r = random_ratios(4000)
    m, e = dyadic(r)
    assert m.dtype == I64 and e.dtype == I64 and m.shape == r.shape and e.shape == r.shape
    assert (m >= 2**30).all() and (m <= 2**31).all()  # documented mantissa range
    assert (e >= 0).all()
    worst = 0.0
    for ri, mi, ei in zip(r.tolist(), m.tolist(), e.tolist()):
        rel = abs(Fraction(mi, 2**ei) - Fraction(ri)) / Fraction(ri)
        worst = max(worst, float(rel))
    assert worst <= 2.0**-31  # half a unit of a mantissa >= 2**30 (measured 4.63e-10 = 0.993 * 2**-31)
    assert torch.allclose(dyadic_value(m, e), r, rtol=2.0**-31, atol=0)


def test_dyadic_examples():
    m, e = dyadic(torch.tensor([1.0, 0.75, 2.0**-19, 3.0, 1000.0], dtype=F64))
    assert m.tolist() == [2**30, 3 * 2**29, 2**30, 3 * 2**29, round(1000 / 1024 * 2**31)]
    assert e.tolist() == [30, 31, 49, 29, 21]
    assert dyadic_value(m, e)[:4].tolist() == [1.0, 0.75, 2.0**-19, 3.0]  # exactly representable ratios are exact


def test_dyadic_keeps_signs_and_works_per_channel():
    r = random_ratios(300).view(-1, 2)
    sign = torch.where(torch.rand(r.shape) < 0.5, -1.0, 1.0).to(F64)
    rs = r * sign
    m, e = dyadic(rs)
    m_pos, e_pos = dyadic(r)
    assert m.shape == rs.shape and e.shape == rs.shape
    assert torch.equal(torch.sign(m).to(F64), sign)  # sign preserved
    assert torch.equal(m.abs(), m_pos) and torch.equal(e, e_pos)  # magnitude as for the positive ratio
    # per channel: each entry is decomposed exactly as on its own
    for i in range(0, rs.shape[0], 37):
        for j in range(rs.shape[1]):
            mi, ei = dyadic(rs[i, j])
            assert (mi.item(), ei.item()) == (m[i, j].item(), e[i, j].item())
    rel = ((dyadic_value(m, e) - rs).abs() / rs.abs()).max().item()
    assert rel <= 2.0**-31  # same bound for negative ratios


def test_dyadic_accepts_float32_and_large_ratios():
    m32, e32 = dyadic(torch.tensor([0.1, 7.5], dtype=torch.float32))
    m64, e64 = dyadic(torch.tensor([0.1, 7.5], dtype=torch.float32).double())
    assert torch.equal(m32, m64) and torch.equal(e32, e64)
    # ratios of 2**31 and more: e clamped to 0 and the excess folded into m
    m, e = dyadic(torch.tensor([2.0**31, 1.5 * 2.0**33, -(2.0**40)], dtype=F64))
    assert e.tolist() == [0, 0, 0]
    assert m.tolist() == [2**31, 3 * 2**32, -(2**40)]


def test_requantize_equals_the_exact_dyadic_rounding():
    rng = random.Random(0)
    r = random_ratios(200, 1e-6, 1e3)
    m, e = dyadic(r)
    for mi, ei, ri in zip(m.tolist(), e.tolist(), r.tolist()):
        # |q| < 2**31 / max(1, m / 2**30): the 64-bit product stays within 63 bits
        qmax_in = min(2**31 - 1, (2**62 - 1) // mi)
        qs = [rng.randint(-qmax_in, qmax_in) for _ in range(20)] + [0, 1, -1, qmax_in, -qmax_in]
        q = torch.tensor(qs, dtype=I64)
        out = requantize(q, torch.tensor(mi), torch.tensor(ei), -(2**31), 2**31 - 1)
        assert out.dtype == I64
        assert out.tolist() == [exact_requant(x, mi, ei, -(2**31), 2**31 - 1) for x in qs]
        # and within one unit of rounding with the true ratio (|q| r 2**-31 < 1/2 of dyadic error)
        for x, o in zip(qs, out.tolist()):
            if abs(Fraction(x) * Fraction(ri)) < 2**31:
                assert abs(o - math.floor(Fraction(x) * Fraction(ri) + Fraction(1, 2))) <= 1  # dyadic error < 1/2 unit


def test_requantize_is_half_up_and_clamps():
    m, e = torch.tensor(2**30), torch.tensor(31)  # ratio 1/2 exactly
    q = torch.tensor([5, -5, 3, -3, 1, -1, 0, 400, -400], dtype=I64)
    assert requantize(q, m, e, -128, 127).tolist() == [3, -2, 2, -1, 1, 0, 0, 127, -128]
    assert requantize(q.double(), m, e, -128, 127).tolist() == [3.0, -2.0, 2.0, -1.0, 1.0, 0.0, 0.0, 127.0, -128.0]
    assert requantize(q, m, e, 0, 255).tolist() == [3, 0, 2, 0, 1, 0, 0, 200, 0]


def test_requantize_paths_agree_per_channel():
    ratios = torch.tensor([3e-4, 0.02, 0.7, -0.3, 1.9, 17.0], dtype=F64)
    m, e = dyadic(ratios)
    q = torch.randint(-(2**15), 2**15, (50, 6), dtype=I64)  # 16-bit inputs keep q*m below 2**47
    q[0] = 2**15 - 1
    q[1] = -(2**15)
    for qmin, qmax in ((-128, 127), (-(2**31), 2**31 - 1), (-8, 7)):
        out_i = requantize(q, m, e, qmin, qmax)
        out_f = requantize(q.double(), m, e, qmin, qmax)
        assert out_i.dtype == I64 and out_f.dtype == F64
        assert torch.equal(out_f.to(I64), out_i) and torch.equal(out_f, torch.floor(out_f))
        expect = [[exact_requant(q[i, j].item(), m[j].item(), e[j].item(), qmin, qmax) for j in range(6)]
                  for i in range(q.shape[0])]
        assert out_i.tolist() == expect
    # against the float reference on the exact dyadic value: floor(q * m 2**-e + 1/2)
    ref = torch.floor(q.double() * dyadic_value(m, e) + 0.5)
    assert torch.equal(requantize(q, m, e, -(2**40), 2**40).double(), ref)


def test_requantize_checks_the_64_bit_product():
    m, e = dyadic(torch.tensor(1.0, dtype=F64))  # m = 2**30
    with pytest.raises(IntegerOverflowError, match="requantize product"):
        requantize(torch.tensor([2**32], dtype=I64), m, e, -128, 127)  # product 2**62
    ok = requantize(torch.tensor([2**32 - 1], dtype=I64), m, e, -(2**40), 2**40)
    assert ok.item() == 2**32 - 1  # largest q at ratio 1 whose product fits 63 bits


def test_requantize_tiny_ratio_integer_path_matches_float_path():
    # regression: for ratios below 2**-32 the decomposition used e >= 63, past what a 64-bit shift
    # can do; e is now capped at 62 and the excess folded into m
    m, e = dyadic(torch.tensor([2.0**-33], dtype=F64))
    assert e.item() == 62 and m.item() == 2**29
    q = torch.tensor([3], dtype=I64)
    exact = exact_requant(3, m.item(), e.item(), -128, 127)  # round(3 * 2**-33) = 0
    assert exact == 0
    assert requantize(q.double(), m, e, -128, 127).item() == 0  # the float-held path is right
    assert requantize(q, m, e, -128, 127).item() == exact  # the integer path gives 1
