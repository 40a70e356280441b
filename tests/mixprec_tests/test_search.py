"""Bit-widths per layer on a converted model (issue 14): setting them, scoring them incrementally,
their sensitivity, and the allocation under a budget (Mix-QViT)."""

from __future__ import annotations


import pytest
import timm
import torch

from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.incremental import IncrementalEvaluator
from mnq_search.methods import uniform_assignment
from mnq_search.testing import fresh_kl
from mnq_search.mixprec import (allocate, bit_sensitivity, bits_summary, layer_bits, layer_macs, parse_budget,
                                set_layer_bits, total_bops)


def _tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    q = convert_model(model, bits=8)
    q.set_assignment(uniform_assignment("ibert", q.slot_ops()))
    return model, q


def test_set_bits_requantizes_weights_and_inputs():
    _, q = _tiny()
    fc1 = q.model.blocks[0].mlp.fc1
    w8, _ = fc1.linear.quant_weight()
    set_layer_bits(q, {"blocks.0.mlp.fc1": (4, 5)})
    w4, s4 = fc1.linear.quant_weight()  # the cache follows the bit-width
    assert int(w8.abs().max()) == 127 and int(w4.abs().max()) == 7
    assert fc1.q_in.bits == 5 and layer_bits(q)["blocks.0.mlp.fc1"] == (4, 5)
    with pytest.raises(UsageError):
        set_layer_bits(q, {"blocks.0.mlp.fc9": (4, 4)})
    with pytest.raises(UsageError):
        set_layer_bits(q, {"blocks.0.mlp.fc1": (1, 4)})
    assert layer_bits(q)["blocks.0.mlp.fc1"] == (4, 5)  # unchanged by the rejected calls
    del s4
    for b, qmax in ((3, 3), (2, 1)):  # one layer may go below the model's 4 bits
        set_layer_bits(q, {"blocks.0.mlp.fc1": (b, b)})
        w, _ = fc1.linear.quant_weight()
        assert int(w.abs().max()) == qmax and fc1.q_in.bits == b
        x = torch.randn(2, 1, 28, 28)
        assert torch.isfinite(q(x)).all()


def test_evaluator_with_bits_equals_a_fresh_calibration():
    model, q = _tiny()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 1, 28, 28, generator=gen)]
    val = [torch.randn(8, 1, 28, 28, generator=gen)]
    a = q.get_assignment()
    ev = IncrementalEvaluator(q, model, calib, val)
    ev.score(a)
    base = layer_bits(q)
    for change in ({"blocks.1.mlp.fc2": (4, 4)}, {"blocks.0.attn.qkv": (5, 5), "head": (6, 6)}, {}):
        bits = {**base, **change}
        kl = ev.score(a, bits=bits)
        want, _ = fresh_kl(q, model, calib, val[0], lambda m, bits=bits: set_layer_bits(m, bits))
        assert kl == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_sensitivity_and_allocation_under_the_budget():
    model, q = _tiny()
    gen = torch.Generator().manual_seed(2)
    ev = IncrementalEvaluator(q, model, [torch.randn(8, 1, 28, 28, generator=gen)],
                              [torch.randn(8, 1, 28, 28, generator=gen)])
    cands = ((4, 4), (6, 6), (8, 8))
    sens, kl0 = bit_sensitivity(ev, q.get_assignment(), cands)
    assert set(sens) == set(layer_bits(q)) and len(sens) == 2 * 4 + 2  # block linears, patch embedding, head
    assert all(row[(8, 8)] == 0.0 for row in sens.values())
    assert sum(row[(4, 4)] for row in sens.values()) > 0  # 4 bits hurt on the whole
    macs = layer_macs(q)
    for budget in ("w8a8", "w6a6", "w4a4"):
        alloc, value = allocate(q, sens, budget)
        assert value == parse_budget(budget, macs)
        assert total_bops(macs, alloc.choice) == alloc.cost <= value
    alloc, _ = allocate(q, sens, "w4a4")
    assert set(alloc.choice.values()) == {(4, 4)}  # the cheapest setting is the only one that fits
    alloc, _ = allocate(q, sens, "w8a8")
    assert alloc.objective == pytest.approx(min(0.0, sum(min(r.values()) for r in sens.values())))
    set_layer_bits(q, alloc.choice)
    summary = bits_summary(q)
    assert summary["bops_per_image"] == alloc.cost and len(summary["layers"]) == 10
    del kl0


