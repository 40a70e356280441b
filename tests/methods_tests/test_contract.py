"""One contract suite for every registered method: parametrized over the registry, so a new
family is tested the day it is registered."""

from __future__ import annotations

import pytest
import torch

from mnq_search.methods import NONLINEAR_METHODS, get_method_class
from mnq_search.integer import IntegerOverflowError
from mnq_search.methods import make_nonlinear
from mnq_search.testing import affine_layernorm, realistic_input

ALL = [(op, m) for op, ms in NONLINEAR_METHODS.items() for m in ms]


def build(op, method, bits=8, channels=64, seed=0, fine_grid=False):
    ln = affine_layernorm(channels, seed) if op == "layernorm" else None
    return make_nonlinear(op, method, bits, ln, fine_grid=fine_grid)


def calibrate(mod, x, s):
    mod.train()
    with torch.no_grad():
        mod(x, s)
    mod.eval()
    return mod


def test_public_contract():
    assert NONLINEAR_METHODS == {"softmax": ("ibert", "fqvit", "ivit", "index"), "gelu": ("ibert", "ivit", "polyfit"),
                                 "layernorm": ("ibert", "fqvit", "ivit")}


@pytest.mark.parametrize("args, needle", [
    (("conv", "ibert"), "softmax"),
    (("gelu", "fqvit"), "ibert, ivit"),
    (("softmax", "nope"), "fqvit"),
    (("softmax", "ivit", 3), "4..8"),
    (("softmax", "ivit", 9), "4..8"),
])
def test_bad_arguments_name_the_choices(args, needle):
    with pytest.raises(ValueError, match=needle):
        make_nonlinear(*args)


