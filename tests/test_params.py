"""Method parameters as search variables (issue 13): ``<slot>#<method>.<param>`` keys reach the slot
(rebuilding it only when a running method's value changes), the assignment file keeps them, the
search space offers them only where their method runs, and Optuna suggests them conditionally."""

from __future__ import annotations

import random

import optuna
import pytest
import timm
import torch

from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.methods import uniform_assignment
from mnq_search.plan import load_assignment, save_assignment, split_assignment
from mnq_search.slot import param_key, split_param_key
from mnq_search.space import SearchSpace
from strategies.optuna_joint import suggest

SM = "blocks.0.attn.softmax"


@pytest.fixture()
def qmodel():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    return convert_model(model, 8)


def test_keys_split_and_join():
    key = param_key(SM, "index", "K")
    assert key == "blocks.0.attn.softmax#index.K" and split_param_key(key) == (SM, "index", "K")
    assert split_param_key(SM) is None
    methods, params = split_assignment({SM: "index", key: 16})
    assert methods == {SM: "index"} and params == {key: 16}


def test_a_parameter_reaches_the_running_method_and_rebuilds_only_on_change(qmodel):
    qmodel.set_assignment({SM: "index", f"{SM}#index.K": 16, f"{SM}#index.T": 4.0})
    slot = qmodel.slots[SM]
    impl = slot.impl
    assert (impl.K, impl.T) == (16, 4.0)
    assert qmodel.get_params() == {f"{SM}#index.K": 16, f"{SM}#index.T": 4.0}
    qmodel.set_assignment({f"{SM}#index.K": 16})  # same value: the calibrated module stays
    assert slot.impl is impl
    qmodel.set_assignment({f"{SM}#index.K": 64})
    assert slot.impl is not impl and slot.impl.K == 64 and slot.impl.T == 4.0
    qmodel.set_assignment({SM: "ibert"})  # the parameter waits for its method
    qmodel.set_assignment({SM: "index"})
    assert slot.impl.K == 64
    for bad in ({f"{SM}#index.K": 7}, {f"{SM}#index.Q": 1}, {f"{SM}#ibert.K": 16}, {"nope#index.K": 16}):
        with pytest.raises(UsageError) as err:
            qmodel.set_assignment(bad)
        assert "\n" not in str(err.value)
    assert slot.impl.K == 64  # nothing changed by a rejected assignment


def test_assignment_file_round_trip_with_parameters(qmodel, tmp_path):
    a = {**uniform_assignment("ibert", qmodel.slot_ops()), SM: "index", f"{SM}#index.K": 64, f"{SM}#index.T": "calib", "blocks.0.mlp.act": "polyfit",
         "blocks.0.mlp.act#polyfit.degree": 2}
    save_assignment(tmp_path / "a.json", a, strategy="hand")
    data = (tmp_path / "a.json").read_text()
    assert '"params"' in data and '"slots"' in data
    loaded, meta = load_assignment(tmp_path / "a.json", qmodel.slot_ops())
    assert loaded == a and meta["strategy"] == "hand"
    (tmp_path / "b.json").write_text(data.replace('"calib"', '"hot"'))
    with pytest.raises(UsageError, match="not a choice"):
        load_assignment(tmp_path / "b.json", qmodel.slot_ops())


def test_space_offers_parameters_only_where_their_method_runs(qmodel):
    space = SearchSpace.from_model(qmodel, families=("ibert", "index", "polyfit"))
    params = [v for v in space if v.kind == "param"]
    softmax_slots = [s for s, op in qmodel.slot_ops().items() if op == "softmax"]
    gelu_slots = [s for s, op in qmodel.slot_ops().items() if op == "gelu"]
    assert len(params) == 2 * len(softmax_slots) + len(gelu_slots)
    assert space[f"{SM}#index.K"].choices == (32, 16, 64) and space[f"{SM}#index.K"].default == 32
    values = {SM: "ibert", f"{SM}#index.K": 16}
    assert space.active(values) == {SM: "ibert"}
    assert space.complete({SM: "index"}) == {SM: "index", f"{SM}#index.K": 32, f"{SM}#index.T": 6.6}
    a, b = space.random(random.Random(3)), space.random(random.Random(3))
    assert a == b
    for key in a:
        if split_param_key(key):
            slot, method, _ = split_param_key(key)
            assert a[slot] == method
    without = SearchSpace.from_model(qmodel, families=("ibert", "fqvit", "ivit"))
    assert not [v for v in without if v.kind == "param"]


def test_optuna_suggests_parameters_conditionally(qmodel):
    space = SearchSpace.from_model(qmodel, families=("ibert", "index"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_index = 0
    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, space)
        assert values == space.active(values)
        for slot in (s for s, op in qmodel.slot_ops().items() if op == "softmax"):
            has = f"{slot}#index.K" in values
            assert has == (values[slot] == "index")
            seen_index += has
        study.tell(trial, 0.0)
    assert seen_index > 0
