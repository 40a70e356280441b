"""LSQ quantizers of ``mnq_search.vvtq._lsq`` (Esser et al., ICLR 2020; module-dependent granularity
of VVTQ, Huang et al. 2023): gradients, gradient scale, initialisation, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mnq_search.errors import UsageError
from mnq_search.vvtq import LsqQuantizer, lsq_qrange, module_granularity


def _inputs(n: int = 64, s: float = 0.1, bits: int = 4, seed: int = 1) -> torch.Tensor:
    """float64 values with v = x / s spread over and beyond [qmin, qmax], none within 0.02 of a clamp
    edge or of a rounding boundary (k + 1/2), so small finite differences cross no kink."""
    qmin, qmax = lsq_qrange(bits, True)
    g = torch.Generator().manual_seed(seed)
    v = (qmin - 3) + (qmax - qmin + 6) * torch.rand(n, generator=g, dtype=torch.float64)
    frac = v - torch.floor(v)
    v = torch.where((frac - 0.5).abs() < 0.02, v + 0.1, v)
    v = torch.where(((v - qmin).abs() < 0.02) | ((v - qmax).abs() < 0.02), v + 0.05, v)
    return v * s


def _quantizer(bits=4, s=0.1, **kw) -> LsqQuantizer:
    q = LsqQuantizer(bits, **kw).double()
    q.set_step(s)
    return q


def test_step_and_input_gradients_equal_the_lsq_formula():
    """Autograd = LSQ's analytic expressions, recomputed in numpy:
    dL/ds = g * sum(dL/dx_hat * (q - v | qmin | qmax)), dL/dx = dL/dx_hat * [qmin <= v <= qmax]."""
    bits, s = 4, 0.1
    x = _inputs(bits=bits, s=s).requires_grad_(True)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    quant = _quantizer(bits, s)
    (quant(x) * up).sum().backward()
    qmin, qmax = lsq_qrange(bits, True)
    xn, un = x.detach().numpy(), up.numpy()
    v = xn / s
    q = np.clip(np.floor(v + 0.5), qmin, qmax)
    ds = np.where(v < qmin, qmin, np.where(v > qmax, qmax, q - v))
    g = 1.0 / math.sqrt(xn.size * qmax)
    assert quant.step.grad.item() == pytest.approx(g * float((un * ds).sum()), rel=1e-12)
    np.testing.assert_array_equal(x.grad.numpy(), un * ((v >= qmin) & (v <= qmax)))
    assert 0 < ((v < qmin) | (v > qmax)).sum() < v.size  # both branches exercised


def test_per_head_step_gradients_equal_the_lsq_formula_per_group():
    """Per head: each group's step gradient is the LSQ sum over that group's rows only, times its own
    g = 1 / sqrt(rows_per_group * D_in * Q_p)."""
    bits, heads = 3, 2
    qmin, qmax = lsq_qrange(bits, True)
    w = torch.randn(12, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64).requires_grad_(True)
    up = torch.randn(12, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    quant = LsqQuantizer(bits, "head", num_heads=heads).double()
    quant.set_step(torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64))
    (quant(w) * up).sum().backward()
    s = quant.step.detach().repeat_interleave(2)[:, None]  # group j = rows 2j, 2j + 1
    v = w.detach() / s
    q = torch.clamp(torch.floor(v + 0.5), qmin, qmax)
    ds = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), q - v))
    expected = (up * ds).reshape(6, -1).sum(1) / math.sqrt(2 * 5 * qmax)
    assert torch.allclose(quant.step.grad, expected, rtol=1e-12, atol=0)
    assert torch.equal(w.grad, up * ((v >= qmin) & (v <= qmax)))


def test_gradients_are_finite_differences_of_the_lsq_surrogate():
    """What LSQ differentiates is the surrogate  f(x, s) = s * (clamp(x/s, qmin, qmax) + r)  with the
    rounding residual r = q - clamp(v) frozen at the evaluation point (the STE). Central differences
    (h = 1e-7) of sum(up * f) w.r.t. s and every x_i equal the autograd gradients (grad scale off)."""
    bits, s, h = 4, 0.1, 1e-7
    qmin, qmax = lsq_qrange(bits, True)
    x0 = _inputs(bits=bits, s=s)
    up = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    quant = _quantizer(bits, s, grad_scale=False)
    x = x0.clone().requires_grad_(True)
    (quant(x) * up).sum().backward()
    r = torch.clamp(torch.floor(x0 / s + 0.5), qmin, qmax) - torch.clamp(x0 / s, qmin, qmax)

    def f(xx, ss):
        return float((up * ss * (torch.clamp(xx / ss, qmin, qmax) + r)).sum())

    fd_s = (f(x0, s + h) - f(x0, s - h)) / (2 * h)
    assert quant.step.grad.item() == pytest.approx(fd_s, rel=1e-6)
    eye = torch.eye(x0.numel(), dtype=torch.float64) * h
    fd_x = torch.tensor([(f(x0 + e, s) - f(x0 - e, s)) / (2 * h) for e in eye], dtype=torch.float64)
    assert torch.allclose(x.grad, fd_x, rtol=1e-6, atol=1e-6)


def test_lsq_step_gradient_differs_from_the_rounded_function_by_the_ste_term():
    """Away from rounding and clamp boundaries the *true* fake-quant output q * s, with q unchanged
    by a small step change, has d/ds = q and d/dx = 0 (finite differences); LSQ's step gradient is that
    minus sum(up * v) over the in-range elements (the STE's contribution)."""
    bits, s, h = 4, 0.1, 1e-7
    qmin, qmax = lsq_qrange(bits, True)
    x0 = _inputs(bits=bits, s=s)
    up = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    quant = _quantizer(bits, s, grad_scale=False)
    with torch.no_grad():
        plus = float((quant(x0) * up).sum())
        quant.set_step(s + h)
        hi = float((quant(x0) * up).sum())
        quant.set_step(s - h)
        lo = float((quant(x0) * up).sum())
        quant.set_step(s)
        moved = float((quant(x0 + h) * up).sum())
    q = torch.clamp(torch.floor(x0 / s + 0.5), qmin, qmax)
    assert (hi - lo) / (2 * h) == pytest.approx(float((up * q).sum()), rel=1e-6)
    assert moved == pytest.approx(plus, abs=1e-12)  # rounding held: no change with x
    x = x0.clone().requires_grad_(True)
    (quant(x) * up).sum().backward()
    v = x0 / s
    inside = (v >= qmin) & (v <= qmax)
    assert quant.step.grad.item() == pytest.approx(float((up * q).sum() - (up * v * inside).sum()), rel=1e-10)


@pytest.mark.parametrize("granularity,kw,shape,numel", [
    ("tensor", {}, (6, 8), 48),
    ("channel", {"channels": 6}, (6, 8), 8),
    ("head", {"num_heads": 2}, (12, 5), 2 * 5),  # 3 * 2 groups of 2 rows x 5
    ("head", {"num_heads": 2, "fused_qkv": False}, (4, 5), 2 * 5),
])
def test_gradient_scale_factor(granularity, kw, shape, numel):
    """The step gradient with the scale is g = 1 / sqrt(N * Q_p) times the one without it."""
    bits = 3
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for on in (True, False):
        quant = LsqQuantizer(bits, granularity, **kw, grad_scale=on).double()
        quant.initialize(x)
        (quant(x) ** 2).sum().backward()
        grads.append(quant.step.grad.clone())
        assert quant.numel_per_step(x) == numel
    g = 1.0 / math.sqrt(numel * 3)  # Q_p = 3 at 3 bits
    assert torch.allclose(grads[0], g * grads[1], rtol=1e-12, atol=0)
    assert LsqQuantizer(bits, grad_numel=10).grad_scale_factor(x) == pytest.approx(1 / math.sqrt(30))


def test_initialisation_from_first_batch_and_from_a_tensor():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5], [2.0, -2.0], [4.0, 0.0]])
    t = LsqQuantizer(4)
    t(x)  # first batch initialises: 2 * mean|x| / sqrt(7) = 2 * 1.625 / sqrt(7)
    assert t.step.item() == pytest.approx(2 * 1.625 / math.sqrt(7), rel=1e-6)
    t(10 * x)  # later batches do not
    assert t.step.item() == pytest.approx(2 * 1.625 / math.sqrt(7), rel=1e-6)
    c = LsqQuantizer(4, "channel", channels=4)
    c.initialize(x)
    assert torch.allclose(c.step, torch.tensor([2.0, 0.5, 2.0, 2.0]) * 2 / math.sqrt(7))
    h = LsqQuantizer(8, "head", signed=False, num_heads=1, fused_qkv=False)
    h.initialize(x.abs())
    assert h.step.item() == pytest.approx(2 * 1.625 / math.sqrt(255), rel=1e-6)
    c.set_step(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert c.step.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(UsageError):
        c.set_step(-1.0)
    with pytest.raises(UsageError, match="no step"):
        LsqQuantizer(4).integers(x)


def test_per_head_groups_follow_the_qkv_layout():
    """qkv weight (3 * D, D_in), D = 4, 2 heads: rows [2j, 2j + 1] are group j = (q|k|v) * 2 + head;
    scaling group j by 2**j scales its initial step by 2**j."""
    w = torch.ones(12, 3)
    for j in range(6):
        w[2 * j: 2 * j + 2] *= 2.0**j
    quant = LsqQuantizer(4, "head", num_heads=2)
    quant.initialize(w)
    base = 2 / math.sqrt(7)
    assert torch.allclose(quant.step, base * 2.0 ** torch.arange(6.0))
    s = quant.expand_step(quant.step.detach(), w)
    assert s.shape == (12, 1)
    assert torch.allclose(s.squeeze(1), base * 2.0 ** (torch.arange(12) // 2).float())
    q, step = quant.integers(w)
    assert torch.equal(q, torch.ones(12, 3, dtype=torch.int32))  # 2**j / (2**j * 2 / sqrt 7) = 1.32 -> 1
    assert torch.equal(q * step, quant(w))


@pytest.mark.parametrize("granularity,kw,shape,step_shape", [
    ("tensor", {}, (2, 7, 6), ()),
    ("channel", {"channels": 5}, (5, 3, 2, 2), (5,)),
    ("head", {"num_heads": 3}, (18, 4), (9,)),
])
def test_shapes_and_integer_path(granularity, kw, shape, step_shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    for signed in (True, False):
        quant = LsqQuantizer(3, granularity, signed, **kw)
        xin = x if signed else x.abs()
        y = quant(xin)
        assert y.shape == x.shape and quant.step.shape == step_shape
        q, s = quant.integers(xin)
        qmin, qmax = (-4, 3) if signed else (0, 7)
        assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
        assert torch.equal(q * s, y)
    if granularity != "tensor":  # dim 0 must fit the channels / head groups
        with pytest.raises(UsageError):
            LsqQuantizer(3, granularity, **kw)(torch.randn(7, 3))


def test_half_up_rounding_and_clamp():
    quant = LsqQuantizer(2)  # integers -2..1
    quant.set_step(1.0)
    x = torch.tensor([-3.0, -2.5, -1.5, -0.5, 0.5, 1.49, 1.5, 9.0])
    assert quant(x).tolist() == [-2.0, -2.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_module_granularity():
    assert module_granularity("blocks.0.attn.qkv.weight") == "head"
    assert module_granularity("blocks.0.attn.proj.weight") == "channel"
    assert module_granularity("blocks.11.mlp.fc1.weight") == "channel"
    assert module_granularity("patch_embed.proj.weight") == "channel"
    assert module_granularity("blocks.0.attn.qkv.input") == "tensor"
    assert module_granularity("blocks.0.mlp.act") == "tensor"
    with pytest.raises(UsageError):
        module_granularity("")


def test_bad_arguments():
    for bad in (dict(bits=1), dict(bits=17), dict(bits=4, granularity="row"),
                dict(bits=4, granularity="channel"), dict(bits=4, granularity="head")):
        with pytest.raises(UsageError):
            LsqQuantizer(**bad)


@pytest.mark.parametrize("granularity, heads", [("channel", None), ("head", 2), ("tensor", None)])
def test_weight_layer_learns_lsq_steps_with_the_quantizers_gradients(granularity, heads):
    """QuantLinear.enable_lsq: starts from the absmax scales (a group takes its widest row's), the
    training forward is the LSQ fake quantizer's output with its gradients for weights and steps,
    and evaluation quantizes on the learned steps (integers and scales of the integer path)."""
    import torch.nn.functional as F

    from mnq_search.quant import QuantLinear

    torch.manual_seed(0)
    lin = QuantLinear.from_float(torch.nn.Linear(8, 12, bias=False), 4)  # the int32 bias follows s_acc too
    s_abs = lin.weight_scale()
    lin.enable_lsq(granularity, heads)
    expect = {"channel": s_abs, "tensor": s_abs.max().expand(12),
              "head": s_abs.view(6, 2).amax(1).repeat_interleave(2)}[granularity]
    torch.testing.assert_close(lin.weight_scale(), expect)
    x = torch.randn(5, 8)
    s_x = torch.tensor(0.05)
    q_x = torch.round(x / s_x).clamp(-8, 7)
    lin.train()
    y, s_acc = lin.forward_q(q_x, s_x)
    y.square().sum().backward()
    g_step, g_w = lin.weight_lsq.step.grad.clone(), lin.weight.grad.clone()
    # the reference: the same product with the LSQ quantizer's fake-quantized weights
    ref = LsqQuantizer(4, granularity, channels=12, num_heads=heads)
    ref.set_step(lin.weight_lsq.step.detach())
    w = lin.weight.detach().clone().requires_grad_(True)
    y_ref = F.linear(q_x * s_x, ref(w))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.square().sum().backward()
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_step, ref.step.grad, rtol=1e-3, atol=1e-6)
    # evaluation: integers on the learned steps; the integer path agrees with the fake-quant forward
    with torch.no_grad():
        lin.weight_lsq.step.mul_(1.3)
    lin.eval()
    w_int, s_w = lin.quant_weight()
    torch.testing.assert_close(s_w, lin.weight_lsq.row_steps(lin.weight).detach())
    assert torch.equal(w_int, torch.clamp(torch.floor(lin.weight.detach() / s_w[:, None] + 0.5), -8, 7))
    with torch.no_grad():
        y_eval, s_acc = lin.forward_q(q_x, s_x)
        acc, _ = lin.forward_int(q_x.long(), s_x)
    assert torch.equal(torch.round(y_eval / s_acc).long(), acc)
