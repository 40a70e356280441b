"""``unified``: the score ranks a hand-made case as its docstring says, the weights parse with one-line
errors, and on a tiny model the strategy's recorded terms replay to the assignment it returns."""

from __future__ import annotations

import pytest

from mnq_search.errors import UsageError
from mnq_search.sensitivity import sensitivity_table
from strategies import get_strategy
from tests.strategies_tests.test_local import make_tiny_ctx
from strategies.unified import DEFAULT_WEIGHTS, choose, normalised, parse_weights, slot_scores

# one slot, three candidates: a is the most accurate alone (SQNR), b perturbs the output least (KL),
# c is the cheapest
HAND = {"s": {"a": {"asqnr_out": 30.0, "kl": 0.5, "cost": 10.0},
              "b": {"asqnr_out": 20.0, "kl": 0.1, "cost": 10.0},
              "c": {"asqnr_out": 25.0, "kl": 0.3, "cost": 1.0}}}


def test_normalised_puts_the_best_at_zero():
    assert normalised([1.0, 3.0, 2.0]) == [0.0, 1.0, 0.5]
    assert normalised([1.0, 3.0, 2.0], higher_is_better=True) == [1.0, 0.0, 0.5]
    assert normalised([4.0, 4.0]) == [0.0, 0.0]  # a term equal for every candidate does not count


def test_hand_made_ranking():
    # normalised: A (higher better) a 0, b 1, c 0.5; KL a 1, b 0, c 0.5; cost a 1, b 1, c 0
    scores = slot_scores(HAND["s"], (0.2, 0.7, 0.1))
    assert scores == pytest.approx({"a": 0.2 * 0 + 0.7 * 1 + 0.1 * 1, "b": 0.2 * 1 + 0 + 0.1 * 1,
                                    "c": 0.2 * 0.5 + 0.7 * 0.5 + 0})
    assert choose(HAND, (0.2, 0.7, 0.1)) == {"s": "b"}  # b 0.3 < c 0.45 < a 0.8
    assert choose(HAND, (0, 0, 1)) == {"s": "c"}
    assert choose(HAND, (1, 0, 0)) == {"s": "a"}
    assert choose(HAND, (0.5, 0, 0.5)) == {"s": "c"}  # a 0.5, b 1.0, c 0.25


def test_ties_go_to_the_first_method():
    tie = {"s": {"x": {"asqnr_out": 10.0, "kl": 0.2, "cost": 1.0},
                 "y": {"asqnr_out": 20.0, "kl": 0.4, "cost": 1.0}}}
    assert slot_scores(tie["s"], (0.5, 0.5, 0.0)) == {"x": 0.5, "y": 0.5}
    assert choose(tie, (0.5, 0.5, 0.0)) == {"s": "x"}
    assert choose({"s": dict(reversed(list(tie["s"].items())))}, (0.5, 0.5, 0.0)) == {"s": "y"}


def test_weights_parse_and_normalise():
    assert parse_weights(None) == DEFAULT_WEIGHTS and sum(DEFAULT_WEIGHTS) == pytest.approx(1.0)
    assert parse_weights("2,6,2") == pytest.approx((0.2, 0.6, 0.2))
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0", "1,1,inf", "1,2,3,4"):
        with pytest.raises(UsageError) as err:
            parse_weights(bad)
        assert "\n" not in str(err.value) and "three weights" in str(err.value)
    with pytest.raises(UsageError):
        get_strategy("unified:1,2")


def test_on_a_tiny_model_the_recorded_terms_replay_to_the_assignment():
    ctx = make_tiny_ctx()
    ctx.sensitivity, _ = sensitivity_table(ctx)
    result = get_strategy("unified").run(ctx)
    info = result.search
    assert info["weights"] == pytest.approx(list(DEFAULT_WEIGHTS))
    table = info["terms"]
    assert set(table) == set(ctx.slot_ops)
    for slot, terms in table.items():  # every method the slot's op takes is a candidate
        assert set(terms) == {r["method"] for r in ctx.sensitivity if r["slot"] == slot}
        assert all(t["cost"] > 0 and t["kl"] >= 0 for t in terms.values())
    methods = {s: m for s, m in result.assignment.items() if "#" not in s}
    assert methods == choose(table, DEFAULT_WEIGHTS)
    # pure-cost weights pick the cheapest candidate of every slot
    cheapest = {s: min(t, key=lambda m: (t[m]["cost"], list(t).index(m))) for s, t in table.items()}
    assert get_strategy("unified:0,0,1").run(ctx).assignment == cheapest
