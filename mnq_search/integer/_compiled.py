"""Compiled integer loops shared by the layers above: numba set-up, exact integer helpers usable
inside compiled loops, the row-block runner, and the element-wise kernels of the linear part.

- :func:`jit`: numba-compile a function on first call (cached on disk next to this file, GIL
  released); without numba the plain Python function.
- :func:`isqrt_i64`, :func:`bitlen_i64`, :func:`floor_div_i64`: exact integer square root, bit
  length (count-leading-zeros) and floor division for use inside compiled loops.
- :func:`run_rows`: run a compiled row kernel over blocks of rows on the torch thread count.
- One-pass versions of the quantizer (forward, straight-through backward, int8 output), the
  integer GEMM's epilogue, and the per-sample signal/noise sums of the sensitivity pass: each
  computes the same float32 / float64 numbers as the eager ops it replaces (tests compare them).

The switch for everything compiled: ``MNQ_FAST_KERNELS=0`` in the environment, or
:func:`fast_kernels` as a context manager (per thread). The method families' own tables and row
kernels build on this module (:mod:`mnq_search.methods._fast`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
MIN_ELEMENTS_PER_THREAD = 1 << 15  # below this a second thread costs more than it saves
# Row blocks go to a thread pool only when torch's OpenMP workers sleep between parallel regions
# (mnq_search/__init__.py sets OMP_WAIT_POLICY=PASSIVE before torch loads): workers that spin hold
# the other cores, and a kernel split over threads then runs slower than on one (measured 1.7x).
THREADED = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"

_state = threading.local()


def fast_enabled() -> bool:
    """True unless ``MNQ_FAST_KERNELS=0`` or inside ``fast_kernels(False)`` (this thread)."""
    flag = getattr(_state, "enabled", None)
    return flag if flag is not None else os.environ.get("MNQ_FAST_KERNELS", "1") != "0"


@contextmanager
def fast_kernels(enabled: bool):
    """Turn the fast path on or off in this thread (tests and benchmarks compare the two)."""
    old = getattr(_state, "enabled", None)
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = old


def jit(fn: Callable) -> Callable:
    """numba-compile ``fn`` on first call (cached on disk, GIL released); plain Python without numba."""
    if not HAVE_NUMBA:
        return fn
    import numba

    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


# --- integer helpers usable inside compiled loops ------------------------------------------------

if HAVE_NUMBA:
    import numba as _nb

    @_nb.njit(cache=True, nogil=True, inline="always")
    def isqrt_i64(n):
        """floor(sqrt(n)) for 0 <= n < 2**62, exact (float estimate, then integer correction)."""
        if n <= 0:
            return 0
        x = np.int64(np.sqrt(np.float64(n)))
        while x * x > n:
            x -= 1
        while (x + 1) * (x + 1) <= n:
            x += 1
        return x

    try:  # count-leading-zeros as one instruction (numba's own intrinsic for int.bit_length)
        from numba.cpython.unsafe.numbers import leading_zeros as _clz
    except ImportError:  # pragma: no cover - older or newer numba without it
        _clz = None

    if _clz is not None:
        @_nb.njit(cache=True, nogil=True, inline="always")
        def bitlen_i64(t):
            """Number of bits of 0 <= t < 2**63 (0 for 0): 64 minus the leading zeros."""
            return 64 - np.int64(_clz(np.int64(t)))
    else:  # pragma: no cover
        @_nb.njit(cache=True, nogil=True, inline="always")
        def bitlen_i64(t):
            """Number of bits of 0 <= t < 2**53 (0 for 0), exact through the float exponent."""
            if t <= 0:
                return 0
            return np.int64(math.frexp(np.float64(t))[1])
    @_nb.njit(cache=True, nogil=True, inline="always")
    def floor_div_i64(a, b):
        """floor(a / b) for b > 0 and |a|, b < 2**52 by one float64 division: when a / b is not an
        integer it lies at least 1 / b from one, farther than the division's rounding error
        (|a / b| 2**-53), so the floor of the rounded quotient is exact; an integer quotient is exact.
        Branch-free, unlike an int64 division, so the loop around it vectorizes."""
        return np.int64(np.floor(np.float64(a) / np.float64(b)))
else:  # pragma: no cover - numba is a dependency; these keep the module importable without it
    def isqrt_i64(n):
        return math.isqrt(int(n)) if n > 0 else 0

    def bitlen_i64(t):
        return int(t).bit_length() if t > 0 else 0

    def floor_div_i64(a, b):
        return int(a) // int(b)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001 (grow only)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mnq-kernel")
        return _POOL


def run_rows(kernel: Callable, rows: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> bool:
    """Run ``kernel(*row_blocks, *args) -> ok`` over blocks of rows of the 2-D arrays ``rows`` (same
    first dim) on the torch thread count; rows are independent, so blocking changes no result.
    False when any block declined."""
    n_rows = rows[0].shape[0]
    n = min(torch.get_num_threads() if THREADED else 1, n_rows, max(1, rows[0].size // MIN_ELEMENTS_PER_THREAD))
    if n <= 1:
        return bool(kernel(*rows, *args))
    cuts = [n_rows * i // n for i in range(n + 1)]
    futures = [_pool(n - 1).submit(kernel, *[a[lo:hi] for a in rows], *args)
               for lo, hi in zip(cuts[1:-1], cuts[2:])]
    ok = bool(kernel(*[a[: cuts[1]] for a in rows], *args))
    return all([bool(f.result()) for f in futures]) and ok


# --- element-wise helpers of the linear part -------------------------------------------------------

@jit
def _quantize_kernel(x, out, scale, qmin, qmax):
    """``out = clamp(floor(x / scale + 0.5), qmin, qmax)`` in float32, as the eager ops compute it."""
    half = np.float32(0.5)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = np.floor(x[r, c] / scale + half)
            out[r, c] = min(max(v, qmin), qmax)
    return True


def quantize_cpu(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor | None:
    """The no-gradient quantizer ``clamp(floor(x / s + 1/2))`` in one fused pass (CPU, float32,
    per-tensor scale); None where it does not apply (other devices or dtypes, no numba)."""
    if not (HAVE_NUMBA and fast_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and scale.numel() == 1 and x.dim() >= 1 and x.numel()):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.float32)
    run_rows(_quantize_kernel, (x2.numpy(), out.numpy()),
             (np.float32(scale.detach().reshape(())), np.float32(qmin), np.float32(qmax)))
    return out.view(x.shape)


@jit
def _quantize_mask_kernel(x, out, inside, scale, qmin, qmax):
    """:func:`_quantize_kernel` that also records where the rounded value lies inside the range."""
    half = np.float32(0.5)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = np.floor(x[r, c] / scale + half)
            inside[r, c] = v >= qmin and v <= qmax
            out[r, c] = min(max(v, qmin), qmax)
    return True


@jit
def _quantize_rows_mask_kernel(x, scale, out, inside, qmin, qmax):
    """:func:`_quantize_mask_kernel` with one scale per row (per-output-channel weights)."""
    half = np.float32(0.5)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = np.floor(x[r, c] / scale[r] + half)
            inside[r, c] = v >= qmin and v <= qmax
            out[r, c] = min(max(v, qmin), qmax)
    return True


def quantize_mask_cpu(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``clamp(floor(x / s + 1/2))``, where the rounded value was inside the range) in one pass, for
    the straight-through estimator's forward (CPU float32; a per-tensor scale, or one scale per
    index of the first dim shaped (N, 1, ...)); None elsewhere."""
    if not (HAVE_NUMBA and fast_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and scale.dtype == torch.float32 and x.dim() >= 1 and x.numel()):
        return None
    per_row = scale.numel() > 1
    if per_row and not (x.dim() >= 2 and scale.shape == (x.shape[0],) + (1,) * (x.dim() - 1)):
        return None
    x2 = x.detach().reshape(x.shape[0] if per_row else -1, -1 if per_row else x.shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.float32)
    inside = torch.empty(x2.shape, dtype=torch.bool)
    bounds = (np.float32(qmin), np.float32(qmax))
    if per_row:
        run_rows(_quantize_rows_mask_kernel, (x2.numpy(), scale.detach().reshape(-1).contiguous().numpy(),
                                              out.numpy(), inside.numpy()), bounds)
    else:
        run_rows(_quantize_mask_kernel, (x2.numpy(), out.numpy(), inside.numpy()),
                 (np.float32(scale.detach().reshape(())),) + bounds)
    return out.view(x.shape), inside.view(x.shape)


