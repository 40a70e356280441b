"""Fast plans built from the reference kernels (see :mod:`._fast`): the shapes of fast path that
the families share.

- :class:`TableSoftmax`: base of the softmax methods whose kernel is ``row_part(exp_part(q - rowmax))``;
  the exponential part becomes a table over every difference a slot can produce, the row part runs
  in a compiled row kernel on the CPU (:meth:`TableSoftmax.cpu_row_kernel`) and as the reference's
  own integer code elsewhere.
- :func:`elementwise_plan`: an element-wise kernel (I-BERT's GELU) as one table of outputs.
- :func:`layernorm_plan`: I-BERT / I-ViT LayerNorm (integer mean, variance, square root, one
  division per row, folded affine) as one compiled row kernel; no table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ._base import AffineLayerNorm, NonLinearMethod, reference_kernel
from ..integer._compiled import isqrt_i64, jit
from ._fast import FastPlan, device_tables, exp_table, lookup_kernel, softmax_torch
from ._intops import ln_affine_constants, ln_headroom, ln_scale_n


def _dequantize(o: torch.Tensor, s_y: torch.Tensor, integers: bool) -> torch.Tensor:
    """The reference path's dequantization of integer outputs (float64 product, then float32)."""
    return o.double() if integers else (o.double() * s_y).float()


class TableSoftmax(NonLinearMethod):
    """A softmax whose kernel is ``row_part(exp_part(q - rowmax, s_x, N))``.

    Subclasses implement :meth:`exp_part` (element-wise, integers <= 0 in) and :meth:`row_part`
    (the row's exponentials in, output integers and their scale out), both on integer tensors of
    either kind, and :meth:`cpu_row_kernel` (the row part as a compiled kernel, see
    :func:`._fast.softmax_divide_kernel`)."""

    def exp_part(self, q_rel: torch.Tensor, s_x: float, row_len: int) -> torch.Tensor:
        raise NotImplementedError

    def row_part(self, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def out_scale(self) -> float:
        """The scale of the output integers (a constant of the method)."""
        raise NotImplementedError

    def cpu_row_kernel(self) -> tuple[Callable, Callable[[float], tuple]]:
        """(compiled kernel ``k(q, out, t0, lo1, t1, *consts)``, ``consts(out_scale)``)."""
        raise NotImplementedError

    def kernel(self, q, s_x):
        q = q - q.amax(dim=-1, keepdim=True)
        return self.row_part(self.exp_part(q, s_x, q.shape[-1])), self.out_scale()

    def float_op(self, x):
        return torch.softmax(x, dim=-1)

    def fast_plan(self, s_x, row_len, device):
        table = exp_table(lambda d: self.exp_part(d, s_x, row_len), self.in_bits)
        s_y = torch.tensor(self.out_scale(), dtype=torch.float64, device=device)
        kernel, consts = self.cpu_row_kernel()
        tables = device_tables(table, device)

        def torch_fn(q, integers):
            return softmax_torch(q, tables, lambda e: _dequantize(self.row_part(e), s_y, integers))

        head = (table.v0, table.lo1, table.v1)
        return FastPlan(s_y, kernel, head + consts(float(s_y)), lambda: head + consts(1.0), torch_fn)


def elementwise_plan(module: NonLinearMethod, s_x: float, device) -> FastPlan:
    """An element-wise kernel as a table over the ``in_bits``-bit input grid: the dequantized
    outputs of the reference path, and (on demand) its integers."""
    lo = -(2 ** (module.in_bits - 1))
    q = torch.arange(lo, -lo, dtype=torch.int64)[None]
    y, s_y = reference_kernel(module, q.float(), s_x)
    table = y[0].numpy()
    table_t = y[0].to(device)

    def torch_fn(qf, integers):
        idx = qf.long() - lo
        if bool((idx < 0).any() | (idx >= table_t.numel()).any()):
            return None
        return (_int_table_t() if integers else table_t)[idx]

    def _int_table():
        return module.kernel(q, s_x)[0][0].numpy().astype(np.float64)

    def _int_table_t():
        return torch.from_numpy(_int_table()).to(device)

    return FastPlan(s_y.to(device), lookup_kernel, (table, lo), lambda: (_int_table(), lo), torch_fn)


@jit
def layernorm_kernel(q, out, var_shift, var_cap, numerator, k, b, scale):
    """I-BERT / I-ViT LayerNorm per row, in int64: ``y = q - round(mean)``, ``var = min(sum (y >> sh)**2,
    cap)``, ``std = isqrt(var) << sh``, ``f = numerator // max(std, 1)``, ``out = (y f) >> (1 + k) + b``,
    times the per-channel ``scale`` (a float64 product rounded to the output's type)."""
    channels = q.shape[1]
    for r in range(q.shape[0]):
        total = 0
        for c in range(channels):
            total += np.int64(q[r, c])
        mean = (2 * total + channels) // (2 * channels)
        var = 0
        for c in range(channels):
            ys = (np.int64(q[r, c]) - mean) >> var_shift
            var += ys * ys
        if var > var_cap:
            var = var_cap
        std = isqrt_i64(var) << var_shift
        if std < 1:
            std = 1
        f = numerator // std
        for c in range(channels):
            yn = ((np.int64(q[r, c]) - mean) * f) >> (1 + k)
            out[r, c] = np.float64(yn + b[c]) * scale[c]
    return True


def layernorm_plan(module: AffineLayerNorm, channels: int, device, var_shift: int, var_cap: int,
                   numerator: int) -> FastPlan:
    """I-BERT / I-ViT LayerNorm on the CPU as :func:`layernorm_kernel` (other devices: reference)."""
    s_n = ln_scale_n(channels, device)
    b_q, scale = ln_affine_constants(s_n, module.weight, module.bias, channels)
    b = b_q.cpu().numpy().astype(np.int64)
    head = (var_shift, var_cap, numerator, ln_headroom(channels), b)
    return FastPlan(scale.to(device), layernorm_kernel, head + (scale.cpu().numpy().astype(np.float64),),
                    lambda: head + (np.ones(channels),))