def grid_inputs(op, in_bits, scale, gen):
    """Random and adversarial integer inputs (int64) at the method's input width."""
    lo, hi = -(2 ** (in_bits - 1)), 2 ** (in_bits - 1) - 1
    c = 64
    cases = {
        "random": torch.randint(lo, hi + 1, (3, 5, c), generator=gen),
        "all_min": torch.full((2, 4, c), lo),
        "all_max": torch.full((2, 4, c), hi),
        "alternating_extremes": torch.tensor([lo, hi]).repeat(2, 4, c // 2),
        "constant_rows": torch.randint(lo, hi + 1, (2, 4, 1), generator=gen).expand(2, 4, c).clone(),
        "one_hot_rows": torch.full((2, 4, c), lo).scatter(-1, torch.randint(0, c, (2, 4, 1), generator=gen),
                                                          torch.full((2, 4, 1), hi)),
        "small_values": torch.randint(-3, 4, (2, 4, c), generator=gen),
        "batch1_long_rows": torch.randint(lo, hi + 1, (1, 2, 3136), generator=gen),
    }
    return cases


SCALES = {"softmax": [1e-4, 3e-3, 0.05, 0.5, 2.0], "gelu": [1e-4, 3e-3, 0.05, 0.5, 2.0],
          "layernorm": [1e-7, 1e-4, 1e-2, 1.0]}


@pytest.mark.parametrize("op, method", ALL)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("fine_grid", [False, True], ids=["reference", "fine_grid"])
def test_integer_path_is_bit_identical_to_training_path(op, method, bits, fine_grid):
    gen = torch.Generator().manual_seed(1)
    mod = build(op, method, bits, fine_grid=fine_grid)
    for scale in SCALES[op]:
        s = torch.tensor(scale)
        for name, q in grid_inputs(op, mod.in_bits, scale, gen).items():
            if op == "layernorm" and q.shape[-1] != 64:
                continue  # LayerNorm has a fixed width
            x = q.float() * s
            calibrate(mod, x, s)
            y, s_y = mod(x, s)
            q_int, s_int = mod.forward_int(q, s)  # raises IntegerOverflowError on any overflow
            assert q_int.dtype == torch.int64
            assert torch.isfinite(y).all(), (name, scale)
            assert torch.equal(torch.floor(y.double() / s_y.double() + 0.5).long(), q_int), (name, scale)
            assert torch.allclose(s_y.double(), s_int, rtol=1e-6)


@pytest.mark.parametrize("op, method", ALL)
def test_output_on_grid_and_in_range(op, method):
    x, s = realistic_input(op, 8, tokens=50) if op != "layernorm" else realistic_input(op, tokens=50, channels=64)
    mod = calibrate(build(op, method), x, s)
    y, s_y = mod(x, s)
    q = y.double() / s_y.double()
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.abs().max() < 2**24  # outputs are float32-exact
    if op == "softmax":
        assert (y >= 0).all() and (y <= 1).all()
        total, n = y.sum(-1).double(), y.shape[-1]
        if method == "fqvit":
            # each probability is rounded to the nearest power of two in the log domain (a factor
            # of at most sqrt(2) either way); the smallest ones (below 2**-15) become 0
            assert (total >= 2**-0.5 - n * 2.0**-15).all() and (total <= 2**0.5).all()
        elif method == "index":
            # each probability rounded (half up) to the output grid: the row sum is 1 +- n s_y / 2
            assert ((total - 1.0).abs() <= n * float(s_y) / 2 + 1e-6).all()
        else:
            # normalizing by the sum of the same approximated exponentials, then flooring each
            # probability to the output grid: the row sum lies in [1 - n * s_y, 1]
            assert (total <= 1.0 + 1e-6).all() and (total >= 1.0 - n * float(s_y)).all()


@pytest.mark.parametrize("op, method", ALL)
def test_int32_registers_are_checked(op, method):
    """The integer path's range check fires: a 16-bit LayerNorm input fed to a softmax method
    at a tiny scale must either fit or raise, never wrap around silently."""
    mod = build(op, method)
    q = torch.randint(-(2 ** (mod.in_bits - 1)), 2 ** (mod.in_bits - 1), (2, 3, 64))
    y, _ = mod.forward_int(q, torch.tensor(0.01))
    assert y.abs().max() < 2**31
    from mnq_search.integer import check_range
    with pytest.raises(IntegerOverflowError):
        check_range(torch.tensor([2**31]), "probe")


@pytest.mark.parametrize("op, method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_outputs_finite_and_unchanged(op, method, dtype):
    x, s = realistic_input(op, 8, tokens=20) if op != "layernorm" else realistic_input(op, tokens=20, channels=64)
    mod = calibrate(build(op, method), x, s)
    y_ref, _ = mod(x, s)
    with torch.autocast("cpu", dtype=dtype):
        y, s_y = mod(x, s)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("op, method", ALL)
def test_gradients_reach_input_and_affine(op, method):
    x, s = realistic_input(op, 8, tokens=20) if op != "layernorm" else realistic_input(op, tokens=20, channels=64)
    mod = calibrate(build(op, method), x, s)
    mod.train()
    x = x.clone().requires_grad_(True)
    y, _ = mod(x, s)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the STE is the exact float op's vector-Jacobian product at the dequantized input
    xd = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in mod.grad_params()]
    (mod.float_op(xd, *params) * w).sum().backward()
    assert torch.allclose(x.grad, xd.grad, rtol=1e-5, atol=1e-6)
    if op == "layernorm":
        for p, ref in zip(mod.grad_params(), params):
            assert p.grad is not None and p.grad.abs().sum() > 0
            assert torch.allclose(p.grad, ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, method", ALL)
def test_state_dict_round_trip(op, method):
    x, s = realistic_input(op, 8, tokens=20) if op != "layernorm" else realistic_input(op, tokens=20, channels=64)
    a = calibrate(build(op, method), x, s)
    b = build(op, method, seed=1)  # different affine parameters until loaded
    b.load_state_dict(a.state_dict())
    b.eval()
    assert torch.equal(a(x, s)[0], b(x, s)[0])


@pytest.mark.parametrize("op, method", ALL)
def test_eval_freezes_calibrated_state(op, method):
    x, s = realistic_input(op, 8, tokens=20) if op != "layernorm" else realistic_input(op, tokens=20, channels=64)
    mod = calibrate(build(op, method), x, s)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    mod(x * 3, s)  # eval: nothing may move
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("op, method", ALL)
def test_device_follows_input(op, method):
    from tests.conftest import cuda_or_skip
    cuda_or_skip()
    x, s = realistic_input(op, 8, tokens=20) if op != "layernorm" else realistic_input(op, tokens=20, channels=64)
    mod = calibrate(build(op, method), x, s)
    y_cpu, _ = mod(x, s)
    mod.cuda()
    y, _ = mod(x.cuda(), s.cuda())
    assert y.is_cuda and torch.equal(y.cpu(), y_cpu)
    q_int, _ = mod.forward_int((x / s).round().long().cuda(), s.cuda())
    assert q_int.is_cuda


def test_registry_refuses_duplicates():
    from mnq_search.methods import register_method
    with pytest.raises(ValueError, match="registered twice"):
        register_method("softmax", "ibert")(type("Dup", (get_method_class("softmax", "ibert"),), {}))


@pytest.mark.parametrize("op, method", ALL)
@pytest.mark.parametrize("bits", [8, 6])
def test_cpu_row_blocks_give_the_same_output(op, method, bits, monkeypatch):
    """The reference path runs the kernel over blocks of rows on the CPU; each kernel must treat rows
    on their own, so blocks of 7 rows (with a ragged last block) give exactly the whole-tensor result
    (the fast path's blocks: tests/methods_tests/test_fast.py)."""
    import mnq_search.methods._base as base
    from mnq_search.integer import fast_kernels

    x, s = realistic_input(op, bits, tokens=50) if op != "layernorm" else realistic_input(op, tokens=50, channels=64)
    mod = calibrate(build(op, method, bits), x, s)
    with fast_kernels(False):
        monkeypatch.setattr(base, "CPU_BLOCK_ELEMENTS", 10**9)
        whole, s_whole = mod(x, s)
        monkeypatch.setattr(base, "CPU_BLOCK_ELEMENTS", 7 * x.shape[-1] + 1)
        assert x.numel() > 2 * base.CPU_BLOCK_ELEMENTS and (x.numel() // x.shape[-1]) % 7
        blocked, s_blocked = mod(x, s)
        assert torch.equal(blocked, whole) and torch.equal(s_blocked, s_whole)
        x.requires_grad_(True)
        y, _ = mod(x, s)  # the training path (STE) takes the blocked kernel too
    assert torch.equal(y.detach(), whole)
