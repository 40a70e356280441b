"""Integer kernels of ``mnq_search.methods._intops``.

Every kernel is checked three ways: against an exact Python-int reference on the integer path
(int64), for bit-identical integers on the float-held path (float64 holding integers), and on
edge inputs (zero, negatives, powers of two, values near 2**31 and, where documented, 2**62).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from mnq_search.methods import _intops as io
from mnq_search.methods._intops import (IntegerOverflowError, bitlen, check_range, exp_to_uint16, floor_div, i_exp,
                                        isqrt, ln_affine_bias, ln_center, ln_headroom, ln_normalize, mul_shr,
                                        prescale, round_div, round_shr, shift_exp, shl, shr)

I64 = torch.int64
F64 = torch.float64

EDGE32 = [0, 1, -1, 2, -2, 3, -3, 5, -5, 7, -7, 255, -256, 2**16, -(2**16), 2**30, -(2**30),
          2**31 - 2, 2**31 - 1, -(2**31) + 1, -(2**31)]


# --- helpers ------------------------------------------------------------------------------------

def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I64)


def held(t: torch.Tensor) -> torch.Tensor:
    """The float-held copy of an integer tensor (exact below 2**53)."""
    return t.to(F64)


def assert_same_ints(r_int: torch.Tensor, r_float: torch.Tensor) -> None:
    """The integer path gives int64, the float-held path float64 holding exactly the same integers."""
    assert not r_int.is_floating_point()
    assert r_float.dtype == F64
    assert torch.equal(r_float, torch.floor(r_float)), "float-held result is not integer-valued"
    assert torch.equal(r_float.to(I64), r_int)


def rand_ints(lo: int, hi: int, n: int) -> torch.Tensor:
    """n uniform integers in [lo, hi] (int64)."""
    return torch.randint(lo, hi + 1, (n,), dtype=I64)


def log_uniform(max_bits: int, n: int, rng: random.Random) -> list[int]:
    """n positive ints whose bit length is uniform in 1..max_bits (covers every magnitude)."""
    out = []
    for _ in range(n):
        b = rng.randint(1, max_bits)
        out.append(rng.randrange(2 ** (b - 1), 2**b))
    return out


# --- check_range --------------------------------------------------------------------------------

def test_check_range_accepts_the_exact_bounds_and_returns_the_tensor():
    t = ints([-(2**31), 0, 2**31 - 1])
    assert check_range(t, "x") is t
    u = ints([0, 2**32 - 1])
    assert check_range(u, "u", bits=32, signed=False) is u
    w = ints([-(2**62), 2**62 - 1])
    assert check_range(w, "w", bits=63) is w
    assert check_range(ints([-8, 7]), "b4", bits=4) is not None
    empty = torch.zeros(0, dtype=I64)
    assert check_range(empty, "empty").numel() == 0


@pytest.mark.parametrize("values, bits, signed", [
    ([2**31], 32, True),
    ([-(2**31) - 1], 32, True),
    ([0, 2**31 - 1, 2**31], 32, True),
    ([-1], 32, False),
    ([2**32], 32, False),
    ([2**62], 63, True),
    ([-(2**62) - 1], 63, True),
    ([8], 4, True),
    ([-9], 4, True),
])
def test_check_range_raises_on_the_integer_path(values, bits, signed):
    with pytest.raises(IntegerOverflowError, match="leave the"):
        check_range(ints(values), "reg", bits=bits, signed=signed)
    assert issubclass(IntegerOverflowError, ArithmeticError)


def test_check_range_is_a_no_op_on_float_tensors():
    t = torch.tensor([1e30, -1e30, 2.0**40], dtype=F64)
    assert check_range(t, "x") is t
    assert check_range(t, "x", bits=8, signed=False) is t
    t32 = torch.tensor([2.0**31, -1.0])
    assert check_range(t32, "x", bits=32, signed=False) is t32
    assert torch.equal(t32, torch.tensor([2.0**31, -1.0]))


# --- floor_div / round_div --------------------------------------------------------------------------

def test_floor_div_matches_python_on_both_paths():
    a = torch.cat([rand_ints(-(2**40), 2**40, 3000), ints(EDGE32)])
    b = rand_ints(-(2**20), 2**20, a.numel())
    b = torch.where(b == 0, torch.ones_like(b), b)
    b[:len(EDGE32)] = ints([1, -1, 2, -2, 3, -3, 7, 2**31 - 1, -(2**31), 2**30, 5, -5, 2, 2, 3, 3, 1, -1, 2, -7, 2**16])
    expect = ints([x // y for x, y in zip(a.tolist(), b.tolist())])
    r_int = floor_div(a, b)
    assert torch.equal(r_int, expect)
    assert_same_ints(r_int, floor_div(held(a), held(b)))


def test_floor_div_with_python_int_operands():
    b = ints([1, 2, 3, -3, 7, -7, 2**31 - 1])
    assert floor_div(2**31, b).tolist() == [2**31 // y for y in b.tolist()]
    assert_same_ints(floor_div(2**31, b), floor_div(2**31, held(b)))
    a = ints(EDGE32)
    assert floor_div(a, 3).tolist() == [x // 3 for x in EDGE32]
    assert floor_div(a, -4).tolist() == [x // -4 for x in EDGE32]
    assert_same_ints(floor_div(a, 3), floor_div(held(a), 3))
    # float path stays exact up to |a| < 2**52
    big = ints([2**52 - 1, -(2**52) + 1, 2**52 - 3])
    assert_same_ints(floor_div(big, 7), floor_div(held(big), 7))
    assert floor_div(big, 7).tolist() == [x // 7 for x in big.tolist()]


def test_round_div_is_half_up():
    assert round_div(ints([5]), 2).item() == 3
    assert round_div(ints([-5]), 2).item() == -2
    assert round_div(ints([5, -5, 7, -7, 1, -1, 4, 5, -4, -5, 0]), ints([2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 9])).tolist() == \
        [3, -2, 4, -3, 1, 0, 1, 2, -1, -2, 0]
    assert round_div(held(ints([5, -5, 3, -3])), 2).tolist() == [3.0, -2.0, 2.0, -1.0]


def test_round_div_matches_exact_half_up_on_both_paths():
    a = torch.cat([rand_ints(-(2**40), 2**40, 3000), ints(EDGE32)])
    b = rand_ints(1, 2**20, a.numel())
    b[::7] = 2  # many exact ties
    expect = [(2 * x + y) // (2 * y) for x, y in zip(a.tolist(), b.tolist())]
    # the same thing from first principles: floor(a/b + 1/2) with exact rationals
    exact = [math.floor(Fraction(x, y) + Fraction(1, 2)) for x, y in zip(a.tolist()[:500], b.tolist()[:500])]
    assert expect[:500] == exact
    r_int = round_div(a, b)
    assert r_int.tolist() == expect
    assert_same_ints(r_int, round_div(held(a), held(b)))
    assert_same_ints(round_div(a, 192), round_div(held(a), 192))


# --- shifts -------------------------------------------------------------------------------------

def test_shr_is_floor_division_by_a_power_of_two():
    a = torch.cat([rand_ints(-(2**51), 2**51, 2000), ints(EDGE32)])
    for k in (0, 1, 2, 5, 16, 31, 40, 51):
        r = shr(a, k)
        assert r.tolist() == [x >> k for x in a.tolist()]
        assert_same_ints(r, shr(held(a), k))
    kt = rand_ints(0, 51, a.numel())
    r = shr(a, kt)
    assert r.tolist() == [x >> k for x, k in zip(a.tolist(), kt.tolist())]
    assert_same_ints(r, shr(held(a), held(kt)))
    assert_same_ints(r, shr(held(a), kt))
    assert shr(ints([-1, -2, -3, 1]), 1).tolist() == [-1, -1, -2, 0]


def test_shr_near_2_62():
    a = ints([2**62 - 1, 2**62, -(2**62), 2**62 + 12345, 2**63 - 1])
    for k in (0, 1, 31, 61, 62):
        assert shr(a, k).tolist() == [x >> k for x in a.tolist()]
    assert shr(a, ints([62] * 5)).tolist() == [x >> 62 for x in a.tolist()]


def test_shl_is_multiplication_by_a_power_of_two():
    a = torch.cat([rand_ints(-(2**20), 2**20, 2000), ints([0, 1, -1, 3, -(2**20)])])
    for k in (0, 1, 7, 31, 32):
        r = shl(a, k)
        assert r.tolist() == [x << k for x in a.tolist()]
        assert_same_ints(r, shl(held(a), k))
    kt = rand_ints(0, 32, a.numel())
    r = shl(a, kt)
    assert r.tolist() == [x << k for x, k in zip(a.tolist(), kt.tolist())]
    assert_same_ints(r, shl(held(a), held(kt)))
    assert shl(ints([1, -1, 3]), 62 - 2).tolist() == [2**60, -(2**60), 3 * 2**60]
    assert shl(ints([1]), ints([62])).item() == 2**62


def test_round_shr_is_half_up():
    assert round_shr(ints([5, -5, 3, -3, -6, 6, -1]), 1).tolist() == [3, -2, 2, -1, -3, 3, 0]
    assert round_shr(ints([-3, -2, 2, 6, -6]), 2).tolist() == [-1, 0, 1, 2, -1]  # -0.75, -0.5, 0.5, 1.5, -1.5
    assert round_shr(held(ints([5, -5, 3, -3])), 1).tolist() == [3.0, -2.0, 2.0, -1.0]
    a = ints(EDGE32)
    assert round_shr(a, 0) is a  # k = 0 gives a (no rounding)
    assert torch.equal(round_shr(a, ints([0] * len(EDGE32))), a)


def test_round_shr_matches_python_on_both_paths():
    a = torch.cat([rand_ints(-(2**50), 2**50, 3000), ints(EDGE32)])
    for k in (1, 2, 3, 15, 31, 45):
        r = round_shr(a, k)
        assert r.tolist() == [(x + (1 << (k - 1))) >> k for x in a.tolist()]
        assert_same_ints(r, round_shr(held(a), k))
    kt = rand_ints(0, 45, a.numel())
    kt[:50] = 0
    r = round_shr(a, kt)
    assert r.tolist() == [(x + (1 << (k - 1))) >> k if k else x for x, k in zip(a.tolist(), kt.tolist())]
    assert_same_ints(r, round_shr(held(a), held(kt)))


def test_mul_shr_matches_python_on_both_paths():
    # |a * b| <= 2**52 - 2**21 keeps the float-held product exact and the result within int32 for k >= 21
    a = torch.cat([rand_ints(-(2**21) + 1, 2**21 - 1, 2000), ints([0, 1, -1, 2**21, -(2**21), -(2**21)])])
    b = torch.cat([rand_ints(-(2**31), 2**31 - 1, 2000),
                   ints([2**31 - 1, -(2**31), 2**31 - 1, 2**31 - 1, -(2**31) + 1, 2**31 - 1])])
    for k in (21, 25, 31):
        r = mul_shr(a, b, k)
        assert r.tolist() == [(x * y) >> k for x, y in zip(a.tolist(), b.tolist())]
        assert_same_ints(r, mul_shr(held(a), held(b), k))
    kt = rand_ints(21, 40, a.numel())
    r = mul_shr(a, b, kt)
    assert r.tolist() == [(x * y) >> k for x, y, k in zip(a.tolist(), b.tolist(), kt.tolist())]
    assert_same_ints(r, mul_shr(held(a), held(b), held(kt)))


def test_mul_shr_checks_the_64_bit_product_and_the_32_bit_result():
    big = ints([2**31 - 1])
    # 2**62 - 2**32 + 1 fits 63 bits; shifted by 31 it is just below 2**31
    assert mul_shr(big, big, 31).item() == ((2**31 - 1) ** 2) >> 31
    with pytest.raises(IntegerOverflowError, match="product"):
        mul_shr(ints([2**31]), ints([2**31]), 40)  # product = 2**62 leaves 63 bits
    with pytest.raises(IntegerOverflowError, match="mul_shr"):
        mul_shr(ints([2**20]), ints([2**20]), 8)  # result 2**32 leaves 32 bits
    # the float-held path does not check
    assert mul_shr(held(ints([2**20])), held(ints([2**20])), 8).item() == 2.0**32


# --- bitlen / isqrt ------------------------------------------------------------------------------

def test_bitlen_equals_python_bit_length():
    rng = random.Random(1)
    vals = [0, 1, 2, 3]
    for j in range(63):
        vals += [2**j, 2**j - 1, 2**j + 1]
    vals += [2**63 - 1, 2**62 - 1, 2**31 - 1, 2**31]
    vals += log_uniform(63, 2000, rng)
    vals = [v for v in vals if 0 <= v < 2**63]
    t = ints(vals)
    r = bitlen(t)
    assert r.tolist() == [v.bit_length() for v in vals]
    small = t[t < 2**53]
    assert small.numel() > 1000
    assert_same_ints(bitlen(small), bitlen(held(small)))


def isqrt_values(rng: random.Random) -> list[int]:
    vals = list(range(0, 1025))
    for j in range(62):
        vals += [2**j, 2**j - 1, 2**j + 1]
    vals += [2**62 - 1, 2**62 - 2, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1, (2**31 - 1) ** 2 + 1, 2**52 - 1, 2**52]
    for _ in range(600):
        k = rng.randrange(1, 2**31)
        vals += [k * k, k * k - 1, k * k + 1]
    vals += log_uniform(62, 1500, rng)
    return [v for v in vals if 0 <= v < 2**62]


def test_isqrt_is_exact_below_2_62():
    vals = isqrt_values(random.Random(2))
    assert len(vals) > 4000
    r = isqrt(ints(vals))
    assert r.dtype == I64
    assert r.tolist() == [math.isqrt(v) for v in vals]


def test_isqrt_float_path_is_exact_below_2_52():
    vals = [v for v in isqrt_values(random.Random(3)) if v < 2**52]
    assert len(vals) > 2400
    t = ints(vals)
    r_int = isqrt(t)
    assert r_int.tolist() == [math.isqrt(v) for v in vals]
    assert_same_ints(r_int, isqrt(held(t)))


def test_isqrt_keeps_shape():
    t = ints([[0, 1, 4], [15, 16, 17]])
    assert isqrt(t).tolist() == [[0, 1, 2], [3, 4, 4]]
    assert isqrt(held(t)).tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 4.0]]


# --- prescale -------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_min, s_max", [io.IEXP_S_RANGE, io.SHIFT_EXP_S_RANGE])
def test_prescale_brings_the_scale_into_range(s_min, s_max):
    q = torch.cat([rand_ints(-(2**24), 2**24, 500), ints([0, -1, 1, -2, 2, -3, 3, -(2**24)])])
    for s in torch.logspace(-6, 1, 29, dtype=F64).tolist() + [s_min, s_max, s_min * 0.999, s_max * 1.001]:
        st = s  # scales are Python floats
        q_i, s_i = prescale(q, st, s_min, s_max)
        q_f, s_f = prescale(held(q), st, s_min, s_max)
        assert_same_ints(q_i, q_f)
        assert s_i == s_f
        # s_min <= s' <= s_max, up to the float rounding of log2 at the exact boundaries
        assert s_min * (1 - 1e-12) <= s_i <= s_max * (1 + 1e-12)
        if s_min <= s <= s_max:  # inside the range: untouched
            assert torch.equal(q_i, q) and s_i == s
        elif s > s_max:  # shifted left: the same values on a finer grid, exactly
            up = round(math.log2(s / s_i))
            assert q_i.tolist() == [x << up for x in q.tolist()]
            assert s_i * 2**up == s
            assert s_i > s_max / 2  # the smallest shift that fits
        else:  # shifted right with half-up rounding
            down = round(math.log2(s_i / s))
            assert down >= 1
            assert q_i.tolist() == [(x + (1 << (down - 1))) >> down for x in q.tolist()]
            assert s_i == s * 2**down
            assert s_i < 2 * s_min


# --- i-exp / shift-exp -------------------------------------------------------------------------------

def exp_inputs() -> torch.Tensor:
    """q <= 0: dense near 0, random over int32, and the extremes."""
    return torch.cat([torch.arange(-600, 1, dtype=I64), rand_ints(-(2**31) + 1, 0, 600),
                      rand_ints(-(2**16), 0, 300), ints([0, -1, -(2**31) + 1, -(2**31), -(2**30), -(2**16)])])


SCALES = torch.logspace(-4, math.log10(4.0), 25, dtype=F64).tolist() + [
    2.0**-9, 2.0**-9 * 0.99, 0.5, 0.5 * 1.01, 2.0**-14, 1.0, 1.01, 0.15, 0.05, 0.01]


def test_i_exp_paths_agree_and_never_overflow():
    q = exp_inputs()
    for s in SCALES:
        st = s  # scales are Python floats
        e_i, s_i, b_i = i_exp(q, st)  # must not raise IntegerOverflowError
        e_f, s_f, b_f = i_exp(held(q), st)
        assert_same_ints(e_i, e_f)
        assert b_i == b_f and isinstance(b_i, int)
        assert s_i == s_f
        assert 0 < b_i < 2**30  # documented: exp_bound < 2**30
        assert e_i.min().item() >= 0 and e_i.max().item() <= b_i
        assert e_i[600].item() == b_i  # q = 0 gives the bound (the value at x = 0)


# worst relative error of exp_int * exp_scale vs exp(q S) over q S in [-10, 0], measured with
# this test's inputs: S=0.01 -> 0.1037, S=0.05 -> 0.1027, S=0.15 -> 1.0978 (x0 = floor(-ln2/S) makes
# each octave x0*S = -0.75 instead of -ln2 at S=0.15, compounding to ~2x at x=-10); on [-6, 0]:
# 0.0592, 0.0583, 0.5747; largest absolute error (exp <= 1): 0.0041, 0.0037, 0.0273
IEXP_BOUNDS = {0.01: (0.11, 0.065, 0.005), 0.05: (0.11, 0.065, 0.0045), 0.15: (1.15, 0.60, 0.03)}


@pytest.mark.parametrize("s", sorted(IEXP_BOUNDS))
def test_i_exp_accuracy(s):
    st = s  # scales are Python floats
    q = torch.arange(-math.floor(10 / s), 1, dtype=I64)
    x = q.to(F64) * s
    e, es, bound = i_exp(q, st)
    approx = e.to(F64) * es
    ref = torch.exp(x)
    rel = (approx - ref).abs() / ref
    worst, worst6, worst_abs = IEXP_BOUNDS[s]
    assert rel.max().item() <= worst  # measured bound (see IEXP_BOUNDS), small margin
    assert rel[x >= -6].max().item() <= worst6  # measured bound on [-6, 0]
    assert (approx - ref).abs().max().item() <= worst_abs  # measured absolute bound
    assert abs(approx[-1].item() - 1.0) <= 1e-3  # exp(0): floor(c/S**2) loses < a*S**2 = 0.0081 at S=0.15; measured 7.6e-4
    assert bool((e[1:] >= e[:-1]).all())  # monotone in q at these scales (observed; order of softmax logits kept)
    assert es == pytest.approx(io.IEXP_A * s * s / 2**15, rel=1e-15)  # n = 15 at these scales


# worst relative error of shift_exp (n_max=15, headroom 8 as I-ViT softmax for 197 tokens) vs
# exp(q S) over q S in [-10, 0], measured: S=0.01 -> 0.1030, S=0.05 -> 0.1260, S=0.15 -> 0.8846
# (log2 e ~ 1.4375 with three floors, 2**r ~ 1 + r/2, and x0 = floor(-1/S) = -7 at S=0.15);
# largest absolute error: 0.0482, 0.0592, 0.1592 (exp(0) itself comes out as -x0*S = 1.05 at S=0.15)
SHIFT_BOUNDS = {0.01: (0.11, 0.05), 0.05: (0.13, 0.065), 0.15: (0.90, 0.165)}


@pytest.mark.parametrize("s", sorted(SHIFT_BOUNDS))
def test_shift_exp_accuracy(s):
    st = s  # scales are Python floats
    q = torch.arange(-math.floor(10 / s), 1, dtype=I64)
    x = q.to(F64) * s
    e, es = shift_exp(q, st, n_max=15, headroom_bits=8)
    approx = e.to(F64) * es
    ref = torch.exp(x)
    rel = (approx - ref).abs() / ref
    worst, worst_abs = SHIFT_BOUNDS[s]
    assert rel.max().item() <= worst  # measured bound (see SHIFT_BOUNDS), small margin
    assert (approx - ref).abs().max().item() <= worst_abs  # measured absolute bound
    assert abs(approx[-1].item() - 1.0) <= s / 2 + 1e-12  # exp(0) = -floor(-1/S) * S, off by < S
    assert bool((e[1:] >= e[:-1]).all())  # monotone in q at these scales (observed)


@pytest.mark.parametrize("n_max, headroom", [(15, 0), (15, 8), (15, 12), (23, 1)])
def test_shift_exp_paths_agree_and_respect_the_headroom(n_max, headroom):
    q = exp_inputs()
    for s in SCALES:
        st = s  # scales are Python floats
        e_i, s_i = shift_exp(q, st, n_max, headroom)  # must not raise IntegerOverflowError
        e_f, s_f = shift_exp(held(q), st, n_max, headroom)
        assert_same_ints(e_i, e_f)
        assert s_i == s_f
        assert e_i.min().item() >= 0
        assert e_i.max().item() * 2**headroom < 2**31  # documented: times 2**headroom below 2**31
        assert 0.5 <= float(e_i[600]) * s_i <= 2.0  # exp(0) within a factor 2 at every scale


def test_exp_to_uint16():
    q = exp_inputs()
    for s in (1e-4, 2.0**-9, 0.01, 0.05, 0.15, 0.5, 2.0):
        st = s  # scales are Python floats
        e, es, bound = i_exp(q, st)
        for row_len in (1, 197, 2**15 - 1, 2**15, 3136 * 16, 100_000):
            e16, s16 = exp_to_uint16(e, es, bound, row_len)
            e16_f, s16_f = exp_to_uint16(held(e), es, bound, row_len)
            assert_same_ints(e16, e16_f)
            assert s16 == s16_f
            k = round(math.log2(s16 / es))
            assert k >= 0 and s16 == es * 2**k
            assert e16.tolist() == [v >> k for v in e.tolist()]
            assert (bound >> k) < 2**16  # unsigned 16 bits
            assert (bound >> k) * row_len < 2**31  # the row sum fits int32
            # the shift loses less than one output unit
            assert ((e.to(F64) * es - e16.to(F64) * s16).abs() < s16).all()


# --- LayerNorm pieces -----------------------------------------------------------------------------

def ln_rows(channels: int = 192) -> torch.Tensor:
    """16-bit rows: random, constant, one outlier channel, alternating extremes."""
    lo, hi = -(2**15), 2**15 - 1
    rand = rand_ints(lo, hi, 6 * channels).view(6, channels)
    const = torch.full((2, channels), 1234, dtype=I64)
    const[1] = lo
    outlier = torch.zeros((2, channels), dtype=I64)
    outlier[0, 5] = hi
    outlier[1, 7] = lo
    alt = ints([lo, hi]).repeat(2, channels // 2)
    small = rand_ints(-3, 3, 2 * channels).view(2, channels)
    return torch.cat([rand, const, outlier, alt, small])


def test_ln_center_is_half_up_mean_removal():
    q = ln_rows()
    y = ln_center(q)
    c = q.shape[-1]
    for row_q, row_y in zip(q.tolist(), y.tolist()):
        mean = (2 * sum(row_q) + c) // (2 * c)
        assert row_y == [v - mean for v in row_q]
        assert abs(sum(row_y)) <= c // 2  # rounding the mean leaves at most half a unit per channel
    assert_same_ints(y, ln_center(held(q)))
    assert ln_center(ints([[1, 2]])).tolist() == [[-1, 0]]  # mean 1.5 rounds up to 2


def test_ln_center_checks_the_sum():
    q = torch.full((1, 2**17), 2**15 - 1, dtype=I64)  # sum ~ 2**32
    with pytest.raises(IntegerOverflowError, match="layernorm sum"):
        ln_center(q)
    assert ln_center(held(q)).abs().max().item() == 0  # float-held path unchecked, constant row -> 0


@pytest.mark.parametrize("minus_one", [False, True])
@pytest.mark.parametrize("channels", [64, 192, 768])
def test_ln_normalize_matches_the_formula(minus_one, channels):
    y = ln_center(ln_rows(channels))
    std = isqrt((y * y).sum(-1, keepdim=True))  # I-ViT: sqrt of the sum of squares
    yn, s_n = ln_normalize(y, std, numerator_minus_one=minus_one)
    k = ln_headroom(channels)
    assert k == 8 + math.ceil(math.log2(math.sqrt(channels)))
    num = 2**31 - (1 if minus_one else 0)
    for row_y, (sd,), row_n in zip(y.tolist(), std.tolist(), yn.tolist()):
        f = num // max(sd, 1)
        assert row_n == [(v * f) >> (1 + k) for v in row_y]
    assert s_n.dtype == F64 and s_n.item() == math.sqrt(channels) / 2 ** (30 - k)
    assert yn.abs().max().item() < 2**22  # documented output bound, even for a one-channel row
    yn_f, s_nf = ln_normalize(held(y), held(std), numerator_minus_one=minus_one)
    assert_same_ints(yn, yn_f)
    assert torch.equal(s_n, s_nf)
    # the value: y / sigma with sigma = std / sqrt(C); error from f's floor and the final shift
    ref = y.to(F64) / torch.clamp(std.to(F64), min=1) * math.sqrt(channels)
    got = yn.to(F64) * s_n
    nz = std.squeeze(-1) > 0
    # floor of f loses |y| sqrt(C) / 2**31 <= sqrt(C) 2**-16 (|y| <= 2**16), the final shift one unit
    # of s_n <= sqrt(C) 2**-17: together below sqrt(C) 2**-15
    assert ((got - ref)[nz].abs().max() <= math.sqrt(channels) * 2.0**-15).item()
    assert (yn[~nz] == 0).all()  # constant rows normalize to 0


def test_ln_affine_bias():
    channels = 64
    y = ln_center(ln_rows(channels))
    std = isqrt((y * y).sum(-1, keepdim=True))
    yn, s_n = ln_normalize(y, std, numerator_minus_one=True)
    gamma = 1.0 + 0.3 * torch.randn(channels)
    gamma[0] = -0.7  # negative scale
    gamma[1] = 0.0  # floored to |beta| / (s_n 2**22)
    beta = 0.3 * torch.randn(channels)
    beta[1] = 0.5
    out, scale = ln_affine_bias(yn, s_n, gamma, beta)
    out_f, scale_f = ln_affine_bias(held(yn), s_n, gamma, beta)
    assert_same_ints(out, out_f)
    assert torch.equal(scale, scale_f)
    assert scale.shape == (channels,)
    assert scale[0].item() < 0 and (scale[2:] > 0).all()
    bias_int = out - yn
    assert (bias_int == bias_int[:1]).all()  # one integer bias per channel
    assert bias_int.abs().max().item() <= 2**22  # documented clamp
    assert abs(bias_int[0, 1].item()) == 2**22  # gamma = 0: the floor makes beta exactly 2**22 units
    # out * scale = gamma * (yn s_n) + beta up to the bias's floor (one unit of |scale|)
    ref = gamma.double() * (yn.to(F64) * s_n) + beta.double()
    err = (out.to(F64) * scale - ref).abs()
    assert (err[:, 2:] <= scale[2:].abs() * (1 + 1e-9)).all()  # floor loses < 1 unit per channel
    # gamma = 0 is floored to g_min = |beta| / (s_n 2**22): the output is beta plus g_min times the
    # normalized input (documented), plus the bias's floor
    g_min = 0.5 / (s_n.item() * 2**22)
    assert scale[1].item() == pytest.approx(s_n.item() * g_min, rel=1e-12)
    assert (err[:, 1] <= (yn[:, 1].to(F64) * s_n).abs() * g_min + scale[1].abs() * (1 + 1e-9)).all()
    # no affine: output and per-channel scale unchanged
    out0, scale0 = ln_affine_bias(yn, s_n, None, None)
    assert out0 is yn and scale0.shape == (channels,) and (scale0 == s_n).all()
    # weight without bias: zero bias
    out1, scale1 = ln_affine_bias(yn, s_n, gamma, None)
    assert torch.equal(out1, yn) and torch.allclose(scale1, s_n * gamma.double())


def test_ln_affine_bias_checks_the_output():
    yn = ints([[2**31 - 10, 0]])
    s_n = torch.tensor(1.0, dtype=F64)
    with pytest.raises(IntegerOverflowError, match="layernorm output"):
        ln_affine_bias(yn, s_n, torch.tensor([1.0, 1.0]), torch.tensor([100.0, 0.0]))
    out, _ = ln_affine_bias(held(yn), s_n, torch.tensor([1.0, 1.0]), torch.tensor([100.0, 0.0]))
    assert out.tolist() == [[2**31 + 90, 0.0]]


@pytest.mark.parametrize("dtype, lo, hi", [(torch.float64, -1022, 1023), (torch.float32, -126, 127)])
def test_pow2_is_exact_over_the_normal_range(dtype, lo, hi):
    k = torch.arange(lo, hi + 1, dtype=dtype)
    expected = torch.tensor([math.ldexp(1.0, int(v)) for v in range(lo, hi + 1)], dtype=torch.float64).to(dtype)
    assert torch.equal(io.pow2(k, dtype), expected)
    assert torch.equal(io.pow2(torch.tensor([hi + 5.0], dtype=dtype), dtype), expected[-1:])  # clamped