def test_bit_widths_as_assignment_keys_and_search_variables(tmp_path):
    from mnq_search.plan import load_assignment, save_assignment
    from mnq_search.space import SearchSpace
    from objectives.bops import BopsObjective

    _, q = _tiny()
    space = SearchSpace.from_model(q, kinds=("method", "param", "bits"), bits=(4, 6))
    bits_vars = space.variables("bits")
    assert [v.name for v in bits_vars][:2] == ["patch_embed.proj@bits", "blocks.0.attn.qkv@bits"]
    assert len(bits_vars) == 10 and all(v.choices == (4, 6, 8) and v.default == 8 for v in bits_vars)
    a = dict(q.get_assignment(), **{"blocks.0.mlp.fc1@bits": 4, "head@bits": 6})
    assert space.complete(a)["blocks.1.mlp.fc2@bits"] == 8  # a bit-width left out: the default
    q.set_assignment(a)
    assert layer_bits(q)["blocks.0.mlp.fc1"] == (4, 4) and layer_bits(q)["head"] == (6, 6)
    before = layer_bits(q)
    for bad in ({"blocks.0.mlp.fc1@bits": 1}, {"blocks.0.mlp.fc7@bits": 4}, {"blocks.0.nrm1": "ibert", "head@bits": 4}):
        with pytest.raises(UsageError):
            q.set_assignment(bad)
        assert layer_bits(q) == before  # checked before anything changes
    # the assignment file keeps them in a "layer_bits" section and reads them back
    save_assignment(tmp_path / "a.json", a, model="tiny")
    again, _ = load_assignment(tmp_path / "a.json", q.slot_ops())
    assert again == a
    # the BOPs objective counts MACs x w x a with those bit-widths, the rest at the model's
    obj = BopsObjective()
    obj.macs, obj.base = layer_macs(q), {n: (8, 8) for n in layer_macs(q)}
    want = sum(m * (16 if n == "blocks.0.mlp.fc1" else 36 if n == "head" else 64) for n, m in obj.macs.items())
    assert obj.evaluate(a) == pytest.approx(want / 1e9)


def test_separate_input_bits_as_values_variables_and_files(tmp_path):
    from mnq_search.budget import bits_pair, bits_value, parse_search_bits
    from mnq_search.plan import load_assignment, save_assignment
    from mnq_search.space import SearchSpace
    from objectives.bops import BopsObjective

    assert parse_search_bits("6,w4a8,4") == ((4, 4), (4, 8), (6, 6))
    assert parse_search_bits("W4A8, 4") == ((4, 4), (4, 8))
    for bad in ("1,8", "w4a9", "w4", "x", "4,,6"):
        with pytest.raises(UsageError, match="--search-bits"):
            parse_search_bits(bad)
    assert [bits_value(*p) for p in ((4, 4), (4, 8))] == [4, "w4a8"]
    assert bits_pair("w4a8") == (4, 8) and bits_pair(6) == (6, 6) and bits_pair("6") == (6, 6)
    assert bits_pair(True) is None and bits_pair("w1a8") is None and bits_pair(9) is None

    _, q = _tiny()
    space = SearchSpace.from_model(q, kinds=("method", "bits"), bits=((4, 8), (6, 6)))
    assert all(v.choices == ("w4a8", 6, 8) and v.default == 8 for v in space.variables("bits"))
    a = dict(q.get_assignment(), **{"blocks.0.mlp.fc1@bits": "w4a8", "head@bits": 6})
    q.set_assignment(a)
    assert layer_bits(q)["blocks.0.mlp.fc1"] == (4, 8) and q.model.blocks[0].mlp.fc1.q_in.bits == 8
    with pytest.raises(UsageError, match="wXaY"):
        q.set_assignment({"blocks.0.mlp.fc1@bits": "w4b8"})
    save_assignment(tmp_path / "a.json", a, model="tiny")
    again, _ = load_assignment(tmp_path / "a.json", q.slot_ops())
    assert again == a
    obj = BopsObjective()
    obj.macs, obj.base = layer_macs(q), {n: (8, 8) for n in layer_macs(q)}
    want = sum(m * (32 if n == "blocks.0.mlp.fc1" else 36 if n == "head" else 64) for n, m in obj.macs.items())
    assert obj.evaluate(a) == pytest.approx(want / 1e9)