@jit
def _bias_scale_kernel(acc, out, bias, scale):
    """``out = (acc + bias) * scale`` per output channel (last dim), float32 as the eager ops."""
    for r in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            out[r, c] = (acc[r, c] + bias[c]) * scale[c]
    return True


def bias_scale_cpu(acc: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    """``(acc + bias) * scale`` over the last dim in one pass, in place (CPU float32); None elsewhere."""
    if not (HAVE_NUMBA and fast_enabled() and acc.device.type == "cpu" and acc.dtype == torch.float32
            and acc.is_contiguous() and acc.dim() >= 1 and acc.numel()):
        return None
    c = acc.shape[-1]
    b = (bias.detach().float() if bias is not None else torch.zeros(c)).expand(c).contiguous()
    s = scale.detach().float().expand(c).contiguous()
    a2 = acc.view(-1, c)
    run_rows(_bias_scale_kernel, (a2.numpy(), a2.numpy()), (b.numpy(), s.numpy()))
    return acc


@jit
def _ste_backward_kernel(g, inside, out, scale):
    """``out = (g * inside) / scale``, float32 as the eager ops compute it."""
    for r in range(g.shape[0]):
        for c in range(g.shape[1]):
            out[r, c] = (g[r, c] * np.float32(inside[r, c])) / scale
    return True


def ste_backward_cpu(g: torch.Tensor, inside: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The quantizer's straight-through gradient ``g * inside / s`` in one pass (CPU float32)."""
    if not (HAVE_NUMBA and fast_enabled() and g.device.type == "cpu" and g.dtype == torch.float32
            and scale.numel() == 1 and g.dim() >= 1 and g.numel()):
        return None
    g2 = g.reshape(-1, g.shape[-1]).contiguous()
    out = torch.empty(g2.shape, dtype=torch.float32)
    run_rows(_ste_backward_kernel, (g2.numpy(), inside.reshape(g2.shape).numpy(), out.numpy()),
             (np.float32(scale.detach().reshape(())),))
    return out.view(g.shape)


# --- integer GEMM of the linear layers (CPU) ---------------------------------------------------------

HAVE_INT_MM = hasattr(torch, "_int_mm")


@jit
def _quantize_i8_kernel(x, out, scale, qmin, qmax):
    """:func:`_quantize_kernel` writing int8 (the operand of the integer GEMM)."""
    half = np.float32(0.5)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[r, c] = np.int8(min(max(np.floor(x[r, c] / scale + half), qmin), qmax))
    return True


def quantize_int8_cpu(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor | None:
    """The quantizer's integers as an int8 tensor in one pass (CPU, float32 input, per-tensor scale,
    a range inside int8); None where that does not apply."""
    if not (HAVE_NUMBA and HAVE_INT_MM and fast_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and scale.numel() == 1 and x.dim() >= 2 and x.numel() and qmin >= -128 and qmax <= 127):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.int8)
    run_rows(_quantize_i8_kernel, (x2.numpy(), out.numpy()),
             (np.float32(scale.detach().reshape(())), np.float32(qmin), np.float32(qmax)))
    return out.view(x.shape)


@jit
def _int_bias_scale_kernel(acc, out, bias, scale):
    """``out = (float32(acc) + bias) * scale`` per output channel: the epilogue of the integer GEMM,
    the same float32 operations as the float-held path applies to its (exact) accumulator."""
    for r in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            out[r, c] = (np.float32(acc[r, c]) + bias[c]) * scale[c]
    return True


def int_linear_cpu(q8: torch.Tensor, w8t: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
                   ) -> torch.Tensor:
    """``(q8 @ w8t + bias) * scale`` with int8 operands and exact int32 accumulators (``torch._int_mm``),
    the epilogue in one pass; ``q8`` (..., K) int8, ``w8t`` (K, N) int8, ``bias``/``scale`` (N,)."""
    n = w8t.shape[1]
    acc = torch._int_mm(q8.reshape(-1, q8.shape[-1]), w8t)
    out = torch.empty(acc.shape, dtype=torch.float32)
    b = (bias.detach().float() if bias is not None else torch.zeros(n)).expand(n).contiguous()
    s = scale.detach().float().expand(n).contiguous()
    run_rows(_int_bias_scale_kernel, (acc.numpy(), out.numpy()), (b.numpy(), s.numpy()))
    return out.view(*q8.shape[:-1], n)



# --- signal and noise power per sample (sensitivity) -------------------------------------------------

@jit
def _power_sums_kernel(x, q, out):
    """Per row: (sum x**2, sum (x - q)**2) in float64, the difference taken in float32."""
    for r in range(x.shape[0]):
        sx = 0.0
        sd = 0.0
        for c in range(x.shape[1]):
            xv = np.float64(x[r, c])
            d = np.float64(x[r, c] - q[r, c])
            sx += xv * xv
            sd += d * d
        out[r, 0] = sx
        out[r, 1] = sd
    return True


def power_sums(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum x**2, sum (x - q)**2) per row of 2-D float32 tensors, float64: one compiled pass on the
    CPU (rows summed in order), torch ops elsewhere."""
    if HAVE_NUMBA and fast_enabled() and x.device.type == "cpu" and x.dtype == q.dtype == torch.float32:
        x2, q2 = x.contiguous(), q.contiguous()
        out = torch.empty(x2.shape[0], 2, dtype=torch.float64)
        run_rows(_power_sums_kernel, (x2.numpy(), q2.numpy(), out.numpy()), ())
        return out[:, 0], out[:, 1]
    xd, d = x.double(), (x - q).double()
    return (xd * xd).sum(dim=1), (d * d).sum(dim=1)
