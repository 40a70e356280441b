"""MACs, BOPs, weight bytes and budgets (``mixprec._bops``), checked against hand counts."""

from __future__ import annotations

import pytest
import timm
from torch import nn

from mnq_search.errors import UsageError
from mnq_search.mixprec import layer_bits, layer_macs, layer_params, parse_budget, total_bops, weight_bytes
from mnq_search.zoo import create_zoo_model


def small() -> nn.Module:
    # conv 1 -> 4 channels, 3x3, on 8x8: 4 x 6 x 6 outputs x 9 MACs = 1296; linear 144 -> 5: 720
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 5))


def test_hand_counted_macs_bops_and_bytes():
    model = small().train()
    macs = layer_macs(model, input_shape=(1, 8, 8))
    assert macs == {"0": 1296, "2": 720}
    assert model.training  # mode restored
    assert total_bops(macs) == (1296 + 720) * 64 == 129024
    assert total_bops(macs, {"0": (4, 6)}) == 1296 * 24 + 720 * 64 == 77184
    assert total_bops(macs, default=(2, 3)) == 2016 * 6
    params = layer_params(model)
    assert params == {"0": (36, 4), "2": (720, 5)}
    # bits x weights / 8, bias at 32 bits: (8*36 + 32*4 + 8*720 + 32*5) / 8
    assert weight_bytes(params) == 792.0
    assert weight_bytes(params, {"0": (4, 8)}) == (4 * 36 + 32 * 4 + 8 * 720 + 32 * 5) / 8 == 774.0
    with pytest.raises(UsageError, match="unknown layers: nope"):
        total_bops(macs, {"nope": (4, 4)})
    with pytest.raises(UsageError, match="bits must be in 1..32"):
        total_bops(macs, {"0": (0, 8)})


def test_grouped_conv_and_token_linear():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Flatten(2), nn.Linear(25, 7))
    # conv: 8 x 5 x 5 outputs x (4 / 2) x 9 = 3600; linear on 8 rows of 25 features: 8 x 25 x 7 = 1400
    assert layer_macs(model, input_shape=(4, 5, 5)) == {"0": 3600, "2": 1400}


def test_budget_parser():
    macs = {"a": 1000, "b": 500}
    assert parse_budget("w6a6", macs) == 1500 * 36
    assert parse_budget(" W4A8 ", macs) == 1500 * 32
    assert parse_budget("2.5e9", macs) == 2.5e9
    assert parse_budget("1.2G", macs) == pytest.approx(1.2e9)
    assert parse_budget("800M", macs) == 8e8
    assert parse_budget("3k", macs) == 3000
    assert parse_budget("1.5 GBOPs", macs) == 1.5e9
    assert parse_budget("12345", macs) == 12345
    for bad in ("", "abc", "w6", "6G6", "-1G", "0", "1.2X", "w0a8", "nan"):
        with pytest.raises(UsageError) as err:
            parse_budget(bad, macs)
        assert "\n" not in str(err.value)
        assert "budget" in str(err.value)


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                             num_classes=10, embed_dim=32, depth=2, num_heads=2)


def test_default_vit_matches_its_shapes():
    """fmnist-deit-tiny: 28x28x1 images, 4x4 patches -> 49 patches + cls = 50 tokens, embed 192,
    MLP 768, 12 blocks, 10 classes, the head on the cls token only."""
    model = create_zoo_model("fmnist-deit-tiny")
    macs = layer_macs(model)  # input shape inferred: (1, 28, 28)
    tokens, d, hidden = 50, 192, 768
    assert macs["patch_embed.proj"] == 192 * 7 * 7 * 16 == 150528
    for b in range(12):
        assert macs[f"blocks.{b}.attn.qkv"] == tokens * d * 3 * d == 5529600
        assert macs[f"blocks.{b}.attn.proj"] == tokens * d * d
        assert macs[f"blocks.{b}.mlp.fc1"] == tokens * d * hidden
        assert macs[f"blocks.{b}.mlp.fc2"] == tokens * hidden * d
    assert macs["head"] == d * 10
    assert len(macs) == 12 * 4 + 2
    assert sum(macs.values()) == 265573248
    assert parse_budget("w8a8", macs) == total_bops(macs) == 265573248 * 64
    assert parse_budget("w4a4", macs) == 265573248 * 16
    n_weights = sum(w for w, _ in layer_params(model).values())
    assert n_weights == 16 * 192 + 12 * (192 * 576 + 192 * 192 + 2 * 192 * 768) + 192 * 10


def test_converted_model_has_the_float_names():
    from mnq_search.convert import convert_model

    vit = tiny_vit().eval()
    q = convert_model(vit, bits=6).eval()
    assert layer_macs(q) == layer_macs(vit)
    assert layer_params(q) == layer_params(vit)
    bits = layer_bits(q)
    assert set(bits) == set(layer_macs(vit)) and set(bits.values()) == {(6, 6)}
    assert layer_bits(vit) == {}
