"""The default run's images ship with the package (mnq_search/embedded.py): the same images,
labels and top-1 as the full Fashion-MNIST, and a one-line error for anything they cannot serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mnq_search.data import FmnistSource, calibration_indices, seeded_subset, validation_indices
from mnq_search.embedded import CALIB_IMAGES, EMBEDDED_FILE, EVAL_IMAGES, EmbeddedFmnistSource
from mnq_search.errors import UsageError
from tests.conftest import needs_full_fmnist


def batches(it):
    xs, ys = zip(*list(it))
    return torch.cat(xs), torch.cat(ys)


def test_the_file_is_small_and_holds_the_default_images():
    assert EMBEDDED_FILE.stat().st_size < 2_000_000  # compressed: 0.95 MB
    src = EmbeddedFmnistSource()
    assert src.test.images.shape == (EVAL_IMAGES, 1, 28, 28) and src.test.images.dtype == torch.uint8
    assert src.calib.images.shape == (CALIB_IMAGES, 1, 28, 28)
    assert set(src.test.labels.tolist()) == set(range(10))
    assert torch.equal(src.test_index, seeded_subset(10_000, EVAL_IMAGES, 0))
    assert torch.equal(src.calib_index, calibration_indices(60_000, CALIB_IMAGES))


def test_calibration_validation_and_test_are_disjoint():
    calib = set(calibration_indices(60_000, 128).tolist())
    val = set(validation_indices(60_000, 5000).tolist())
    assert len(calib) == 128 and len(val) == 5000 and not calib & val
    assert set(validation_indices(60_000, 2000).tolist()) <= val  # nested
    assert set(calibration_indices(60_000, 40).tolist()) <= calib


@needs_full_fmnist
@pytest.mark.parametrize("n_eval, n_calib", [(EVAL_IMAGES, CALIB_IMAGES), (700, 40)])
def test_same_images_and_labels_as_the_full_data_set(n_eval, n_calib):
    full, emb = FmnistSource(), EmbeddedFmnistSource()
    for a, b in ((full.eval_batches(n_eval, 100), emb.eval_batches(n_eval, 100)),
                 (full.calib_batches(n_calib, 32), emb.calib_batches(n_calib, 32))):
        (xa, ya), (xb, yb) = batches(a), batches(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("call, needle", [
    (lambda s: s.require(None, 128), "--eval-size all"),
    (lambda s: s.require(5000, 128), "--eval-size 5000"),
    (lambda s: s.require(2000, 256), "--calib-size 256"),
    (lambda s: s.require(2000, 128, training=True), "training"),
    (lambda s: s.require(2000, 128, validation=500), "validation"),
    (lambda s: s.calib_batches(128, 32, seed=3), "calibration"),
])
def test_what_the_subset_cannot_serve_is_a_one_line_error(call, needle):
    with pytest.raises(UsageError, match=needle) as exc:
        call(EmbeddedFmnistSource())
    assert "dataset-fashion-mnist" in str(exc.value) and "\n" not in str(exc.value)


def _run(tmp_path, name, env_extra):
    out = tmp_path / name
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, "-m", "mnq_search.cli", "run", "--strategy", "uniform:ibert", "--eval-size", "300",
           "--calib-size", "32", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "result.json").read_text())


@needs_full_fmnist
def test_a_run_gives_the_same_top1_with_and_without_the_full_data_set(tmp_path):
    full = _run(tmp_path, "full", {})
    emb = _run(tmp_path, "embedded", {"MNQ_FMNIST_DIR": str(tmp_path / "nowhere")})
    assert not full["data_embedded"] and emb["data_embedded"]
    for key in ("top1_fp", "top5_fp", "top1_quant", "top5_quant", "eval_images"):
        assert full[key] == emb[key], key


def test_eval_size_all_without_the_data_set_fails_at_once(tmp_path):
    env = dict(os.environ, MNQ_FMNIST_DIR=str(tmp_path / "nowhere"))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mnq_search.cli", "run", "--eval-size", "all", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - t < 30
    assert proc.stderr.count("\n") == 1 and "--eval-size all needs the full Fashion-MNIST" in proc.stderr
    assert not (tmp_path / "out").exists()
