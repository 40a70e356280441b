"""A fourth method family from one file (tests/plugin_family.py) reaches everything that reads
the registries: the sensitivity pass, the strategies (uniform:exact, the greedy rules), the cost
objective, the CLI's tables and the report (issue 12)."""

from __future__ import annotations

import csv
import importlib
import json
import sys

import pytest

from mnq_search.cli import main
from mnq_search.methods import NONLINEAR_METHODS, list_families, unregister_family
from tests.search_fixtures import FAST, make_checkpoint


@pytest.fixture()
def exact_family():
    module = importlib.import_module("tests.plugin_family")
    yield module
    unregister_family("exact")
    sys.modules.pop("tests.plugin_family", None)


def test_a_family_from_one_file_reaches_sensitivity_strategies_cost_and_report(exact_family, tmp_path, capsys):
    assert list_families() == ("ibert", "fqvit", "ivit", "index", "polyfit", "exact")
    assert all("exact" in NONLINEAR_METHODS[op] for op in NONLINEAR_METHODS)
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["list", "strategies"]) == 0 and "uniform:exact" in capsys.readouterr().out

    out = tmp_path / "run"
    assert main(["run", "--strategy", "sqnr_output", "--checkpoint", str(ckpt), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "exact" in printed  # the CLI's table has a column for it
    rows = list(csv.DictReader(open(out / "sensitivity.csv")))
    exact = [r for r in rows if r["method"] == "exact"]
    assert {r["op"] for r in exact} == {"softmax", "gelu", "layernorm"}
    assert len(exact) == len({r["slot"] for r in rows})  # one row per slot
    # the float op with a fine output grid keeps more SQNR than any integer family in most slots
    best = {}
    for r in rows:
        if r["slot"] not in best or float(r["asqnr_out"]) > float(best[r["slot"]]["asqnr_out"]):
            best[r["slot"]] = r
    assert sum(b["method"] == "exact" for b in best.values()) > len(best) // 2
    result = json.loads((out / "result.json").read_text())
    assert sum(result["counts"][op].get("exact", 0) for op in result["counts"]) > 0

    assert main(["run", "--strategy", "uniform:exact", "--checkpoint", str(ckpt), "--out", str(tmp_path / "u"),
                 *FAST]) == 0
    uniform = json.loads((tmp_path / "u" / "assignment.json").read_text())["slots"]
    assert set(uniform.values()) == {"exact"}

    from objectives.cost import CostObjective

    slot_ops = {"s": "softmax"}
    assert CostObjective().evaluate({"s": "exact"}, slot_ops=slot_ops) == pytest.approx((1 + 3 + 1 + 20) / 1e6)

    capsys.readouterr()
    assert main(["report", str(tmp_path), "--no-histograms", "--quiet"]) == 0
    table3 = list(csv.DictReader(open(tmp_path / "report" / "table3_counts.csv")))
    assert "softmax.exact" in table3[0] and "Exact" in (tmp_path / "report" / "table3_counts.md").read_text()
    assert (tmp_path / "report" / "fig1_fmnist-deit-tiny_8bit.png").stat().st_size > 1000
