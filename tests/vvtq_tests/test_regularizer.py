"""The variation-aware bin regulariser of ``mnq_search.vvtq._regularizer`` (VVTQ, Huang et al. 2023):
zero at bin centres, monotone and symmetric within a bin, gradient toward the centre, weighting."""

from __future__ import annotations

import math

import pytest
import torch

from mnq_search.errors import UsageError
from mnq_search.vvtq import (WeightChangeStats, bin_distance, bin_regularizer, regularizer_strength,
                             variation_aware_regularizer)

S = 0.25  # exact in binary: w = S * k is exactly on the grid


def test_zero_exactly_at_bin_centres():
    centres = S * torch.arange(-8, 8, dtype=torch.float32)  # every integer of 4 bits
    assert bin_regularizer(centres, S, 4).item() == 0.0
    assert bin_regularizer(centres, S, 4, bin_variance=True).item() == 0.0
    per_channel = torch.tensor([[0.5], [0.125]])
    w = per_channel * torch.tensor([[-3.0, 0.0, 5.0], [1.0, -8.0, 7.0]])
    assert bin_regularizer(w, per_channel, 4, reduction="sum").item() == 0.0


def test_grows_monotonically_to_half_a_step_and_is_symmetric():
    t = torch.linspace(0.0, 0.49, 50, dtype=torch.float64)
    for k in (-3, 0, 2):
        up = torch.stack([bin_regularizer(S * (k + ti), S, 4) for ti in t])
        down = torch.stack([bin_regularizer(S * (k - ti), S, 4) for ti in t])
        assert torch.all(up[1:] > up[:-1])  # strictly increasing with the distance
        assert torch.allclose(up, t**2, atol=1e-12)  # R = d**2 for one weight, d in steps
        assert torch.allclose(up, down, atol=1e-12)  # symmetric about the centre
    assert bin_distance(torch.tensor(S * 2.5), S, 4).item() == -0.5  # the tie rounds half up: d = -1/2


def test_gradient_points_toward_the_nearest_centre():
    w = (S * torch.tensor([-2.3, -0.1, 0.0, 0.2, 1.45, 3.0, 1.55])).requires_grad_(True)
    bin_regularizer(w, S, 4).backward()
    d = bin_distance(w.detach(), S, 4)
    assert torch.allclose(w.grad, 2 * d / (w.numel() * S))  # dR/dw = 2 d / (N s)
    centre = S * torch.floor(w.detach() / S + 0.5)
    towards = -w.grad * (centre - w.detach())  # > 0: the descent direction points at the centre
    off = d != 0
    assert torch.all(towards[off] > 0) and torch.all(w.grad[~off] == 0)
    # 20 steps of gradient descent on R alone bring every weight closer to its centre
    x = w.detach().clone().requires_grad_(True)
    for _ in range(20):
        x.grad = None
        bin_regularizer(x, S, 4, reduction="sum").backward()
        with torch.no_grad():
            x -= 0.02 * x.grad
    assert torch.all(bin_distance(x.detach(), S, 4).abs()[off] < d.abs()[off])


def test_clamped_weights_and_sum_reduction():
    w = torch.tensor([S * 9.3, S * -12.0, S * 0.25])  # 4 bits: 9.3 and -12 are beyond 7 and -8
    assert bin_distance(w, S, 4).tolist() == [0.0, 0.0, 0.25]
    assert bin_regularizer(w, S, 4, reduction="sum").item() == pytest.approx(0.0625)
    assert bin_regularizer(w, S, 4).item() == pytest.approx(0.0625 / 3)
    # unsigned 4 bits (0..15): 9.3 is inside (d = 0.3), -12 clamps to 0
    assert bin_regularizer(w, S, 4, signed=False, reduction="sum").item() == pytest.approx(0.09 + 0.0625, rel=1e-5)


def test_bin_variance_term():
    # u = w / s: bin 0 holds 0.1, -0.1, 0.2 (unbiased variance 0.02333...), bin 1 holds 1.0 alone (no term)
    u = torch.tensor([0.1, -0.1, 0.2, 1.0], dtype=torch.float64)
    var0 = torch.tensor([0.1, -0.1, 0.2], dtype=torch.float64).var().item()
    plain = ((u - torch.round(u)) ** 2).mean().item()
    assert bin_regularizer(u * S, S, 4, bin_variance=True).item() == pytest.approx(plain + var0, rel=1e-12)


def test_module_weighting_by_variation():
    a = S * torch.tensor([0.5, 1.25])  # R_a = mean(0.25, 0.0625) = 0.15625
    b = S * torch.tensor([0.1, 0.0])  # R_b = 0.005
    mods = {"a": (a, S, 4), "b": (b, S, 4)}
    assert variation_aware_regularizer(mods, {"a": 0.5, "b": 0.0}, strength=2.0).item() == pytest.approx(2 * 0.5 * 0.15625)
    assert variation_aware_regularizer(mods, {"a": 1.0, "b": 1.0}).item() == pytest.approx(0.15625 + 0.005)
    assert variation_aware_regularizer(mods, {"a": 0.0, "b": 0.0}).item() == 0.0  # no variation, no pull
    with pytest.raises(UsageError, match="no variation"):
        variation_aware_regularizer(mods, {"a": 1.0})
    with pytest.raises(UsageError):
        variation_aware_regularizer(mods, {"a": -1.0, "b": 0.0})


def test_weight_change_stats():
    st = WeightChangeStats()
    for w in ([0.0, 0.0], [0.1, -0.1], [0.2, -0.1]):  # changes in steps of 0.1: 1, -1, 1, 0
        st.update("fc", torch.tensor(w, dtype=torch.float64), 0.1)
    assert st.std("fc") == pytest.approx(math.sqrt(11) / 4)  # mean 1/4, mean of squares 3/4
    assert st.variation() == {"fc": pytest.approx(math.sqrt(11) / 4)}
    st.reset()
    assert st.std("fc") == 0.0


def test_strength_schedule():
    assert regularizer_strength(0, 100) == 0.0
    assert regularizer_strength(25, 100) == 0.0
    assert regularizer_strength(62.5, 100) == pytest.approx(0.005)
    assert regularizer_strength(100, 100) == pytest.approx(0.01)
    with pytest.raises(UsageError):
        regularizer_strength(1, 0)
