"""Every zoo entry builds at its input size, converts with the paper's slot counts, and runs quantized."""

from __future__ import annotations

import pytest
import torch

from mnq_search.convert import convert_model
from mnq_search.sensitivity import uniform_for
from mnq_search.zoo import create_zoo_model, get_zoo_entry, list_zoo

EXPECTED = {"fmnist-deit-tiny": (12, 12, 25, 5_353_738), "fmnist-vit-small": (12, 12, 25, None),
            "fmnist-swin-tiny": (12, 12, 29, None)}


@pytest.mark.parametrize("name", list_zoo())
def test_zoo_entry_converts_and_runs(name):
    torch.manual_seed(0)
    model = create_zoo_model(name).eval()
    entry = get_zoo_entry(name)
    x = torch.randn(2, 1, entry.input_size, entry.input_size)
    assert model(x).shape == (2, 10)
    q = convert_model(model, 8)
    c = q.count_slots()
    soft, gelu, ln, params = EXPECTED[name]
    assert (c["softmax"], c["gelu"], c["layernorm"]) == (soft, gelu, ln)
    if params:
        assert sum(p.numel() for p in model.parameters()) == params  # the DeiT-T-structured default
    q.set_assignment(uniform_for("ivit", q.slot_ops()))
    q.train()
    with torch.no_grad():
        q(x)
        q.eval()
        assert torch.isfinite(q(x)).all()


def test_swin_zoo_model_uses_every_stage():
    model = create_zoo_model("fmnist-swin-tiny")
    resolutions = [stage.blocks[0].input_resolution for stage in model.layers]
    assert resolutions == [(16, 16), (8, 8), (4, 4), (2, 2)]
