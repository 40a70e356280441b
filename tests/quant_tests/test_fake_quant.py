"""Fake quantization with the STE (``quant._fake_quant``, paper Eq. 1 and 2) and the EMA observer."""

from __future__ import annotations

import pytest
import torch

from mnq_search.quant import (BITS_RANGE, ActQuant, MinMaxObserver, check_bits, qrange, quantize_ste,
                              symmetric_scale)
from mnq_search.integer import round_ste, to_grid
from mnq_search.quant._fake_quant import SCALE_EPS

BITS = list(range(BITS_RANGE[0], BITS_RANGE[1] + 1))


# --- helpers of Eq. 1 ----------------------------------------------------------------------------

def test_bits_range_and_check_bits():
    assert BITS_RANGE == (4, 8)
    for b in BITS:
        assert check_bits(b) == b
    for bad in (3, 9, 0, -8, True, 8.0, "8", None):
        with pytest.raises(ValueError, match="4..8"):
            check_bits(bad, "weight bits")


def test_qrange():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(6, signed=False) == (0, 63)


def test_symmetric_scale():
    absmax = torch.tensor([1.27, 0.0, 7.0])
    s8 = symmetric_scale(absmax, 8)
    assert torch.allclose(s8, torch.tensor([0.01, SCALE_EPS / 127, 7 / 127]), rtol=1e-6, atol=0)  # float32 division
    assert symmetric_scale(torch.tensor(7.0), 4).item() == 1.0  # absmax / (2**(b-1) - 1)


# --- quantize_ste ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_quantize_ste_is_eq1(bits):
    x = torch.randn(4000, dtype=torch.float64) * 3
    absmax = x.abs().max()
    s = symmetric_scale(absmax, bits)
    qmin, qmax = qrange(bits)
    q = quantize_ste(x, s, qmin, qmax)
    ref = torch.clamp(torch.floor(x / s + 0.5), qmin, qmax)
    assert torch.equal(q, ref)
    assert torch.equal(q, torch.round(q))  # integer valued
    i = x.abs().argmax()
    assert q[i].item() == qmax * torch.sign(x[i]).item()  # absmax maps to +-(2**(b-1) - 1)
    assert q.abs().max().item() == qmax  # so nothing is clamped and -2**(b-1) is never reached
    assert ((q * s - x).abs() <= s / 2 * (1 + 1e-12)).all()  # inside the range: half a step
    # inputs beyond the calibrated range clamp to [-2**(b-1), 2**(b-1) - 1]
    big = quantize_ste(torch.tensor([10.0, -10.0], dtype=torch.float64) * absmax, s, qmin, qmax)
    assert big.tolist() == [qmax, qmin]


def test_quantize_ste_rounds_half_up():
    s = torch.tensor(0.5)  # power of two: x / s is exact
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -0.25, 0.25]) * 0.5
    assert quantize_ste(x, s, -128, 127).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    assert round_ste(torch.tensor([-2.5, -0.5, 0.5, 2.5])).tolist() == [-2.0, 0.0, 1.0, 3.0]


def test_quantize_ste_backward_is_eq2():
    qmin, qmax = qrange(4)  # -8..7
    v = torch.tensor([0.0, 3.3, -5.7, 7.4, 7.5, 7.6, 20.0, -8.5, -8.51, -8.6, -30.0], requires_grad=True)
    out = quantize_ste(v, torch.tensor(1.0), qmin, qmax)
    assert out.tolist() == [0.0, 3.0, -6.0, 7.0, 7.0, 7.0, 7.0, -8.0, -8.0, -8.0, -8.0]
    out.backward(torch.full_like(v, 2.0))
    # gradient passes (times 1) where round(v) lies in [qmin, qmax], else 0
    assert v.grad.tolist() == [2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]


def test_quantize_ste_gradient_wrt_x_is_one_over_scale():
    x = (torch.randn(100) * 2).requires_grad_()
    s = torch.tensor(0.05)
    (quantize_ste(x, s, -128, 127) * s).sum().backward()
    inside = (torch.floor(x.detach() / s + 0.5).abs() <= 127) & (torch.floor(x.detach() / s + 0.5) >= -128)
    assert inside.any() and (~inside).any()
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())))  # d(q s)/dx = 1 inside (STE)
    assert (x.grad[~inside] == 0).all()  # 0 outside the clamp range


