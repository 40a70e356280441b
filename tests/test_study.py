"""Study specs: cells run once to a tidy CSV and a Markdown table; re-running skips finished cells."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mnq_search.cli import main
from mnq_search.errors import UsageError
from mnq_search.io import save_weights
from mnq_search.study import load_spec, run_study
from mnq_search.zoo import create_zoo_model
from tests.conftest import needs_full_fmnist


@pytest.fixture()
def spec(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    save_weights(create_zoo_model("fmnist-deit-tiny"), ckpt)
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
    assert (s.work_dir / "sensitivity-fmnist-deit-tiny-8bit.csv").is_file()  # shared by the greedy cells
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
