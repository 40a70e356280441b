"""Oscillation counting and freezing of ``mnq_search.vvtq._oscillation`` (Nagel et al., ICML 2022;
VVTQ, Huang et al. 2023) on hand-made integer sequences with known flips."""

from __future__ import annotations

import pytest
import torch

from mnq_search.errors import UsageError
from mnq_search.vvtq import OscillationTracker

# integers of 5 weights at steps 0..4 (columns); flips (direction reversals of the integer):
#  w0: 0 1 0 1 0    + - + -   -> flips at steps 2, 3, 4      (3)
#  w1: 0 1 1 0 0    + 0 - 0   -> flip at step 3 (a pause between does not hide it)  (1)
#  w2: 0 1 2 3 4    + + + +   -> none
#  w3: 2 2 2 2 2    none
#  w4: 0 -1 -1 -2 -1  - 0 - + -> flip at step 4            (1)
SEQ = torch.tensor([[0, 1, 0, 1, 0],
                    [0, 1, 1, 0, 0],
                    [0, 1, 2, 3, 4],
                    [2, 2, 2, 2, 2],
                    [0, -1, -1, -2, -1]]).T  # (steps, weights)
FLIPS = torch.tensor([[0, 0, 0, 0, 0],  # per step: which weights flipped
                      [0, 0, 0, 0, 0],
                      [1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [1, 0, 0, 0, 1]], dtype=torch.bool)


def _run(tracker: OscillationTracker, seq=SEQ, name="fc") -> list[torch.Tensor]:
    return [tracker.update(name, q) for q in seq]


def test_counts_rates_and_ema_on_a_known_sequence():
    tr = OscillationTracker(momentum=0.5)
    flipped = _run(tr)
    assert torch.equal(torch.stack(flipped), FLIPS)
    assert tr.counts("fc").tolist() == [3, 1, 0, 0, 1]
    # EMA f_t = 0.5 o_t + 0.5 f_{t-1}: w0 0, 0, .5, .75, .875; w1 0, 0, 0, .5, .25; w4 0, 0, 0, 0, .5
    assert tr.ema_frequency("fc").tolist() == [0.875, 0.25, 0.0, 0.0, 0.5]
    rep = tr.end_epoch()["fc"]
    assert rep["weights"] == 5 and rep["steps"] == 4 and rep["flips"] == 5 and rep["oscillating"] == 3
    assert rep["rate"] == 3 / 5  # fraction of weights that flipped at least once
    assert rep["mean_frequency"] == 5 / (5 * 4)  # flips per weight per transition
    assert rep["mean_ema"] == pytest.approx((0.875 + 0.25 + 0.5) / 5)
    assert rep["frozen"] == 0


def test_epochs_reset_epoch_counts_but_keep_totals():
    tr = OscillationTracker(momentum=0.5)
    _run(tr)
    tr.end_epoch()
    # epoch 2: w0 goes 0 -> 1 (reverses its last move: a flip), w4 -1 -> -1 (none)
    tr.update("fc", torch.tensor([1, 0, 4, 2, -1]))
    rep = tr.end_epoch()["fc"]
    assert rep["steps"] == 1 and rep["flips"] == 1 and rep["rate"] == 1 / 5 and rep["mean_frequency"] == 1 / 5
    assert tr.counts("fc").tolist() == [4, 1, 0, 0, 1]
    assert [h["flips"] for h in tr.history("fc")] == [5, 1]


def test_layers_are_separate_and_float_integers_accepted():
    tr = OscillationTracker()
    _run(tr, SEQ.float(), "a")
    _run(tr, SEQ[:, :2] * 0, "b")
    rep = tr.end_epoch()
    assert rep["a"]["flips"] == 5 and rep["b"]["flips"] == 0 and rep["b"]["rate"] == 0.0
    assert set(tr.names) == {"a", "b"}
    with pytest.raises(UsageError):
        tr.update("a", torch.zeros(3))
    with pytest.raises(UsageError):
        tr.counts("c")


@pytest.mark.parametrize("threshold,frozen,values", [
    (0.5, [True, False, False, False, False], 1),  # w0 passes 0.5 at step 3 (0.75) at integer 1; 0.5 itself does not freeze
    (0.8, [True, False, False, False, False], 0),  # w0 passes 0.8 at step 4 (0.875) at integer 0
    (0.9, [False] * 5, None),
])
def test_freezing_only_above_the_threshold(threshold, frozen, values):
    tr = OscillationTracker(momentum=0.5, freeze_threshold=threshold)
    _run(tr)
    mask = tr.frozen_mask("fc")
    assert mask.tolist() == frozen
    q = torch.full((5,), 7, dtype=torch.int32)
    pinned = tr.apply_freeze("fc", q)
    assert pinned.dtype == torch.int32
    assert pinned.tolist() == [values if f else 7 for f in frozen]
    w = torch.full((5,), 0.33)
    tr.freeze_latent_("fc", w, torch.tensor(0.25))
    assert w.tolist() == [values * 0.25 if f else pytest.approx(0.33) for f in frozen]
    assert tr.end_epoch()["fc"]["frozen"] == sum(frozen)


def test_no_freezing_without_threshold_and_bad_settings():
    tr = OscillationTracker(momentum=1.0)
    _run(tr)
    assert not tr.frozen_mask("fc").any()
    assert tr.ema_frequency("fc").tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]  # momentum 1: the last step's flips
    for bad in (dict(momentum=0.0), dict(momentum=1.5), dict(freeze_threshold=1.0)):
        with pytest.raises(UsageError):
            OscillationTracker(**bad)