def test_to_grid_removes_float_error():
    s = torch.tensor(0.013)
    q = torch.randint(-128, 128, (500,)).float()
    x = q * s * (1 + 1e-7 * torch.randn(500))  # grid values with float noise
    assert torch.equal(to_grid(x, s), q)


# --- MinMaxObserver -----------------------------------------------------------------------------

def test_observer_ema_exact_after_two_batches():
    obs = MinMaxObserver(0.95)
    a = torch.tensor([-1.0, 0.5, 2.0])
    b = torch.tensor([-3.0, 0.0, 1.0])
    obs.update(a)
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 2.0  # the first batch initializes
    assert bool(obs.initialized)
    obs.update(b)
    assert obs.min_val.item() == (0.95 * torch.tensor(-1.0) + (1 - 0.95) * torch.tensor(-3.0)).item()  # exact float32 EMA
    assert obs.max_val.item() == (0.95 * torch.tensor(2.0) + (1 - 0.95) * torch.tensor(1.0)).item()
    assert obs.min_val.item() == pytest.approx(-1.1, abs=1e-6)  # -1.1 up to float32 rounding
    assert obs.max_val.item() == pytest.approx(1.95, abs=1e-6)  # 1.95 up to float32 rounding
    assert obs.absmax().item() == pytest.approx(1.95, abs=1e-6)  # max(|min|, |max|) in float32


def test_observer_momentum_variants_and_reset():
    a = torch.tensor([-1.0, 2.0])
    b = torch.tensor([-0.5, 4.0])
    plain = MinMaxObserver(None)
    latest = MinMaxObserver(0.0)
    for obs in (plain, latest):
        obs.update(a)
        obs.update(b)
    assert (plain.min_val.item(), plain.max_val.item()) == (-1.0, 4.0)  # running extremes
    assert (latest.min_val.item(), latest.max_val.item()) == (-0.5, 4.0)  # latest batch only
    plain.reset()
    assert (plain.min_val.item(), plain.max_val.item(), bool(plain.initialized)) == (0.0, 0.0, False)
    plain.update(b)
    assert (plain.min_val.item(), plain.max_val.item()) == (-0.5, 4.0)  # re-initialized, not min'd with 0


def test_observer_per_channel():
    obs = MinMaxObserver(0.95, channel_dim=1, channels=3)
    x = torch.randn(4, 3, 5)
    obs.update(x)
    assert torch.equal(obs.min_val, x.amin(dim=(0, 2))) and torch.equal(obs.max_val, x.amax(dim=(0, 2)))
    y = torch.randn(4, 3, 5)
    obs.update(y)
    expect = 0.95 * x.amax(dim=(0, 2)) + 0.05 * y.amax(dim=(0, 2))
    assert torch.allclose(obs.max_val, expect, rtol=0, atol=1e-6)  # float32 EMA
    # a channel count other than the declared one re-shapes the buffers
    other = MinMaxObserver(None, channel_dim=-1)
    z = torch.randn(2, 7)
    other.update(z)
    assert torch.equal(other.max_val, z.amax(dim=0)) and other.max_val.shape == (7,)


def test_observer_state_dict_round_trip():
    obs = MinMaxObserver(0.95)
    obs.update(torch.tensor([-2.0, 3.0]))
    fresh = MinMaxObserver(0.95)
    fresh.load_state_dict(obs.state_dict())
    assert (fresh.min_val.item(), fresh.max_val.item(), bool(fresh.initialized)) == (-2.0, 3.0, True)


# --- ActQuant -----------------------------------------------------------------------------------

