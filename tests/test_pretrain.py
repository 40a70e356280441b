"""Pretraining by the zoo recipe: files written, fp16 weights load back, the record holds the top-1."""

from __future__ import annotations

import json

import torch

from mnq_search.io import load_state_dict
from mnq_search.models import load_model
from mnq_search.pretrain import pretrain
from tests.conftest import needs_full_fmnist


@needs_full_fmnist
def test_pretrain_writes_loadable_fp16_weights(tmp_path):
    rec = pretrain("fmnist-deit-tiny", tmp_path, epochs=1, train_size=512, test_size=100, quiet=True)
    assert rec["train_size"] == 512 and rec["test_size"] == 100 and len(rec["history"]) == 1
    state, meta = load_state_dict(tmp_path / "fmnist-deit-tiny.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert json.loads(meta["mnq_search"])["top1"] == rec["top1"]
    model, info = load_model("fmnist-deit-tiny", checkpoint=tmp_path / "fmnist-deit-tiny.safetensors")
    assert info.weights_meta["epochs"] == 1
    assert (tmp_path / "state.pt").is_file() and (tmp_path / "fmnist-deit-tiny.json").is_file()
    # 10 classes: a model that learned anything in one epoch on 512 images beats chance clearly
    assert rec["top1"] > 15.0
