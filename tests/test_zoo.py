"""Every zoo entry builds at its input size, converts with the paper's slot counts, and runs quantized."""

from __future__ import annotations

import pytest
import torch

from mnq_search.convert import convert_model
from mnq_search.methods import uniform_assignment
from mnq_search.zoo import create_zoo_model, get_zoo_entry, list_zoo, shipped_record

EXPECTED = {"fmnist-deit-tiny": (12, 12, 25, 5_353_738), "fmnist-vit-small": (12, 12, 25, None),
            "fmnist-swin-tiny": (12, 12, 29, None), "fmnist-swin-micro": (10, 10, 24, None),
            "fmnist-vit-deep": (16, 16, 33, None)}


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
    q.set_assignment(uniform_assignment("ivit", q.slot_ops()))
    q.train()
    with torch.no_grad():
        q(x)
        q.eval()
        assert torch.isfinite(q(x)).all()


def test_swin_zoo_model_uses_every_stage():
    model = create_zoo_model("fmnist-swin-tiny")
    resolutions = [stage.blocks[0].input_resolution for stage in model.layers]
    assert resolutions == [(16, 16), (8, 8), (4, 4), (2, 2)]


SHIPPED = [n for n in list_zoo() if shipped_record(n) is not None]


def test_the_embedded_default_and_the_study_models_ship_weights():
    assert {"fmnist-deit-tiny", "fmnist-swin-micro", "fmnist-vit-deep"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_the_recorded_model(name):
    """Every shipped zoo model: fp16 safetensors within 12 MB, loads strictly, its record (also next
    to the file, as ``list models`` shows it) names it, and its float top-1 on the first 1,000 test
    images agrees with the top-1 the record states for the full test set."""
    from safetensors import safe_open

    from mnq_search.data import FmnistSource
    from mnq_search.models import load_model
    from mnq_search.pretrain import evaluate_float
    from mnq_search.zoo import default_weights_path

    path = default_weights_path(name)
    assert path.stat().st_size <= 12 * 2**20
    with safe_open(str(path), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
    model, info = load_model(name)
    record = info.weights_meta
    assert record["name"] == name and record["test_size"] == 10_000
    assert shipped_record(name)["top1"] == record["top1"]
    assert record["top1"] == pytest.approx(record["history"][-1]["top1"], abs=1.0)  # fp16 file vs bf16 eval
    try:
        data = FmnistSource(None)
    except Exception as exc:  # noqa: BLE001 (no data set on this machine)
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    top1 = evaluate_float(model, data.test.subset(torch.arange(1000)), get_zoo_entry(name).input_size, "cpu")
    assert abs(top1 - record["top1"]) < 3.0  # 1,000 images: a binomial s.d. of about 1.1 points


def test_swin_micro_has_shifted_windows_in_two_stages():
    model = create_zoo_model("fmnist-swin-micro")
    resolutions = [stage.blocks[0].input_resolution for stage in model.layers]
    assert resolutions == [(16, 16), (8, 8), (4, 4)]
    shifted = [any(b.shift_size != (0, 0) for b in stage.blocks) for stage in model.layers]
    assert shifted == [True, True, False]  # the last stage is one window: nothing to shift


@pytest.mark.parametrize("name", list_zoo())
def test_checkpoint_header_names_the_converted_slots(name, tmp_path):
    """The torch-free preflight of an assignment file reads the slots from the checkpoint's tensor
    names: for every zoo architecture they are exactly the converted model's slots and ops."""
    from mnq_search.convert import convert_model
    from mnq_search.io import save_weights
    from mnq_search.preflight import checkpoint_slots

    model = create_zoo_model(name)
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    assert checkpoint_slots(path) == convert_model(model).slot_ops()
    assert checkpoint_slots(tmp_path / "m.pth") is None


def test_a_zoo_model_without_weights_is_a_one_line_error_naming_both_ways_out():
    from mnq_search.errors import UsageError
    from mnq_search.models import load_model

    assert shipped_record("fmnist-vit-small") is None  # a zoo entry whose weights are not shipped
    with pytest.raises(UsageError) as err:
        load_model("fmnist-vit-small")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("no weights for zoo model 'fmnist-vit-small': run 'mnq-search pretrain fmnist-vit-small' "
                   "first, or pass --checkpoint PATH")
    model, info = load_model("fmnist-vit-small", random_weights=True)  # speed runs need no weights
    assert info.checkpoint is None and model.num_classes == 10
