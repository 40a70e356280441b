"""Conversion of timm ViT / DeiT / Swin: slot counts and names, float equivalence, quantized runs."""

from __future__ import annotations

import pytest
import timm
import torch

from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.methods import uniform_assignment

SMALL = {
    "deit_tiny_patch16_224": dict(img_size=32, patch_size=8),
    "vit_small_patch16_224": dict(img_size=32, patch_size=8),
    "swin_tiny_patch4_window7_224": dict(img_size=32, patch_size=2, window_size=4),
}
EXPECTED = {"deit_tiny_patch16_224": (12, 12, 25), "vit_small_patch16_224": (12, 12, 25),
            "swin_tiny_patch4_window7_224": (12, 12, 29)}


def build(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **SMALL[name]).eval()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_slot_counts_match_the_paper(name):
    q = convert_model(build(name), 8)
    c = q.count_slots()
    assert (c["softmax"], c["gelu"], c["layernorm"]) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_float_slots_without_quantization_match_timm(name):
    model = build(name)
    q = convert_model(model, 8).set_quant(False).eval()
    assert set(q.get_assignment().values()) == {"float"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_quantized_model_stays_close_to_float(name):
    """With every method and 8-bit linear layers, calibrated on the same images: outputs finite and
    the logits close (cosine > 0.95; measured 0.978-0.998 on random weights)."""
    model = build(name)
    q = convert_model(model, 8)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for method in ("ibert", "fqvit", "ivit"):
            q.set_assignment(uniform_assignment(method, q.slot_ops()))
            q.train()
            q(x)
            q.eval()
            y = q(x)
            assert torch.isfinite(y).all()
            assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.95


def test_slot_names_are_readable_and_in_forward_order():
    q = convert_model(build("deit_tiny_patch16_224"), 8)
    names = list(q.slot_ops())
    assert names[:4] == ["blocks.0.norm1", "blocks.0.attn.softmax", "blocks.0.norm2", "blocks.0.mlp.act"]
    assert names[-1] == "norm"
    assert q.slot_ops()["blocks.3.attn.softmax"] == "softmax"
    assert q.slot_ops()["blocks.3.mlp.act"] == "gelu"
    swin = convert_model(build("swin_tiny_patch4_window7_224"), 8).slot_ops()
    assert "patch_embed.norm" in swin and "layers.1.downsample.norm" in swin
    assert "layers.2.blocks.5.attn.softmax" in swin


def test_swin_shift_mask_enters_as_integer_sentinel():
    """In shifted windows the masked logits must get (near) zero probability in every method,
    and the mask must not enter the range statistics (the quantizer's range stays finite)."""
    q = convert_model(build("swin_tiny_patch4_window7_224"), 8)
    x = torch.randn(2, 3, 32, 32)
    probs = {}

    def grab(name, x_in, y):
        if name == "layers.0.blocks.1.attn.softmax":  # a shifted block
            probs["p"] = y

    for method in ("ibert", "fqvit", "ivit"):
        q.set_assignment(uniform_assignment(method, q.slot_ops()))
        q.train()
        with torch.no_grad():
            q(x)
        q.eval()
        slot = q.slots["layers.0.blocks.1.attn.softmax"]
        assert torch.isfinite(slot.q_in.observer.min_val)
        slot.recorder = grab
        with torch.no_grad():
            q(x)
        slot.recorder = None
        blk = q.model.layers[0].blocks[1]
        mask = blk.attn_mask  # (num_windows, N, N), 0 or -inf/-100
        masked = (mask < -1).unsqueeze(1).expand(-1, probs["p"].shape[1], -1, -1)
        p = probs["p"].view(-1, mask.shape[0], *probs["p"].shape[1:])
        assert p[:, masked].max() <= 2.0**-14, method  # masked entries: nothing (i-exp floor)


def test_conversion_refuses_unsupported_models_and_bits():
    with pytest.raises(UsageError, match="converts timm VisionTransformer"):
        convert_model(timm.create_model("resnet18", pretrained=False), 8)
    with pytest.raises(UsageError, match="4..8"):
        convert_model(build("deit_tiny_patch16_224"), 3)


def test_set_assignment_validates_before_changing_anything():
    q = convert_model(build("deit_tiny_patch16_224"), 8)
    before = q.get_assignment()
    bad = uniform_assignment("ivit", q.slot_ops())
    bad["blocks.0.mlp.act"] = "fqvit"  # FQ-ViT has no GELU
    with pytest.raises(UsageError, match="not valid for gelu"):
        q.set_assignment(bad)
    assert q.get_assignment() == before


def test_layernorm_slots_share_parameters_across_methods():
    q = convert_model(build("deit_tiny_patch16_224"), 8)
    slot = q.slots["blocks.0.norm1"]
    slot.set_method("ibert")
    with torch.no_grad():
        slot.impl.weight.add_(1.0)
    slot.set_method("ivit")
    assert torch.equal(slot.impl.weight, slot.float_module.weight)
