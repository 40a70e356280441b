"""Study specs: cells run once to a tidy CSV and a Markdown table; re-running skips finished cells."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mnq_search.cli import main
from mnq_search.errors import UsageError
from mnq_search.io import save_weights
from mnq_search.study import load_spec, run_study
from mnq_search.zoo import create_zoo_model
from tests.conftest import needs_full_fmnist


def zoo_checkpoint(tmp_path):
    """The default zoo model with seeded random weights, as a checkpoint file."""
    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    save_weights(create_zoo_model("fmnist-deit-tiny"), ckpt)
    return ckpt


@pytest.fixture()
def spec(tmp_path):
    ckpt = zoo_checkpoint(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(f'''
name = "mini"
models = ["fmnist-deit-tiny"]
bits = [8]
strategies = ["float", "uniform:ivit", "sqnr_diff"]
qat_epochs = [0, 1]
[run]
checkpoint = "{ckpt}"
calib_size = 16
eval_size = 30
batch_size = 30
[qat]
batch_size = 16
train_images = 32
''')
    return path


@needs_full_fmnist
def test_study_runs_every_cell_once(spec, capsys):
    csv_path = run_study(spec, progress=False)
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["strategy"], r["bits"], r["qat_epochs"]) for r in rows] == [
        ("float", "32", "0"), ("uniform:ivit", "8", "0"), ("uniform:ivit", "8", "1"),
        ("sqnr_diff", "8", "0"), ("sqnr_diff", "8", "1")]
    assert all(0.0 <= float(r["top1"]) <= 100.0 and float(r["seconds"]) > 0 for r in rows)
    md = csv_path.with_suffix(".md").read_text()
    assert "| sqnr_diff |" in md and "8-bit QAT 1" in md
    s = load_spec(spec)
    assert (s.work_dir / "sensitivity-fmnist-deit-tiny-8bit-nl8.csv").is_file()  # shared by the greedy cells
    qat_run = s.work_dir / "runs" / "fmnist-deit-tiny-8bit-sqnr_diff-qat1"  # Figure 3 and 4 inputs
    assert len(list(csv.DictReader((qat_run / "slot_asqnr.csv").open()))) == 12 + 12 + 25
    assert [r["epoch"] for r in csv.DictReader((qat_run / "history.csv").open())] == ["1"]
    cell = s.work_dir / "cells" / "fmnist-deit-tiny-8bit-sqnr_diff-qat1.json"
    cell.write_text(json.dumps(dict(json.loads(cell.read_text()), top1=12.5)))  # a finished cell is not redone
    assert main(["study", "run", str(spec), "--quiet"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["top1"] for r in rows if r["strategy"] == "sqnr_diff" and r["qat_epochs"] == "1"] == ["12.5"]


@pytest.mark.parametrize("text, needle", [
    ('name = "x"\nmodels = ["fmnist-deit-tiny"]\nbits = [9]\nstrategies = ["sqnr_diff"]', "4..8"),
    ('name = "x"\nmodels = ["nope"]\nbits = [8]\nstrategies = ["sqnr_diff"]', "unknown model"),
    ('name = "x"\nmodels = ["fmnist-deit-tiny"]\nbits = [8]\nstrategies = ["sqnr"]', "unknown strategy"),
    ('name = "x"\nmodels = ["fmnist-deit-tiny"]\nbits = [8]\nstrategies = ["float"]\n[run]\nbitz = 3', "unknown [run] key"),
    ('name = "x"\nbits = [8]', "has no 'models'"),
    ('name = "x" models', "not valid TOML"),
])
def test_bad_specs_are_one_line_errors(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_spec(p)


@needs_full_fmnist
def test_a_killed_study_loses_no_finished_cell_and_repeats_none(tmp_path, monkeypatch):
    """The grouped form with recorded images: kill the study in its third cell, run it again: the
    two finished cells are not run again, every cell ends up run exactly once, and the statistics
    compare every strategy with the best uniform method (selected on validation)."""
    import mnq_search.pipeline as pipeline

    ckpt = zoo_checkpoint(tmp_path)
    path = tmp_path / "g.toml"
    path.write_text(f'''
name = "grouped"
[[group]]
models = ["fmnist-deit-tiny"]
bits = [8]
nl_bits = [6]
strategies = ["uniform:ibert", "uniform:ivit", "random", "coordinate"]
random_seeds = [0, 1]
[run]
families = ["ibert", "fqvit", "ivit"]
checkpoint = "{ckpt}"
calib_size = 8
eval_size = 40
batch_size = 20
val_size = 20
val_eval_size = 40
record = true
[qat_phase]
steps = 2
batch_size = 8
select = ["best_uniform", "best_search"]
''')
    calls = []
    real = pipeline.run

    def counting(settings):
        calls.append(settings.out)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the middle of the third cell
        return real(settings)

    monkeypatch.setattr(pipeline, "run", counting)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, progress=False)
    s = load_spec(path)
    assert len(list((s.work_dir / "cells").glob("*.json"))) == 2
    monkeypatch.setattr(pipeline, "run", lambda st: (calls.append(st.out), real(st))[1])
    csv_path = run_study(path, progress=False)
    ptq = [c for c in calls]
    assert len(ptq) == len(set(ptq)) + 1  # only the killed cell ran twice
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["strategy"] for r in rows if r["regime"] == "ptq"] == [
        "uniform:ibert", "uniform:ivit", "random", "random", "coordinate"]
    assert all(float(r["cost_mop"]) > 0 and r["top1_val"] for r in rows)
    qat = [r for r in rows if r["regime"] == "qat"]
    assert len(qat) == 2 and all(r["qat_of"] for r in qat) and {r["seed"] for r in qat} == {"0"}  # the QAT seed
    stats = list(csv.DictReader((s.results_dir / "grouped_stats.csv").open()))
    base = max((r for r in rows if r["strategy"].startswith("uniform:")), key=lambda r: float(r["top1_val"]))
    assert {r["baseline"] for r in stats} == {base["strategy"]}
    assert len([r for r in stats if r["regime"] == "ptq"]) == 4 and len([r for r in stats if r["regime"] == "qat"]) == 1
    for r in stats:
        assert float(r["lo"]) <= float(r["diff"]) <= float(r["hi"]) and 0 <= float(r["p"]) <= float(r["p_holm"]) <= 1
    assert (s.results_dir / "grouped.png").stat().st_size > 2000
    (line,) = list(csv.DictReader((s.results_dir / "grouped_summary.csv").open()))
    ptq = [r for r in rows if r["regime"] == "ptq" and not r["strategy"].startswith("uniform:")]
    assert line["uniform"] == base["strategy"] and line["search"].split(" (seed")[0] == max(
        ptq, key=lambda r: float(r["top1_val"]))["strategy"]
    assert line["greedy"] == "" and line["qat_uniform"] and line["verdict"] in ("wins", "loses", "within noise")
    assert line["cells"] == "5 of 5" and line["qat_diff_search"] != "" and line["qat_seeds"] == "1"
    n_before = len(calls)
    run_study(path, progress=False)  # everything finished: nothing runs
    assert len(calls) == n_before


def test_models_outside_the_spec_or_without_weights_are_refused_before_any_cell(tmp_path, monkeypatch, capsys):
    from mnq_search import study, zoo

    path = tmp_path / "two.toml"
    path.write_text('name = "two"\nmodels = ["fmnist-deit-tiny", "fmnist-vit-deep"]\nbits = [8]\n'
                    'strategies = ["uniform:ivit"]\n')
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "none")  # no model has shipped weights here
    monkeypatch.setattr(study, "_run_cell", lambda *a: pytest.fail("a cell ran"))
    assert main(["study", "run", str(path), "--models", "fmnist-swin-micro", "--quiet"]) == 2
    assert "--models: fmnist-swin-micro is not a model of" in capsys.readouterr().err
    assert main(["study", "run", str(path), "--models", "fmnist-deit-tiny", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no weights for zoo model 'fmnist-deit-tiny'" in err and "mnq-search pretrain" in err
    assert main(["study", "tables", str(path), "--models", "nope"]) == 2
    assert "--models: nope is not a model of" in capsys.readouterr().err


@needs_full_fmnist
def test_models_runs_only_those_models_cells(tmp_path):
    ckpt = zoo_checkpoint(tmp_path)
    path = tmp_path / "two.toml"
    path.write_text(f'''
name = "two"
models = ["fmnist-deit-tiny", "fmnist-vit-deep"]
bits = [8]
strategies = ["uniform:ivit"]
[run]
checkpoint = "{ckpt}"
calib_size = 8
eval_size = 20
batch_size = 20
''')
    assert main(["study", "run", str(path), "--models", "fmnist-deit-tiny", "--quiet"]) == 0
    rows = list(csv.DictReader((tmp_path / "results" / "two.csv").open()))
    assert [(r["model"], r["strategy"]) for r in rows] == [("fmnist-deit-tiny", "uniform:ivit")]
    # the part of the study that ran, tabulated on its own next to the whole study's tables
    assert main(["study", "tables", str(path), "--models", "fmnist-deit-tiny"]) == 0
    part = tmp_path / "results" / "two_fmnist-deit-tiny.csv"
    assert part.read_text() == (tmp_path / "results" / "two.csv").read_text()
    md = part.with_suffix(".md").read_text()
    assert "--models fmnist-deit-tiny`): a part of the study `two`" in md and "## fmnist-vit-deep" not in md


def test_summary_selects_greedy_and_search_on_validation_and_reports_test():
    """One line per setting: the best greedy rule and the best search are the ones with the highest
    *validation* top-1, even where another has the higher test top-1; the QAT columns are those very
    cells' QAT runs (a random cell's by its cell id) of the lowest QAT seed; the verdict follows Holm."""
    from mnq_search.study_summary import markdown, summary_rows, verdict

    def stat(strategy, top1, val, diff, p_holm, seed=None):
        cell = f"m-{strategy}" + (f"-s{seed}" if seed is not None else "")
        return {"model": "m", "bits": 8, "nl_bits": 4, "regime": "ptq", "seed": seed, "strategy": strategy,
                "baseline": "uniform:ibert", "top1": top1, "top1_baseline": 70.0, "top1_val": val, "diff": diff,
                "lo": diff - 1, "hi": diff + 1, "p_holm": p_holm, "cell": cell, "qat_of": None}

    def qat(ptq, diff, seed, top1_baseline=78.5):
        return {**ptq, "regime": "qat", "seed": seed, "diff": diff, "lo": diff - 1, "hi": diff + 1, "p_holm": 0.01,
                "top1_baseline": top1_baseline, "cell": f"{ptq['cell']}-qatphase-s{seed}", "qat_of": ptq["cell"]}

    ptq = [stat("uniform:ivit", 60.0, 59.0, -10.0, 1e-9), stat("sqnr_output", 75.0, 74.0, 5.0, 1e-6),
           stat("sqnr_diff", 40.0, 41.0, -30.0, 1e-9), stat("sqnr_gain", 77.0, 73.0, 7.0, 1e-7),
           stat("random", 79.0, 70.5, 9.0, 1e-8, seed=3), stat("random", 78.0, 78.0, 8.0, 1e-8, seed=4),
           stat("sequential", 78.0, 77.5, 8.0, 1e-8), stat("coordinate", 78.5, 77.5, 8.5, 1e-8),
           stat("sqnr_diff", 40.0, None, -30.0, 1e-9)]  # no validation top-1: never chosen
    rows = [{"model": "m", "strategy": "float", "regime": "float", "top1": 82.0}] + [
        {"model": "m", "bits": 8, "nl_bits": 4, "regime": "ptq", "strategy": r["strategy"]} for r in ptq[:8]]
    # QAT runs of seeds 1 and 0 (listed in that order), of the greedy pick, of random seed 4, of random seed 3
    stats = ptq + [qat(ptq[1], 1.5, 1, 79.0), qat(ptq[1], 1.0, 0), qat(ptq[5], 2.5, 0), qat(ptq[4], -9.0, 0)]
    (line,) = summary_rows(stats, rows, {("m", 8, 4): 9})
    assert (line["float"], line["uniform"], line["top1_uniform"]) == (82.0, "uniform:ibert", 70.0)
    assert (line["greedy"], line["diff_greedy"]) == ("sqnr_output", 5.0)  # not sqnr_gain: lower on validation
    assert (line["search"], line["diff_search"]) == ("random (seed 4)", 8.0)  # not seed 3: lower on validation
    assert (line["diff_paper_rule"], line["qat_uniform"], line["qat_seed"], line["qat_seeds"]) == (-30.0, 78.5, 0, 2)
    assert (line["qat_diff_greedy"], line["qat_diff_search"]) == (1.0, 2.5)  # seed 0; random seed 4's own run
    assert (line["cells"], line["verdict"]) == ("8 of 9", "wins (partial)")
    text = markdown([line], "s")
    assert "| m | 8 / 4 | 82.00 | uniform:ibert 70.00 | sqnr_output 75.00 (+5.00 [+4.00, +6.00], p < 0.0001) |" in text
    assert "(seed 0 of 2) |  | 8 of 9 | **wins (partial)** |" in text
    (tie,) = summary_rows([r for r in stats if r["strategy"] != "random"], rows, {("m", 8, 4): 8})
    assert tie["search"] == "sequential" and tie["cells"] == "8 of 8"  # a tie on validation: the earlier one
    (early,) = summary_rows(stats[:1], rows[:2], {("m", 8, 4): 9})  # one uniform cell in: nothing else run yet
    assert (early.get("greedy"), early.get("search"), early["cells"]) == (None, None, "1 of 9")
    assert "| not run yet | not run yet | not run yet | not run | " in markdown([early], "s")
    assert [verdict(0.3, 0.2), verdict(-1.0, 0.01), verdict(None, None)] == ["within noise", "loses", "not measured"]


def test_dominance_on_the_accuracy_cost_plane_per_cost_table(tmp_path):
    """A mixed cell dominates a uniform cell of its setting when it is at least as accurate at no more
    cost, better in one, per cost table; the float cell (first, without costs) hides no cost column."""
    from types import SimpleNamespace

    from mnq_search.stats import pack
    from mnq_search.study_stats import comparisons, write_statistics

    spec = SimpleNamespace(work_dir=tmp_path)
    rng = np.random.default_rng(0)
    cells = {"float": (0.9, {}), "uniform:ibert": (0.7, {"cost_mop": 10.0, "cost_energy": 5.0}),
             "uniform:fqvit": (0.6, {"cost_mop": 30.0, "cost_energy": 9.0}),
             "per_op": (0.8, {"cost_mop": 12.0, "cost_energy": 4.0})}
    rows = []
    for i, (strategy, (acc, cost)) in enumerate(cells.items()):
        correct = rng.random(400) < acc
        run = tmp_path / "runs" / f"c{i}"
        run.mkdir(parents=True)
        np.savez(run / "correct.npz", test=pack(correct), n=400)
        rows.append({"model": "m", "bits": 8, "nl_bits": 4, "strategy": strategy, "cell": f"c{i}",
                     "regime": "float" if strategy == "float" else "ptq", "top1": 100 * correct.mean(),
                     "top1_val": {"float": None, "uniform:ibert": 70.0, "uniform:fqvit": 60.0, "per_op": 80.0}[strategy],
                     **cost})
    out = {r["strategy"]: r for r in comparisons(spec, rows)}
    assert set(out) == {"uniform:fqvit", "per_op"} and out["per_op"]["baseline"] == "uniform:ibert"
    assert out["per_op"]["top1"] > out["per_op"]["top1_baseline"]
    assert out["per_op"]["dominates_cost_mop"] == "uniform:fqvit"  # costs more than I-BERT's 10
    assert out["per_op"]["dominates_cost_energy"] == "uniform:ibert;uniform:fqvit"
    assert out["per_op"]["cost_energy_baseline"] == 5.0 and "dominates_cost_mop" not in out["uniform:fqvit"]
    spec.results_dir, spec.name, spec.cells = tmp_path, "s", list  # no planned cells: the summary counts what is in
    write_statistics(spec, rows)  # the CSV keeps the columns that only mixed cells have
    written = {r["strategy"]: r for r in csv.DictReader((tmp_path / "s_stats.csv").open())}
    assert written["per_op"]["dominates_cost_energy"] == "uniform:ibert;uniform:fqvit"
    assert written["uniform:fqvit"]["dominates_cost_mop"] == ""
    (line,) = list(csv.DictReader((tmp_path / "s_summary.csv").open()))
    assert line["search_dominates"] == "cost_mop: uniform:fqvit; cost_energy: uniform:ibert;uniform:fqvit"
