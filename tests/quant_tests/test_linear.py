"""Quantized Linear, Conv2d and MatMul (``quant._linear``): fake-quant forward vs the integer path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnq_search.integer import IntegerOverflowError
from mnq_search.quant import QuantConv2d, QuantLinear, QuantMatMul
from mnq_search.quant._linear import int_matmul

I64 = torch.int64


def grid_input(shape, bits=8, scale=0.037):
    """(x on the grid, its integers int64, scale) for a per-tensor symmetric ``bits`` grid."""
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=I64)
    s = torch.tensor(scale)
    return q.float() * s, q, s


def float_linear(i=24, o=10, bias=True):
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, o).view(-1, 1))  # channels of different ranges
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin


def float_conv(cin=3, cout=6, k=3, **kw):
    conv = nn.Conv2d(cin, cout, k, **kw)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.3, 2.0, cout).view(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.normal_(0, 0.3)
    return conv


# --- from_float and the float path -----------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_from_float_copies_and_equals_float_when_off(bias):
    lin = float_linear(bias=bias)
    q = QuantLinear.from_float(lin, weight_bits=6)
    assert isinstance(q, nn.Linear) and q.weight_bits == 6
    assert torch.equal(q.weight, lin.weight) and q.weight is not lin.weight
    assert (q.bias is None) == (not bias)
    if bias:
        assert torch.equal(q.bias, lin.bias)
    x = torch.randn(5, 24)
    y, s = q(x)
    assert s is None
    assert torch.equal(y, lin(x))  # s_x None: the float Linear, exactly
    assert torch.equal(q(x, None)[0], lin(x))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=1, groups=3, bias=False),
                                dict(stride=(1, 2), dilation=2, padding_mode="reflect", padding=2)])
def test_conv_from_float_copies_and_equals_float_when_off(kw):
    conv = float_conv(3, 6, 3, **kw)
    q = QuantConv2d.from_float(conv, weight_bits=8)
    assert isinstance(q, nn.Conv2d) and q.weight_bits == 8
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, attr) == getattr(conv, attr)
    assert torch.equal(q.weight, conv.weight)
    if conv.bias is not None:
        assert torch.equal(q.bias, conv.bias)
    else:
        assert q.bias is None
    x = torch.randn(2, 3, 9, 9)
    y, s = q(x)
    assert s is None and torch.equal(y, conv(x))  # s_x None: the float Conv2d, exactly


# --- weight quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_weights_are_per_output_channel_symmetric(bits):
    lin = QuantLinear.from_float(float_linear(), bits)
    w_int, s_w = lin.quant_weight()
    qmax = 2 ** (bits - 1) - 1
    absmax = lin.weight.detach().abs().amax(dim=1)
    assert s_w.shape == (10,)
    assert torch.allclose(s_w, absmax / qmax, rtol=1e-6, atol=0)  # per row absmax / (2**(b-1) - 1)
    assert torch.equal(w_int, torch.round(w_int))
    assert torch.equal(w_int.abs().amax(dim=1), torch.full((10,), float(qmax)))  # every row reaches +-qmax
    err = (w_int * s_w.view(-1, 1) - lin.weight.detach()).abs()
    assert (err <= s_w.view(-1, 1) / 2 * (1 + 1e-5)).all()  # half a step per channel (float32 slack)
    conv = QuantConv2d.from_float(float_conv(), bits)
    wc, sc = conv.quant_weight()
    assert sc.shape == (6,) and wc.shape == conv.weight.shape
    assert torch.allclose(sc, conv.weight.detach().abs().amax(dim=(1, 2, 3)) / qmax, rtol=1e-6, atol=0)
    assert torch.equal(wc.abs().amax(dim=(1, 2, 3)), torch.full((6,), float(qmax)))


def test_bias_is_int32_at_the_accumulator_scale():
    lin = QuantLinear.from_float(float_linear(), 8)
    _, q_x, s_x = grid_input((7, 24))
    _, s_w = lin.quant_weight()
    s_acc = s_x * s_w
    b = lin.bias_int(s_acc).detach()
    assert torch.equal(b, torch.floor(lin.bias.detach() / s_acc + 0.5))  # half-up rounding of bias / s_acc
    assert b.abs().max().item() < 2**31
    assert ((b * s_acc - lin.bias.detach()).abs() <= s_acc / 2 * (1 + 1e-5)).all()  # half a unit (float32 slack)
    acc_b, _ = lin.forward_int(q_x, s_x)
    lin.bias = None
    acc_nb, _ = lin.forward_int(q_x, s_x)
    assert torch.equal(acc_b - acc_nb, b.long().expand_as(acc_b))  # added as an integer


# --- fake-quant forward vs the integer path ----------------------------------------------------------

@pytest.mark.parametrize("bits, w_bits, bias", [(8, 8, True), (4, 4, True), (8, 6, False), (6, 8, True), (3, 3, True), (4, 2, True)])
def test_linear_forward_matches_forward_int(bits, w_bits, bias):
    lin = QuantLinear.from_float(float_linear(24, 10, bias), w_bits)
    x, q_x, s_x = grid_input((3, 5, 24), bits)
    y, s_acc = lin(x, s_x)
    acc, s_acc_int = lin.forward_int(q_x, s_x)
    assert acc.dtype == I64 and acc.shape == (3, 5, 10)
    assert torch.equal(s_acc, s_acc_int)
    assert torch.allclose(s_acc, s_x * lin.weight_scale(), rtol=0, atol=0)  # s_x * s_w per channel
    v = y / s_acc
    assert (v - acc.float()).abs().max().item() <= 1e-2  # float32 rescaling of accumulators < 2**17
    assert torch.equal(torch.round(v).long(), acc)
    # and the integers: q_x @ w_int^T + b exactly, with Python ints
    w_int = lin.quant_weight()[0].long().tolist()
    b = lin.bias_int(s_acc).long().tolist() if bias else [0] * 10
    qx = q_x.view(-1, 24).tolist()
    expect = [[sum(a * w for a, w in zip(row, w_int[o])) + b[o] for o in range(10)] for row in qx]
    assert acc.view(-1, 10).tolist() == expect
    # close to the float layer: error from quantizing the weights only (x is on the grid)
    ref = F.linear(x, lin.weight, lin.bias)
    bound = (x.abs().sum(-1, keepdim=True) * lin.weight_scale() / 2 + s_acc / 2 + 1e-4)
    assert ((y - ref).abs() <= bound).all()  # |x| . s_w/2 from weights, s_acc/2 from the bias


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=1, groups=3, bias=False)])
def test_conv_forward_matches_forward_int(kw):
    conv = QuantConv2d.from_float(float_conv(3, 6, 3, **kw), 8)
    x, q_x, s_x = grid_input((2, 3, 8, 8), 8, 0.021)
    y, s_acc = conv(x, s_x)
    acc, s_acc_int = conv.forward_int(q_x, s_x)
    assert acc.dtype == I64 and acc.shape == y.shape
    assert torch.equal(s_acc, s_acc_int) and s_acc.shape == (6,)
    v = y / s_acc.view(1, -1, 1, 1)
    assert (v - acc.float()).abs().max().item() <= 1e-2  # float32 rescaling of accumulators < 2**17
    assert torch.equal(torch.round(v).long(), acc)
    # against an explicit integer convolution (float64 of integers is exact here)
    w_int, _ = conv.quant_weight()
    ref = F.conv2d(q_x.double(), w_int.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.bias is not None:
        ref = ref + conv.bias_int(s_acc).double().view(1, -1, 1, 1)
    assert torch.equal(ref.long(), acc)


def test_gradients_flow_to_weight_bias_and_input():
    lin = QuantLinear.from_float(float_linear(24, 10), 8)
    x, _, s_x = grid_input((6, 24))
    x.requires_grad_()
    y, _ = lin(x, s_x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w_deq = (lin.quant_weight()[0] * lin.weight_scale().view(-1, 1)).detach()
    # STE: every weight is inside its clamp range, so d/dw = g^T x; d/db = sum g; d/dx = g w_deq
    assert torch.allclose(lin.weight.grad, g.t() @ x.detach(), rtol=1e-4, atol=1e-5)  # float32 products
    assert torch.allclose(lin.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)  # float32 sum
    assert torch.allclose(x.grad, g @ w_deq, rtol=1e-4, atol=1e-5)  # float32 products
    assert lin.weight.grad.abs().sum().item() > 0 and x.grad.abs().sum().item() > 0

    conv = QuantConv2d.from_float(float_conv(), 8)
    xc, _, s_c = grid_input((2, 3, 6, 6))
    xc.requires_grad_()
    yc, _ = conv(xc, s_c)
    yc.sum().backward()
    ref = float_conv()  # the same shapes: compare with the float conv's gradients at the dequantized weights
    with torch.no_grad():
        ref.weight.copy_((conv.quant_weight()[0] * conv.weight_scale().view(-1, 1, 1, 1)))
        ref.bias.copy_(conv.bias)
    xr = xc.detach().clone().requires_grad_()
    ref(xr).sum().backward()
    assert torch.allclose(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)  # float32 sums of 72 terms
    assert torch.allclose(conv.bias.grad, ref.bias.grad)  # 2 * 4 * 4 = 32 outputs per channel
    assert torch.allclose(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)  # float32 sums


def test_linear_forward_int_checks_the_accumulator():
    lin = QuantLinear.from_float(float_linear(24, 10, bias=False), 8)
    q_x = torch.full((1, 24), 2**26, dtype=I64)  # 2**26 * 127 * 24 > 2**31
    with pytest.raises(IntegerOverflowError, match="linear accumulator"):
        lin.forward_int(q_x, torch.tensor(0.01))
    acc, _ = lin.forward_int(torch.full((1, 24), 2**16, dtype=I64), torch.tensor(0.01))
    assert acc.abs().max().item() <= 2**16 * 127 * 24  # within int32, no error


# --- QuantMatMul ---------------------------------------------------------------------------------

def test_matmul_forward_matches_forward_int():
    mm = QuantMatMul()
    a, qa, s_a = grid_input((2, 3, 7, 16), 8, 0.05)
    b, qb, s_b = grid_input((2, 3, 16, 5), 8, 0.011)
    y, s = mm(a, s_a, b, s_b)
    assert torch.allclose(s, s_a * s_b, rtol=0, atol=0)
    acc = mm.forward_int(qa, qb)
    assert acc.dtype == I64 and acc.shape == (2, 3, 7, 5)
    assert torch.equal(torch.round(y / s).long(), acc)
    assert (y / s - acc.float()).abs().max().item() <= 1e-2  # float32 rescaling of accumulators < 2**18
    # the integers, with Python ints for one head
    A, B = qa[1, 2].tolist(), qb[1, 2].tolist()
    expect = [[sum(A[i][k] * B[k][j] for k in range(16)) for j in range(5)] for i in range(7)]
    assert acc[1, 2].tolist() == expect
    # quantization off: the float product exactly
    y0, s0 = mm(a, None, b, s_b)
    assert s0 is None and torch.equal(y0, a @ b)
    y1, s1 = mm(a, s_a, b, None)
    assert s1 is None and torch.equal(y1, a @ b)


def test_matmul_gradients_are_ste():
    mm = QuantMatMul()
    a, _, s_a = grid_input((4, 8), 8, 0.05)
    b, _, s_b = grid_input((8, 3), 8, 0.02)
    a.requires_grad_()
    b.requires_grad_()
    y, _ = mm(a, s_a, b, s_b)
    y.sum().backward()
    ones = torch.ones(4, 3)
    assert torch.allclose(a.grad, ones @ b.detach().t(), rtol=1e-5, atol=1e-6)  # d(a b)/da with round_ste identity
    assert torch.allclose(b.grad, a.detach().t() @ ones, rtol=1e-5, atol=1e-6)


def test_int_matmul_is_exact_and_checked():
    a = torch.tensor([[2**31 - 1, -(2**31)], [3, -4]], dtype=I64)
    b = torch.tensor([[2**31 - 1], [2**30]], dtype=I64)
    out = int_matmul(a, b)
    assert out.tolist() == [[(2**31 - 1) ** 2 - 2**61], [3 * (2**31 - 1) - 4 * 2**30]]  # exact int64 products
    with pytest.raises(IntegerOverflowError, match="matmul accumulator"):
        QuantMatMul().forward_int(torch.full((2, 4), 2**20, dtype=I64), torch.full((4, 2), 2**20, dtype=I64))
    ok = QuantMatMul().forward_int(torch.full((2, 4), 2**13, dtype=I64), torch.full((4, 2), 2**15, dtype=I64))
    assert ok.max().item() == 2**30  # 4 * 2**28 fits int32


def test_saturated_bias_stays_in_int32():
    # regression: the bias used to be clamped to 2**31 - 1 in float32, which rounds to 2**31
    lin = QuantLinear.from_float(float_linear(4, 2), 8)
    with torch.no_grad():
        lin.bias.fill_(1e6)
    s_x = torch.tensor(1e-4)
    b = lin.bias_int(s_x * lin.weight_scale())
    assert b.max().item() <= 2**31 - 1  # documented int32 bias
    acc, _ = lin.forward_int(torch.zeros(1, 4, dtype=I64), s_x)  # raises IntegerOverflowError today
    assert acc.max().item() == 2**31 - 1
