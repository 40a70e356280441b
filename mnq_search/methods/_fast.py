"""The fast path of the integer methods: tables built from the reference kernels, fused row loops.

A method's reference kernel (:meth:`NonLinearMethod.kernel`, run by the int64 integer path and the
float-held training path) is the specification. The fast path computes the same integers with
fewer passes:

- **Tables.** With a ``b``-bit input (b <= 8) every element-wise approximation (the exponential of
  ``x - rowmax``, I-BERT's polynomial GELU, I-ViT's ShiftGELU as a function of the element and its
  row maximum) is a function of a small integer and of constants fixed by the input scale. A
  method builds each table by running *its own reference code* on every integer of that domain
  (:class:`IntTable`), once per calibrated scale, so inside the domain the table is the reference by
  construction. An input outside the domain (possible only when a method is called directly with
  integers wider than its input quantizer) makes the fast path decline, and the reference runs.
- **Fused row loops on the CPU.** What remains per row (max, sum, one division or reciprocal,
  integer square root, the final multiply-shift and the dequantization) runs in one loop per row,
  compiled by numba (``nogil``), in integer arithmetic (int64 registers), over blocks of rows on
  ``torch.get_num_threads()`` threads.
- **Other devices.** The same tables drive a few torch ops (one gather for the element-wise part);
  methods without a table part (LayerNorm) run the reference kernel there.

Every fast kernel can write either the dequantized float32 output (what the model uses; the same
float32 numbers as the reference path's dequantization) or the integers themselves as float64
(what the bit-identity tests compare with the integer path).

Switch: ``MNQ_FAST_KERNELS=0`` in the environment, or :func:`~mnq_search.integer.fast_kernels` as
a context manager. The compiled-loop machinery itself is :mod:`mnq_search.integer._compiled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..integer._compiled import HAVE_NUMBA, jit, run_rows

MASK_SENTINEL = -(2**15)  # the integer a masked attention logit takes (see mnq_search.slot)


# --- tables ----------------------------------------------------------------------------------------

@dataclass
class IntTable:
    """A function of an integer on a union of two intervals ``[lo0, lo0 + len(v0))`` and
    ``[lo1, lo1 + len(v1))`` (``v1`` may be empty). ``values`` are int64 (integer mode) or float32
    (dequantized) numpy arrays; ``tensors`` are the same on the module's device for the torch path."""

    lo0: int
    v0: np.ndarray
    lo1: int = 0
    v1: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def as_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.v0).to(device), torch.from_numpy(self.v1).to(device)


