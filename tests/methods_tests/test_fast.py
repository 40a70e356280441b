"""The fast path (tables + compiled row loops, mnq_search/methods/_fast.py) against the reference.

For every registered method, bits {4, 5, 6, 8} and both grid settings, on random and adversarial
integer inputs (rows of equal values, saturated rows, rows holding the extremes, masked logits,
zero-variance rows, long rows) at the smallest to the largest input scales:

- the fast path's integers equal the integer path's (``forward_int``, int64 with range checks:
  every register the fast path holds is proven in range there);
- its dequantized output equals the reference training path's, bit for bit;
- the device-agnostic torch version of the fast path (tables and one gather, used off the CPU)
  equals both, where the method has one;
- inputs outside the tables' domain make the fast path decline, and the reference runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnq_search.methods import NONLINEAR_METHODS
from mnq_search.integer import (fast_kernels, power_sums, quantize_cpu, quantize_int8_cpu, quantize_mask_cpu,
                                run_rows)
from mnq_search.methods._fast import MASK_SENTINEL
from mnq_search.methods import make_nonlinear
from mnq_search.testing import affine_layernorm

ALL = [(op, m) for op, ms in NONLINEAR_METHODS.items() for m in ms]
SCALES = {"softmax": [1e-4, 3e-3, 0.05, 0.5, 2.0, 40.0], "gelu": [1e-4, 3e-3, 0.05, 0.5, 2.0, 40.0],
          "layernorm": [1e-7, 1e-4, 1e-2, 1.0, 30.0]}
C = 64


def cases(op: str, in_bits: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    lo, hi = -(2 ** (in_bits - 1)), 2 ** (in_bits - 1) - 1
    out = {
        "random": torch.randint(lo, hi + 1, (3, 5, C), generator=gen),
        "all_min": torch.full((2, 3, C), lo),
        "all_max": torch.full((2, 3, C), hi),
        "extremes": torch.tensor([lo, hi]).repeat(2, 3, C // 2),
        "constant_rows": torch.randint(lo, hi + 1, (2, 3, 1), generator=gen).expand(2, 3, C).clone(),
        "one_hot": torch.full((2, 3, C), lo).scatter(-1, torch.randint(0, C, (2, 3, 1), generator=gen),
                                                     torch.full((2, 3, 1), hi)),
        "small": torch.randint(-3, 4, (2, 3, C), generator=gen),
        "negative_rows": torch.randint(lo, 0, (2, 3, C), generator=gen),
    }
    if op == "softmax":
        masked = torch.randint(lo, hi + 1, (2, 3, C), generator=gen)
        masked[..., : C // 2] = MASK_SENTINEL  # Swin's shift mask: half of every row
        out["masked"] = masked
        fully = torch.full((1, 2, C), MASK_SENTINEL)  # every logit of the row masked
        out["fully_masked"] = fully
        out["long_rows"] = torch.randint(lo, hi + 1, (1, 2, 3136), generator=gen)
    return out


def build(op, method, bits, fine_grid):
    ln = affine_layernorm(C) if op == "layernorm" else None
    return make_nonlinear(op, method, bits, ln, fine_grid=fine_grid)


def reference(mod, q, s):
    with fast_kernels(False):
        return mod.forward_q(q.float(), torch.tensor(s))


@pytest.mark.parametrize("op, method", ALL)
@pytest.mark.parametrize("bits", [8, 6, 5, 4])
@pytest.mark.parametrize("fine_grid", [False, True], ids=["reference_grid", "fine_grid"])
def test_fast_path_is_bit_identical_to_the_reference(op, method, bits, fine_grid):
    gen = torch.Generator().manual_seed(bits)
    mod = build(op, method, bits, fine_grid)
    for scale in SCALES[op]:
        s = torch.tensor(scale)
        inputs = cases(op, mod.in_bits, gen)
        mod.train()
        with torch.no_grad(), fast_kernels(False):
            mod(inputs["random"].float() * s, s)  # calibration (LayerNorm ranges, shifts)
        mod.eval()
        for name, q in inputs.items():
            where = f"{name} at scale {scale}"
            q_int, s_int = mod.forward_int(q, s)
            fast = mod.run_fast(q.float(), float(s), integers=True)
            assert fast is not None, f"the fast path declined {where}"
            assert torch.equal(fast[0], q_int.double()), where
            y_ref, s_ref = reference(mod, q, float(s))
            with torch.no_grad():
                y, s_y = mod.forward_q(q.float(), s)
            assert torch.equal(y, y_ref) and torch.equal(s_y, s_ref), where
            plan = mod._plans[next(reversed(mod._plans))]
            if plan.torch_fn is not None:  # the device-agnostic version of the same tables
                assert torch.equal(plan.torch_fn(q.float(), True), q_int.double()), where
                assert torch.equal(plan.torch_fn(q.float(), False), y_ref), where


@pytest.mark.parametrize("op, method", [(op, m) for op, m in ALL if op != "layernorm"])
def test_inputs_outside_the_tables_fall_back_to_the_reference(op, method):
    mod = build(op, method, 8, False).eval()
    q = torch.randint(-128, 128, (2, 3, C))
    q[0, 0, 0] = 5000  # wider than the 8-bit input grid the tables cover
    assert mod.run_fast(q.float(), 0.05) is None
    with torch.no_grad():
        y, _ = mod.forward_q(q.float(), torch.tensor(0.05))
    assert torch.equal(y, reference(mod, q, 0.05)[0])


@pytest.mark.parametrize("op, method", ALL)
def test_row_blocks_on_threads_give_the_same_output(op, method, monkeypatch):
    """Rows are split over threads in blocks; blocks of any size give the whole-tensor result."""
    import mnq_search.integer._compiled as fast

    gen = torch.Generator().manual_seed(0)
    mod = build(op, method, 8, False)
    q = torch.randint(-128, 128, (37, 5, C), generator=gen) * (256 if op == "layernorm" else 1)
    s = 1e-3 if op == "layernorm" else 0.05
    mod.train()
    with torch.no_grad():
        mod(q.float() * s, torch.tensor(s))
    mod.eval()
    monkeypatch.setattr(fast, "MIN_ELEMENTS_PER_THREAD", 10**9)
    whole = mod.run_fast(q.float(), s, integers=True)[0]
    monkeypatch.setattr(fast, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(fast, "THREADED", True)
    with torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(3)  # 185 rows in 3 blocks of 61, 62, 62
        try:
            blocked = mod.run_fast(q.float(), s, integers=True)[0]
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(blocked, whole)


def test_run_rows_reports_a_declined_block():
    calls = []

    def kernel(a, out, flag):
        calls.append(a.shape[0])
        out[:] = a
        return not (a == flag).any()

    a = np.arange(40, dtype=np.float32).reshape(8, 5)
    out = np.empty_like(a)
    assert run_rows(kernel, (a, out), (-1.0,)) and np.array_equal(out, a)
    assert not run_rows(kernel, (a, out), (37.0,))


def test_fused_quantizers_equal_the_eager_ops():
    torch.manual_seed(0)
    x = torch.randn(7, 9, 33) * 3
    x[0, 0, :4] = torch.tensor([0.5, -0.5, 2.5, -126.5]) * 0.02  # ties: half-up
    s = torch.tensor(0.02)
    eager = torch.floor(x / s + 0.5).clamp(-128, 127)
    assert torch.equal(quantize_cpu(x, s, -128, 127), eager)
    q, inside = quantize_mask_cpu(x, s, -128, 127)
    r = torch.floor(x / s + 0.5)
    assert torch.equal(q, eager) and torch.equal(inside, (r >= -128) & (r <= 127))
    assert torch.equal(quantize_int8_cpu(x, s, -128, 127), eager.to(torch.int8))
    w = torch.randn(6, 4, 3, 3)  # a conv weight with one scale per output channel
    sw = w.abs().amax(dim=(1, 2, 3)).div(127).view(-1, 1, 1, 1)
    qw, inside_w = quantize_mask_cpu(w, sw, -128, 127)
    assert torch.equal(qw, torch.floor(w / sw + 0.5).clamp(-128, 127)) and inside_w.all()


def test_quantizer_gradient_is_unchanged():
    from mnq_search.integer._rounding import _RoundClampSTE, quantize_ste

    torch.manual_seed(0)
    x = (torch.randn(4, 10, 16) * 4).requires_grad_(True)
    s = torch.tensor(0.02)
    g = torch.randn(4, 10, 16)
    (quantize_ste(x, s, -128, 127) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (_RoundClampSTE.apply(x2 / s, -128, 127) * g).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_power_sums_match_float64_sums():
    torch.manual_seed(0)
    x, q = torch.randn(5, 1000), torch.randn(5, 1000)
    sx, sd = power_sums(x, q)
    assert torch.allclose(sx, (x.double() ** 2).sum(1), rtol=1e-13)
    assert torch.allclose(sd, ((x - q).double() ** 2).sum(1), rtol=1e-13)


def test_integer_gemm_equals_the_float_held_linear():
    from mnq_search.quant import QLinear

    torch.manual_seed(0)
    lin = QLinear(torch.nn.Linear(192, 48), 8)
    x = torch.randn(3, 17, 192) * 2
    lin.train()
    with torch.no_grad():
        lin(x)  # calibrate the input range
    lin.eval()
    with torch.no_grad():
        fast = lin(x)  # int8 x int8 -> int32 GEMM
        with fast_kernels(False):
            slow = lin(x)  # the float-held product of the integers
    assert torch.equal(fast, slow)


def test_integer_gemm_gradients_are_the_float_products():
    from mnq_search.quant._linear import _IntGemmSTE

    torch.manual_seed(0)
    q = torch.randint(-128, 128, (2, 9, 64)).float().requires_grad_(True)
    w = torch.randint(-127, 128, (16, 64)).float().requires_grad_(True)
    g = torch.randn(2, 9, 16)
    y = _IntGemmSTE.apply(q, w)
    (y * g).sum().backward()
    q2, w2 = q.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(q2, w2)
    (y2 * g).sum().backward()
    assert torch.equal(y, y2)
    assert torch.allclose(q.grad, q2.grad, rtol=1e-6) and torch.allclose(w.grad, w2.grad, rtol=1e-5)
