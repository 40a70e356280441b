"""Conservative transformer LRP (``mixprec._lrp``, Ali et al. 2022 rules) on a tiny timm ViT.

Conservation is checked in float64 so that the only gaps are the ones the rules create:

- a Linear/Conv layer keeps its bias share and the epsilon share ``R_j eps / (z_j + eps)``;
- a LayerNorm keeps its beta share;
- attention (A detached) and GELU (gate detached) keep nothing.

``LayerRelevance.absorbed`` is that kept part, so ``r_in + absorbed == r_out`` to rounding
(1e-12); with zero biases and ``eps = 0`` the layers conserve exactly. The network's input
relevance (pixels plus the additive cls token and position embedding) sums to the target logit
minus everything absorbed: with zero biases that is the logit to 1e-4 at ``eps = 1e-6`` (the
epsilon shares) and to rounding at ``eps = 0``.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mnq_search.errors import UsageError
from mnq_search.mixprec import layer_relevance, lrp_trace

KINDS = {"conv", "linear", "layernorm", "activation", "attention"}


def tiny_vit(biases: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05) if biases else p.zero_()
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("weight"):
                p.mul_(5.0)  # larger activations than timm's init: relevance well above rounding
    return model


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_forward_unchanged_and_model_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    trace = lrp_trace(model, x)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(trace.target, logits.argmax(dim=1))
    assert torch.allclose(trace.logit, logits.gather(1, trace.target.view(-1, 1)).squeeze(1), rtol=0, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.blocks[0].attn).__name__ == "Attention"


@pytest.mark.parametrize("biases, eps", [(True, 1e-6), (True, 0.05), (False, 0.0)])
def test_every_layer_kind_conserves(biases, eps):
    trace = lrp_trace(tiny_vit(biases), images(), eps=eps)
    assert {lr.kind for lr in trace.layers.values()} == KINDS
    for name, lr in trace.layers.items():
        scale = lr.r_out.abs().max() + lr.absorbed.abs().max() + 1e-30
        gap = (lr.r_in + lr.absorbed - lr.r_out).abs().max()
        assert gap <= 1e-12 * scale, (name, float(gap))
        if not biases and eps == 0:  # nothing to absorb: exact conservation
            assert (lr.r_in - lr.r_out).abs().max() <= 1e-12 * scale, name
        if lr.kind in ("attention", "activation"):
            assert lr.absorbed.abs().max() <= 1e-12 * scale, name


def test_relevance_reaches_values_only():
    """AH-rule: with the softmax weights constant, q and k get no relevance: all of qkv's output
    relevance is the relevance of v at the attention product."""
    trace = lrp_trace(tiny_vit(), images())
    for b in range(2):
        qkv, attn = trace.layers[f"blocks.{b}.attn.qkv"], trace.layers[f"blocks.{b}.attn"]
        assert torch.allclose(qkv.r_out, attn.r_in, rtol=1e-10, atol=1e-14)


def test_epsilon_rule_on_the_head():
    """Only the target logit z gets gradient, so the head's input relevance is (z - b) z / (z + eps sign z)."""
    model, eps = tiny_vit(), 0.1
    trace = lrp_trace(model, images(), eps=eps)
    z = trace.logit
    b = model.head.bias.detach()[trace.target]
    expected = (z - b) * z / (z + eps * torch.sign(z))
    head = trace.layers["head"]
    assert torch.allclose(head.r_out, z, rtol=1e-12, atol=0)
    assert torch.allclose(head.r_in, expected, rtol=1e-10, atol=0)


def test_network_relevance_sums_to_the_logit():
    model = tiny_vit(biases=True)
    trace = lrp_trace(model, images(), eps=1e-6)
    inputs = trace.pixels.sum(dim=(1, 2, 3)) + trace.embeddings
    # exact bookkeeping: pixels + cls/pos embeddings + what the layers absorbed = the logit
    assert torch.allclose(inputs + trace.absorbed(), trace.logit, rtol=0, atol=1e-12)
    # without biases only the epsilon terms are absorbed: each weight layer keeps at most
    # eps * sum_j |dlogit/dz_j| (measured: 5e-6 to 1.8e-5 of the logit at eps = 1e-6); at eps = 0
    # the pixels and embeddings carry the logit exactly
    bare = lrp_trace(tiny_vit(biases=False), images(), eps=1e-6)
    inputs = bare.pixels.sum(dim=(1, 2, 3)) + bare.embeddings
    assert torch.allclose(inputs, bare.logit, rtol=1e-4, atol=0)
    assert torch.allclose(inputs + bare.absorbed(), bare.logit, rtol=0, atol=1e-12)
    exact = lrp_trace(tiny_vit(biases=False), images(), eps=0.0)
    inputs = exact.pixels.sum(dim=(1, 2, 3)) + exact.embeddings
    assert torch.allclose(inputs, exact.logit, rtol=1e-12, atol=0)
    assert exact.pixels.shape == (3, 1, 28, 28)


def test_targets_and_bad_input():
    model, x = tiny_vit(), images()
    labels = torch.tensor([3, 1, 4])
    assert torch.equal(lrp_trace(model, x, target="label", labels=labels).target, labels)
    assert torch.equal(lrp_trace(model, x, target=7).target, torch.full((3,), 7))
    with pytest.raises(UsageError, match="target 'label' needs"):
        lrp_trace(model, x, target="label")
    with pytest.raises(UsageError, match="outside 0..9"):
        lrp_trace(model, x, target=10)
    with pytest.raises(UsageError, match="VisionTransformer"):
        lrp_trace(nn.Sequential(nn.Linear(3, 3)), torch.zeros(1, 3))
    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                               num_classes=10, embed_dim=32, depth=1, num_heads=2, global_pool="map")
    with pytest.raises(UsageError, match="attention-pool"):
        lrp_trace(pooled, x.float())
    swiglu = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                               num_classes=10, embed_dim=32, depth=1, num_heads=2, mlp_layer=timm.layers.SwiGLU)
    with pytest.raises(UsageError, match="blocks.0.mlp: SwiGLU has no LRP rule here"):
        lrp_trace(swiglu, x.float())


def test_layer_shares_and_a_zeroed_layer():
    model = tiny_vit()
    batches = [(images(4), torch.zeros(4, dtype=torch.long))]
    shares = layer_relevance(model, batches)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted(shares) == sorted(expected)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(v > 1e-4 for v in shares.values())
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.zero_()
    shares = layer_relevance(model, batches)
    assert shares["blocks.0.mlp.fc1"] == pytest.approx(0.0, abs=1e-15)
    assert shares["blocks.0.mlp.fc2"] > 1e-4 and shares["blocks.0.attn.qkv"] > 1e-4
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