def exp_domains(in_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values ``d = rowmax - q`` a softmax slot can produce (as int64 tensors ``-d``, the kernel's
    input after the max subtraction): ``[0, 2**b - 1]`` for unmasked logits and, for Swin's masked
    logits (integer :data:`MASK_SENTINEL`), ``rowmax - MASK_SENTINEL`` for every possible row max."""
    span = 2**in_bits
    main = -torch.arange(span, dtype=torch.int64)
    lo1 = -MASK_SENTINEL - 2 ** (in_bits - 1)
    masked = -(lo1 + torch.arange(span, dtype=torch.int64))
    return main, masked


# --- running a compiled row kernel -----------------------------------------------------------------


@dataclass
class FastPlan:
    """What a method's fast path needs at one input scale: a compiled row kernel with its constant
    arguments (dequantized and integer mode) and, for other devices, a torch function.

    ``cpu(q2, out2, *args) -> ok`` works on 2-D float32 inputs (rows = last dim); ``torch_fn(q, integers)``
    takes the input integers as a float tensor of any shape and returns the output or None."""

    s_y: torch.Tensor
    kernel: Callable | None = None
    args: tuple[Any, ...] = ()
    int_args: Callable[[], tuple[Any, ...]] | None = None
    torch_fn: Callable[[torch.Tensor, bool], torch.Tensor | None] | None = None
    _int_args: tuple[Any, ...] | None = None

    def run(self, q: torch.Tensor, integers: bool = False) -> torch.Tensor | None:
        """The output (float32 dequantized, or float64 integers) or None where the plan declines."""
        if q.device.type == "cpu" and HAVE_NUMBA and self.kernel is not None:
            if integers:
                if self._int_args is None:
                    self._int_args = self.int_args()
                args = self._int_args
            else:
                args = self.args
            q2 = q.detach().reshape(-1, q.shape[-1]).to(torch.float32).contiguous()
            out = torch.empty(q2.shape, dtype=torch.float64 if integers else torch.float32)
            if not run_rows(self.kernel, (q2.numpy(), out.numpy()), args):
                return None
            return out.view(q.shape)
        if self.torch_fn is not None:
            return self.torch_fn(q.detach(), integers)
        return None


def table_lookup(d: torch.Tensor, v0: torch.Tensor, lo1: int, v1: torch.Tensor) -> torch.Tensor | None:
    """Torch path: ``table(d)`` for integer ``d >= 0`` (a long tensor) on the two intervals of an
    :class:`IntTable` whose first interval starts at 0; None when some ``d`` lies outside both."""
    n0, n1 = v0.numel(), v1.numel()
    in0 = d < n0
    in1 = (d >= lo1) & (d < lo1 + n1)
    if not bool((in0 | in1).all()):
        return None
    out = v0[d.clamp(max=n0 - 1)]
    if n1 and bool((~in0).any()):
        out = torch.where(in0, out, v1[(d - lo1).clamp(0, n1 - 1)])
    return out


# --- shared row kernels ----------------------------------------------------------------------------

@jit
def _exp_rows(q, r, buf, t0, lo1, t1):
    """Fill ``buf`` with table(rowmax - q[r, c]) for row r; returns the row sum, or -1 when some
    difference lies outside the table."""
    n = q.shape[1]
    m = q[r, 0]
    lo = q[r, 0]
    for c in range(1, n):
        v = q[r, c]
        m = max(m, v)
        lo = min(lo, v)
    n0 = t0.shape[0]
    total = 0
    if m - lo < n0:  # every difference in the first interval (no masked logit): no branch
        for c in range(n):
            e = np.int64(t0[np.int64(m - q[r, c])])
            buf[c] = e
            total += e
        return total
    n1 = t1.shape[0]
    for c in range(n):
        d = np.int64(m - q[r, c])
        if d < n0:
            e = np.int64(t0[d])
        elif d >= lo1 and d < lo1 + n1:
            e = np.int64(t1[d - lo1])
        else:
            return -1
        buf[c] = e
        total += e
    return total


@jit
def softmax_divide_kernel(q, out, t0, lo1, t1, num, shift, cap, total_cap, out_scale):
    """Softmax with one integer division per row (I-BERT, I-ViT): ``e = table(rowmax - q)``,
    ``total = min(sum e, total_cap)``, ``f = num // total``, ``out = min((e f) >> shift, cap)``."""
    buf = np.empty(q.shape[1], np.int64)
    for r in range(q.shape[0]):
        total = _exp_rows(q, r, buf, t0, lo1, t1)
        if total < 0:
            return False
        if total > total_cap:
            total = total_cap
        f = num // total
        for c in range(q.shape[1]):
            o = (buf[c] * f) >> shift
            if o > cap:
                o = cap
            out[r, c] = o * out_scale
    return True


@jit
def lookup_kernel(q, out, table, lo):
    """Element-wise ``out = table[q - lo]`` (False when an input lies outside the table)."""
    n = table.shape[0]
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            i = np.int64(q[r, c]) - lo
            if i < 0 or i >= n:
                return False
            out[r, c] = table[i]
    return True


def exp_table(exp_fn: Callable[[torch.Tensor], torch.Tensor], in_bits: int) -> IntTable:
    """The table of an exponential part ``exp_fn(q_rel)`` (int64 in, int64 out, q_rel = q - rowmax)
    over the differences a ``in_bits``-bit softmax slot produces (:func:`exp_domains`)."""
    main, masked = exp_domains(in_bits)
    v0, v1 = exp_fn(main), exp_fn(masked)
    kind = np.int32 if max(int(v0.max()), int(v1.max())) < 2**31 else np.int64  # exponentials: int32
    return IntTable(0, v0.numpy().astype(kind), int(-masked[0]), v1.numpy().astype(kind))


def softmax_torch(q: torch.Tensor, tables: tuple[torch.Tensor, int, torch.Tensor],
                  row_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """Torch path of a table softmax: one gather for the exponentials (``tables`` = the
    :class:`IntTable`'s (v0, lo1, v1) on the device), ``row_fn(e)`` for the rest of the row."""
    d = (q.amax(dim=-1, keepdim=True) - q).long()
    e = table_lookup(d, *tables)
    return None if e is None else row_fn(e)


def device_tables(table: IntTable, device) -> tuple[torch.Tensor, int, torch.Tensor]:
    v0, v1 = table.as_tensors(device)
    return v0, table.lo1, v1