def test_act_quant_ema_after_two_batches_in_train_mode():
    aq = ActQuant(8).train()
    x1 = torch.randn(8, 16)
    x2 = torch.randn(8, 16) * 3
    aq(x1)
    aq(x2)
    lo = 0.95 * x1.min() + (1 - 0.95) * x2.min()  # the same float32 operations, in the same order
    hi = 0.95 * x1.max() + (1 - 0.95) * x2.max()
    assert aq.observer.min_val.item() == lo.item()  # EMA with momentum 0.95, exactly
    assert aq.observer.max_val.item() == hi.item()
    # and against float64 arithmetic
    lo64 = 0.95 * x1.min().double() + 0.05 * x2.min().double()
    assert abs(aq.observer.min_val.item() - lo64.item()) <= 1e-6  # float32 rounding of two products and a sum
    absmax = max(abs(lo.item()), abs(hi.item()))
    assert aq.scale.item() == pytest.approx(absmax / 127, rel=1e-6)  # alpha / (2**(b-1) - 1)


def test_act_quant_observer_frozen_in_eval():
    aq = ActQuant(8).train()
    aq(torch.randn(8, 16))
    aq.eval()
    before = (aq.observer.min_val.clone(), aq.observer.max_val.clone())
    x = torch.randn(8, 16) * 10
    y, s = aq(x)
    assert torch.equal(aq.observer.min_val, before[0]) and torch.equal(aq.observer.max_val, before[1])
    assert s.item() == aq.scale.item()
    assert y.abs().max().item() <= 128 * s.item() * (1 + 1e-6)  # clamped to the frozen range


@pytest.mark.parametrize("bits", BITS)
def test_act_quant_output_on_grid(bits):
    aq = ActQuant(bits).train()
    aq(torch.randn(4, 32))
    aq.eval()
    x = torch.randn(6, 32) * 2  # partly beyond the calibrated range
    y, s = aq(x)
    assert y.dtype == torch.float32 and s.shape == ()
    v = y / s
    assert (v - torch.round(v)).abs().max().item() <= 1e-4  # integer up to float32 rounding of (q*s)/s
    assert torch.round(v).abs().max().item() <= 2 ** (bits - 1)  # |x_q / scale| <= 2**(b-1)
    assert torch.round(v).min().item() == -(2 ** (bits - 1))  # the wide input reaches both ends
    assert torch.round(v).max().item() == 2 ** (bits - 1) - 1
    ref = torch.clamp(torch.floor(x / s + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(torch.round(v), ref)


def test_act_quant_disabled_passes_through():
    aq = ActQuant(8).train()
    x = torch.randn(3, 5)
    aq.set_enabled(False)
    y, s = aq(x)
    assert y is x and s is None
    assert not bool(aq.enabled)
    assert not bool(aq.observer.initialized)  # no observation while disabled
    aq.set_enabled(True)
    y2, s2 = aq(x)
    assert s2 is not None and bool(aq.observer.initialized) and not torch.equal(y2, x)


def test_act_quant_state_dict_round_trip():
    aq = ActQuant(6).train()
    for _ in range(3):
        aq(torch.randn(8, 16))
    aq.eval()
    fresh = ActQuant(6).eval()
    fresh.load_state_dict(aq.state_dict())
    assert set(aq.state_dict()) == {"enabled", "cap", "observer.min_val", "observer.max_val", "observer.initialized"}
    x = torch.randn(10, 16) * 2
    y1, s1 = aq(x)
    y2, s2 = fresh(x)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    # the enabled flag too: a disabled quantizer reloads disabled
    aq.set_enabled(False)
    fresh2 = ActQuant(6)
    fresh2.load_state_dict(aq.state_dict())
    y3, s3 = fresh2(x)
    assert y3 is x and s3 is None


def test_act_quant_gradient_is_ste():
    aq = ActQuant(8).train()
    aq(torch.randn(64) * 0.5)
    aq.eval()
    x = (torch.randn(64) * 2).requires_grad_()
    y, s = aq(x)
    y.sum().backward()
    r = torch.floor(x.detach() / s + 0.5)
    inside = (r >= -128) & (r <= 127)
    assert inside.any() and (~inside).any()
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())))  # gradient 1 inside (Eq. 2)
    assert (x.grad[~inside] == 0).all()  # gradient 0 outside
