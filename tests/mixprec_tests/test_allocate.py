"""Bit allocation by ILP (``mixprec._allocate``) against brute force, and the sensitivity table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mnq_search.errors import UsageError
from mnq_search.mixprec import Option, allocate_bits, build_options, sensitivity_table

BITS = [(8, 8), (6, 6), (4, 4)]


def random_instance(seed: int, layers: int = 5) -> dict[str, list[Option]]:
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(layers):
        macs = int(rng.integers(100, 10_000))
        sens = np.sort(rng.random(3)) * rng.random()  # fewer bits, more loss
        size = int(rng.integers(10, 1000))
        options[f"layer{i}"] = [Option((w, a), float(macs * w * a), float(s), float(size * w / 8))
                                for (w, a), s in zip(BITS, sens)]
    return options


def brute_force(options, budget, size_budget=None):
    """(score, cost, option indices) of the best feasible choice; ties: cheaper, then first options."""
    rows = list(options.values())
    best = None
    for combo in itertools.product(*(range(len(r)) for r in rows)):
        chosen = [r[k] for r, k in zip(rows, combo)]
        cost = sum(o.cost for o in chosen)
        size = sum(o.size for o in chosen)
        if cost > budget or (size_budget is not None and size > size_budget):
            continue
        key = (sum(o.score for o in chosen), cost, combo)
        if best is None or key < best:
            best = key
    return best


@pytest.mark.parametrize("seed", range(8))
def test_ilp_equals_brute_force(seed):
    options = random_instance(seed)
    costs = [[o.cost for o in r] for r in options.values()]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for frac in (0.0, 0.3, 0.7, 1.0):
        budget = lo + frac * (hi - lo)
        alloc = allocate_bits(options, budget)
        score, cost, combo = brute_force(options, budget)
        assert alloc.objective == pytest.approx(score, rel=1e-12, abs=1e-15)
        assert alloc.cost <= budget and alloc.cost == cost
        assert alloc.choice == {n: options[n][k].bits for n, k in zip(options, combo)}
        assert list(alloc.choice) == list(options)


@pytest.mark.parametrize("seed", range(4))
def test_second_constraint_on_size(seed):
    options = random_instance(seed)
    hi = sum(max(o.cost for o in r) for r in options.values())
    sizes = [[o.size for o in r] for r in options.values()]
    size_budget = sum(min(s) for s in sizes) + 0.4 * (sum(max(s) for s in sizes) - sum(min(s) for s in sizes))
    alloc = allocate_bits(options, 0.8 * hi, size_budget=size_budget)
    score, cost, combo = brute_force(options, 0.8 * hi, size_budget)
    assert alloc.objective == pytest.approx(score, rel=1e-12, abs=1e-15)
    assert alloc.size <= size_budget and alloc.cost <= 0.8 * hi


def test_budget_below_the_cheapest_setting():
    options = {"a": [Option((8, 8), 640.0, 0.0), Option((4, 4), 160.0, 1.0)],
               "b": [Option((8, 8), 64.0, 0.0), Option((2, 2), 4.0, 3.0)]}
    with pytest.raises(UsageError) as err:
        allocate_bits(options, 100.0)
    assert str(err.value) == "budget 100 is below the cheapest setting's cost 164"
    assert allocate_bits(options, 164.0).choice == {"a": (4, 4), "b": (2, 2)}  # exactly at the budget
    with pytest.raises(UsageError, match="size budget 1 is below the smallest setting's size 2"):
        allocate_bits({"a": [Option((8, 8), 1.0, 0.0, 2.0)]}, 10.0, size_budget=1.0)
    with pytest.raises(UsageError, match="positive"):
        allocate_bits(options, float("nan"))
    assert allocate_bits({"a": [([4, 4], 16, 0.5)]}, 20.0).choice == {"a": (4, 4)}  # plain tuples work
    with pytest.raises(UsageError, match="an option must be Option"):
        allocate_bits({"a": [(4, 16)]}, 20.0)


def test_budget_is_respected_exactly():
    """HiGHS accepts a constraint broken by less than its feasibility tolerance (1e-7): here
    a + b costs 1e9 + 0.05 > 1e9, which plain milp returns; the exact check cuts it off."""
    options = {"a": [Option((8, 8), 5e8 + 0.05, 0.0), Option((4, 4), 1e8, 1.0)],
               "b": [Option((8, 8), 5e8, 0.0)]}
    alloc = allocate_bits(options, 1e9)
    assert alloc.choice == {"a": (4, 4), "b": (8, 8)} and alloc.cost == 6e8 and alloc.objective == 1.0


def test_ties_are_broken_deterministically():
    # every option scores 0: the cheapest allocation wins; equal costs: the option listed first
    flat = {f"l{i}": [Option((8, 8), 64.0, 0.0), Option((6, 6), 36.0, 0.0), Option((4, 4), 16.0, 0.0)]
            for i in range(4)}
    assert set(allocate_bits(flat, 1000.0).choice.values()) == {(4, 4)}
    same_cost = {f"l{i}": [Option((4, 8), 32.0, 1.0), Option((8, 4), 32.0, 1.0)] for i in range(4)}
    for _ in range(3):
        assert set(allocate_bits(same_cost, 1000.0).choice.values()) == {(4, 8)}
    # integer scores with many optima of equal score and cost: the brute-force order (first layers
    # take their earliest option) is reproduced
    rng = np.random.default_rng(0)
    options = {f"l{i}": [Option(b, float(rng.integers(1, 4)), float(rng.integers(0, 3))) for b in BITS]
               for i in range(5)}
    lo = sum(min(o.cost for o in r) for r in options.values())
    for budget in (lo, lo + 2, lo + 5):
        score, cost, combo = brute_force(options, budget)
        alloc = allocate_bits(options, budget)
        assert (alloc.objective, alloc.cost) == (score, cost)
        assert alloc.choice == {n: options[n][k].bits for n, k in zip(options, combo)}


def test_sensitivity_table_from_a_toy_loss():
    calls = []

    def loss_with(layer, bits):
        calls.append((layer, bits))
        w, a = bits
        weight = {"qkv": 1.0, "fc1": 0.5}[layer]
        return 2.0 + weight * (2.0 ** -w + 2.0 ** -a)

    table = sensitivity_table(["qkv", "fc1"], BITS, loss_with, baseline=2.0 + 2 * 2.0 ** -8, baseline_bits=(8, 8))
    assert table["qkv"][(8, 8)] == 0.0 and ("qkv", (8, 8)) not in calls  # the baseline is not re-measured
    assert table["qkv"][(4, 4)] == pytest.approx(2 * 2 ** -4 - 2 * 2 ** -8)
    assert table["fc1"][(6, 6)] == pytest.approx(0.5 * 2 * 2 ** -6 - 2 * 2 ** -8)
    assert len(calls) == 4
    per_layer = sensitivity_table(["qkv"], {"qkv": [(2, 8)]}, loss_with, baseline=2.0)
    assert per_layer == {"qkv": {(2, 8): pytest.approx(0.25 + 2 ** -8)}}
    with pytest.raises(UsageError, match="qkv at w4a4: the loss is nan"):
        sensitivity_table(["qkv"], [(4, 4)], lambda layer, bits: float("nan"), baseline=1.0)

    macs = {"patch": 10, "qkv": 100, "fc1": 200}
    options = build_options(table, macs, importance={"qkv": 2.0, "fc1": 1.0},
                            params={"patch": (4, 1), "qkv": (30, 3), "fc1": (60, 6)})
    assert [o.bits for o in options["patch"]] == [(8, 8)]  # no sensitivity row: fixed at 8/8
    qkv44 = options["qkv"][2]
    assert qkv44.cost == 100 * 16 and qkv44.score == pytest.approx(2.0 * table["qkv"][(4, 4)])
    assert qkv44.size == (4 * 30 + 32 * 3) / 8
    alloc = allocate_bits(options, budget=10 * 64 + 100 * 36 + 200 * 16)
    # fc1 is half as sensitive and half as important: it takes the 4 bits, qkv the 6
    assert alloc.choice == {"patch": (8, 8), "qkv": (6, 6), "fc1": (4, 4)}
