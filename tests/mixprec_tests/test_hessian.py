"""Hutchinson Hessian traces (``mixprec._hessian``, HAWQ-V2) against brute-force Hessians.

For Rademacher ``v`` probing every layer at once, layer ``l``'s sample ``v_l . (H v)_l`` has mean
``tr(H_ll)`` and variance ``2 (||H_ll||_F^2 - sum_i H_ll[i, i]^2) + sum_{k != l} ||H_lk||_F^2``; the
tests compute that variance from the exact Hessian and require the seeded estimate within 4
standard errors of the exact trace (the seed makes the outcome fixed, not lucky-by-rerun).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mnq_search.errors import UsageError
from mnq_search.mixprec import hessian_importance, hessian_trace


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)).double()


def exact_hessian(model: nn.Module, names: list[str], x, y, loss_fn=F.cross_entropy) -> torch.Tensor:
    """The full Hessian over the flattened weights of ``names`` (torch.autograd.functional)."""
    prefix = [f"{n}." if n else "" for n in names]
    shapes = [model.get_submodule(n).weight.shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([model.get_submodule(n).weight.detach().reshape(-1) for n in names])

    def loss(w):
        parts = torch.split(w, sizes)
        params = {f"{n}weight": p.reshape(s) for n, p, s in zip(prefix, parts, shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def blocks(h: torch.Tensor, sizes: list[int]) -> list[list[torch.Tensor]]:
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    return [[h[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] for j in range(len(sizes))] for i in range(len(sizes))]


def test_mlp_traces_match_the_exact_hessian():
    model = mlp()
    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(16, 4, generator=gen, dtype=torch.float64)  # exact traces 2.07 and 0.53
    y = torch.randint(0, 2, (16,), generator=gen)
    names = ["0", "2"]
    hb = blocks(exact_hessian(model, names, x, y), [12, 6])
    for m in (64, 320):  # 5x the samples (the first 64 shared): the error bound shrinks by sqrt(5)
        est = hessian_trace(model, [(x, y)], n_samples=m, seed=0)
        for i, name in enumerate(names):
            own = hb[i][i]
            exact = float(own.trace())
            var = 2 * float((own ** 2).sum() - (own.diagonal() ** 2).sum())
            var += sum(float((hb[i][j] ** 2).sum()) for j in range(2) if j != i)
            se = math.sqrt(var / m)
            assert abs(est[name].trace - exact) <= 4 * se, (name, m, est[name].trace, exact, se)
            assert 0.5 * se <= est[name].stderr <= 1.5 * se  # the reported error matches the theory
            assert est[name].n_params == own.shape[0]
            assert est[name].per_param == pytest.approx(est[name].trace / own.shape[0])


def test_seeded_and_restores_the_model():
    model = mlp().train()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    a = hessian_importance(model, [(x, y)], n_samples=5, seed=7)
    b = hessian_importance(model, [(x, y)], n_samples=5, seed=7)
    c = hessian_importance(model, [(x, y)], n_samples=5, seed=8)
    assert a == b and a != c
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_batches_are_weighted_by_size():
    """Linear layer, loss 0.5 ||W x - t||^2 averaged over images: H = I_out (x) X^T X / N. With inputs
    along distinct axes X^T X is diagonal, so every Rademacher sample gives the trace exactly:
    out * sum ||x_n||^2 / N over all batches (here 3 * (1 + 4 + 9 + 16 + 25) / 5 = 33)."""
    lin = nn.Linear(5, 3).double()
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    t = torch.zeros(5, 3, dtype=torch.float64)

    def loss(out, target):
        return 0.5 * ((out - target) ** 2).sum(dim=1).mean()

    est = hessian_trace(lin, [(x[:2], t[:2]), (x[2:], t[2:])], loss_fn=loss, n_samples=3)
    assert est[""].trace == pytest.approx(33.0, rel=1e-12)
    assert est[""].stderr == pytest.approx(0.0, abs=1e-12)


def test_tiny_vit_head_and_all_layers():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                            num_classes=10, embed_dim=32, depth=2, num_heads=2).double()
    with torch.no_grad():
        vit.head.weight.mul_(20)  # a peaked softmax: a Hessian far from isotropic
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)
    m = 32
    est = hessian_trace(vit, [(x, y)], n_samples=m, seed=0, layers=["head"])["head"]
    # brute force: the loss depends on the head weights only through logits = f W^T + b, so the
    # exact Hessian is that of the head alone on the features f it receives
    feats = []
    handle = vit.head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    with torch.no_grad():
        vit.eval()(x)
    handle.remove()
    h = exact_hessian(vit.head, [""], feats[0], y)
    exact = float(h.trace())
    se = math.sqrt(2 * float((h ** 2).sum() - (h.diagonal() ** 2).sum()) / m)
    assert abs(est.trace - exact) <= 4 * se, (est.trace, exact, se)
    assert est.n_params == 320
    # every Linear/Conv2d, through attention (timm's fused kernel has no double backward)
    vit.train()
    fused = vit.blocks[0].attn.fused_attn
    every = hessian_importance(vit, [(x, y)], n_samples=2, seed=0)
    expected = [n for n, mod in vit.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert list(every) == expected
    assert all(math.isfinite(v) for v in every.values())
    assert vit.training and vit.blocks[0].attn.fused_attn == fused


def test_bad_input():
    model = mlp()
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(UsageError, match="not a Linear/Conv2d layer of the model: nope"):
        hessian_trace(model, [(x, y)], layers=["nope"])
    with pytest.raises(UsageError, match="n_samples"):
        hessian_trace(model, [(x, y)], n_samples=0)
    with pytest.raises(UsageError, match="pairs"):
        hessian_trace(model, [x])
