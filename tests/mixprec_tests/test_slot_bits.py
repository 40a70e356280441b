"""Bit-widths per Softmax and GELU slot (issue 14, "per non-linear slot: method and input bits"):
``<slot>@bits`` keys on a converted model, in the search space, the assignment file, the incremental
evaluator and the BOPs objective (which then counts the attention products)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import timm
import torch

from mnq_search.calibrate import calibrate
from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.incremental import IncrementalEvaluator
from mnq_search.methods import uniform_assignment
from mnq_search.slot import bits_key
from mnq_search.testing import fresh_kl

SOFTMAX0, GELU1, LN0 = "blocks.0.attn.softmax", "blocks.1.mlp.act", "blocks.0.norm1"


def _vit(nl_bits=None):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    q = convert_model(model, bits=8, nl_bits=nl_bits)
    q.set_assignment(uniform_assignment("ibert", q.slot_ops()))
    return model, q


def _images(n=8, seed=3):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_slot_bits_set_the_input_and_output_grids():
    _, q = _vit()
    assert q.slot_bits() == {s: 8 for s, op in q.slot_ops().items() if op != "layernorm"}
    q.set_assignment({bits_key(SOFTMAX0): 5, bits_key(GELU1): 6})
    slots = q.slots
    assert slots[SOFTMAX0].q_in.bits == 5 and slots[SOFTMAX0].impl.bits == 5 and slots[GELU1].q_in.bits == 6
    assert q.slot_bits()[SOFTMAX0] == 5 and q.slot_bits()["blocks.1.attn.softmax"] == 8
    calibrate(q, [(_images(), None)])
    seen = {}
    slots[SOFTMAX0].recorder = lambda name, x, y: seen.update(x=x, y=y, s=slots[SOFTMAX0].out_scale)
    with torch.inference_mode():
        q(_images(2, seed=4))
    s_in = slots[SOFTMAX0].q_in.scale
    q_in = torch.round(seen["x"] / s_in)
    assert q_in.min() >= -16 and q_in.max() <= 15  # a 5-bit signed input grid
    q_out = torch.round(seen["y"] / seen["s"])
    # I-BERT's output grid at 5 bits: scale 2**-5, integers in [0, 31] (this random model attends evenly)
    assert float(seen["s"]) == 2**-5 and torch.equal(q_out, seen["y"] * 32)
    assert q_out.min() >= 0 and q_out.max() <= 31


def test_setting_every_slot_equals_converting_at_those_bits():
    _, q8 = _vit()
    _, q6 = _vit(nl_bits=6)
    q8.set_slot_bits({s: 6 for s in q8.slot_bits()})
    x = _images()
    for q in (q8, q6):
        calibrate(q, [(x, None)])
    with torch.inference_mode():
        assert torch.equal(q8(_images(4, seed=5)), q6(_images(4, seed=5)))


def test_bad_slot_bits_are_one_line_errors_and_change_nothing():
    _, q = _vit()
    before = (q.get_assignment(), q.slot_bits())
    for bad, match in (({bits_key(LN0): 6}, "16-bit residual"), ({bits_key(SOFTMAX0): 3}, "4..8"),
                       ({bits_key(SOFTMAX0): "w4a8"}, "integer bit-width")):
        with pytest.raises(UsageError, match=match):
            q.set_assignment({"blocks.0.mlp.act": "ivit", bits_key(GELU1): 6, **bad})
    assert (q.get_assignment(), q.slot_bits()) == before


def test_space_file_round_trip_and_complete(tmp_path):
    from mnq_search.plan import load_assignment, save_assignment
    from mnq_search.space import SearchSpace

    _, q = _vit()
    space = SearchSpace.from_model(q, kinds=("method", "nl_bits"), nl_bits=(4, 6))
    nl = space.variables("nl_bits")
    assert [v.name for v in nl] == [bits_key(s) for s in q.slot_bits()] and len(nl) == 4  # 2 softmax + 2 GELU
    assert all(v.choices == (4, 6, 8) and v.default == 8 for v in nl)
    a = space.complete(q.get_assignment())
    assert {a[v.name] for v in nl} == {8}
    a[bits_key(SOFTMAX0)] = 4
    space.validate(a)
    with pytest.raises(UsageError, match="not a choice"):
        space.validate({**a, bits_key(GELU1): 5})
    save_assignment(tmp_path / "a.json", a, bits=8)
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["layer_bits"][SOFTMAX0] == 4 and bits_key(SOFTMAX0) not in data["slots"]
    back, _ = load_assignment(tmp_path / "a.json", q.slot_ops())
    assert back == a


def test_evaluator_with_slot_bits_equals_a_fresh_calibration():
    model, q = _vit()
    calib, val = [_images(8, 6)], [_images(8, 7)]
    ev = IncrementalEvaluator(q, model, calib, val)
    a = q.get_assignment()
    base = ev.score(a)
    spec = {GELU1: 5, SOFTMAX0: 6}
    got = ev.score({**a, **{bits_key(n): b for n, b in spec.items()}})
    want, _ = fresh_kl(q, model, calib, val[0], lambda m: m.set_slot_bits(spec))
    assert got == pytest.approx(want, rel=1e-9) and got != base
    assert ev.score({**a, **{bits_key(n): 8 for n in spec}}) == pytest.approx(base, rel=1e-9)  # and back


def test_bops_count_the_attention_products_at_the_softmax_bits():
    from mnq_search.mixprec import attention_macs, layer_bits, layer_macs, total_bops
    from mnq_search.space import SearchSpace
    from objectives import get_objective

    _, q = _vit()
    x = _images(2)
    # 2 heads, 4x4 patches + the class token = 17 tokens, head dim 16: 2 * 17 * 17 * 16 MACs per product
    assert attention_macs(q, x) == {f"blocks.{i}.attn.softmax": (9248, 8) for i in range(2)}
    ctx = SimpleNamespace(qmodel=q, device="cpu", calib_batches=lambda: [(x, None)],
                          search_space=SearchSpace.from_model(q, kinds=("method", "nl_bits")))
    obj = get_objective("bops")()
    obj.setup(ctx)
    a = q.get_assignment()
    weights = total_bops(layer_macs(q), layer_bits(q))
    assert obj.evaluate(a) == pytest.approx((weights + 2 * 9248 * 8 * (8 + 8)) / 1e9)
    low = obj.evaluate({**a, bits_key(SOFTMAX0): 4, bits_key(GELU1): 4})  # a GELU's bits change no BOPs
    assert obj.evaluate(a) - low == pytest.approx(9248 * 8 * 4 / 1e9)
    # w6a6: the weight layers at 6 bits and the probabilities at 6 (q k^T stays at the qkv grid's 8)
    assert obj.budget("w6a6") == pytest.approx((total_bops(layer_macs(q), default=(6, 6)) + 2 * 9248 * 8 * 14) / 1e9)
    plain = get_objective("bops")()  # a space without slot bits: the weight layers only, as before
    plain.setup(SimpleNamespace(qmodel=q, device="cpu", calib_batches=ctx.calib_batches,
                                search_space=SearchSpace.from_model(q)))
    assert plain.evaluate(a) == pytest.approx(weights / 1e9)


def test_attention_macs_of_a_swin_count_every_window():
    from mnq_search.mixprec import attention_macs

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                              in_chans=1, num_classes=10, window_size=4, embed_dim=16, depths=(2, 2),
                              num_heads=(1, 2)).eval()
    q = convert_model(model, bits=8)
    got = attention_macs(q, torch.zeros(1, 1, 32, 32))
    # stage 0: 16x16 tokens in 16 windows of 4x4, 1 head of dim 16: 16 * 16 * 16 * 16 MACs per product;
    # stage 1: 8x8 tokens in 4 windows, 2 heads of dim 16
    assert got["layers.0.blocks.0.attn.softmax"] == (16 * 16 * 16 * 16, 8)
    assert got["layers.1.blocks.1.attn.softmax"] == (4 * 2 * 16 * 16 * 16, 8)


def test_settings_take_slot_bit_candidates_as_text_or_numbers():
    from mnq_search.context import RunSettings

    opt = dict(strategy="random", joint_nl_bits=True)
    assert RunSettings(search_nl_bits="8,6,6", **opt).validate().search_nl_bits == (6, 8)  # a study spec's text
    assert RunSettings(search_nl_bits=(5, 4), **opt).validate().search_nl_bits == (4, 5)
    for bad in ("6,x", (3, 8), (True,), ()):
        with pytest.raises(UsageError, match="--search-nl-bits"):
            RunSettings(search_nl_bits=bad, **opt).validate()
    with pytest.raises(UsageError, match="--joint-nl-bits applies to"):
        RunSettings(strategy="sequential", joint_nl_bits=True).validate()


def test_probability_groups_follow_a_width_set_on_the_slot_alone():
    """The Softmax slot owns its width: set on the slot alone (not through the model), the attention's
    IGQ-ViT probability groups quantize at it, to 2**bits - 1 levels at most."""
    from mnq_search.zoo import create_zoo_model

    torch.manual_seed(0)
    q = convert_model(create_zoo_model("fmnist-deit-tiny").eval(), 8)
    attn = q.model.blocks[0].attn
    attn.set_softmax_groups(4)
    p = torch.softmax(torch.randn(2, attn.num_heads, 50, 50) * 3, dim=-1)
    assert attn._prob_groups(p).q.max().item() > 2**6 - 1
    attn.softmax.set_bits(6)
    assert attn.p_group.bits == 8 and attn._prob_groups(p).q.max().item() == 2**6 - 1
    assert attn.p_group.bits == 6
