"""Clipped channel-wise post-LayerNorm quantization folded into per-tensor quantizers (mnq_search.reparam)."""

import timm
import torch

from mnq_search.calibrate import calibrate
from mnq_search.convert import convert_model
from mnq_search.methods import uniform_assignment
from mnq_search.quant import ActQuant
from mnq_search.reparam import apply_caps, clip_ranges, post_ln_pairs, reparam_post_ln


def _outlier_vit():
    """A tiny ViT whose post-LayerNorm channels differ widely in range (as trained ViTs' do)."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                          num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.norm1.weight[3], b.norm2.weight[5], b.norm1.bias[7] = 25.0, -30.0, 4.0
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batches = [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]
    return m, x, batches


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p, q = ref.log_softmax(-1), out.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _quantized(model, batches, caps=None, bits=4):
    q = convert_model(model, bits=bits)
    q.set_assignment(uniform_assignment("ibert", q.slot_ops()))
    if caps:
        apply_caps(q, caps)
    calibrate(q, batches)
    return q.eval()


def test_pairs_of_vit_and_swin_blocks():
    m, _, _ = _outlier_vit()
    assert [(p.norm, p.linear) for p in post_ln_pairs(m)] == [
        ("blocks.0.norm1", "blocks.0.attn.qkv"), ("blocks.0.norm2", "blocks.0.mlp.fc1"),
        ("blocks.1.norm1", "blocks.1.attn.qkv"), ("blocks.1.norm2", "blocks.1.mlp.fc1")]
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=28, patch_size=2, in_chans=1,
                             num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7)
    pairs = post_ln_pairs(swin)  # 14x14 then 7x7 tokens: windows of 7 need no padding
    assert len(pairs) == 8 and pairs[0].linear == "layers.0.blocks.0.attn.qkv"


def test_clip_ranges_cut_a_lone_outlier_and_keep_a_uniform_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20000, 2, generator=gen) * 2 - 1  # both channels uniform on [-1, 1]
    x[0, 1] = 50.0  # one extreme value in channel 1
    m, h = clip_ranges(x, bits=4)
    assert 0.97 < float(h[0]) <= 1.0 and abs(float(m[0])) < 0.01  # uniform: at most the 1 % tails go
    assert float(h[1]) < 1.05  # the outlier is clipped, not stretched over the grid (it would give h = 25.5)


def test_reparameterised_float_model_is_the_same_function_and_low_bit_error_drops():
    m, x, batches = _outlier_vit()
    new, rec = reparam_post_ln(m, batches, bits=4)
    with torch.no_grad():
        torch.testing.assert_close(new(x), m(x), rtol=1e-4, atol=1e-4)
        # after the fold every channel's clipped range is the common one: the LayerNorm outputs are balanced
        outs = {}
        h = new.blocks[0].norm1.register_forward_hook(lambda _m, _i, o: outs.setdefault("ln", o))
        new(x)
        h.remove()
    spread = outs["ln"].reshape(-1, 32).abs().amax(0)
    assert float(spread.max() / spread.median()) < 3.0
    assert set(rec.caps) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    with torch.no_grad():
        ref = m(x)
        kl_tensor = _kl(ref, _quantized(m, batches)(x))
        kl_channel = _kl(ref, _quantized(new, batches, rec.caps)(x))
    assert kl_channel < 0.6 * kl_tensor  # measured 0.0045 vs 0.0108 at W4A4


def test_capped_input_quantizer_and_its_integer_path():
    m, x, batches = _outlier_vit()
    new, rec = reparam_post_ln(m, batches, bits=4)
    q = _quantized(new, batches, rec.caps)
    qkv = q.model.blocks[0].attn.qkv
    seen = {}
    h = qkv.register_forward_hook(lambda _m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        q(x)
    h.remove()
    cap = rec.caps["blocks.0.attn.qkv"]
    assert float(qkv.q_in.observer.absmax()) > cap  # the observed range is wider: the cap clips it
    torch.testing.assert_close(qkv.q_in.scale, torch.tensor(cap / 7))
    with torch.no_grad():
        q_x, s_x = qkv.q_in.quantize(seen["x"])
        acc, s_acc = qkv.linear.forward_int(q_x.long(), s_x)
    assert int(q_x.min()) == -8 and int(q_x.max()) == 7
    assert torch.equal(torch.round(seen["y"] / s_acc).long(), acc)  # the fake-quant output is the integer path's


def test_cap_survives_reset_and_state_dict_round_trip():
    a = ActQuant(4)
    a.train()
    a(torch.linspace(-10, 10, 101))
    a.set_cap(2.0)
    torch.testing.assert_close(a.scale, torch.tensor(2.0 / 7))
    a.observer.reset()
    a(torch.linspace(-10, 10, 101))
    torch.testing.assert_close(a.scale, torch.tensor(2.0 / 7))
    b = ActQuant(4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.scale, torch.tensor(2.0 / 7))
    old = {k: v for k, v in a.state_dict().items() if k != "cap"}  # saved before quantizers had a cap
    c = ActQuant(4)
    c.load_state_dict(old)
    torch.testing.assert_close(c.scale, torch.tensor(10.0 / 7))
