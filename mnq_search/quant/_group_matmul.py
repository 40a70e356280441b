"""Products of group-quantized inputs (IGQ-ViT) as per-group partial sums (issue 15).

When the channels of an input sit on ``G`` grids, a consumer that reduces over the channels cannot
add their integer products directly. It accumulates each group's channels separately (``G``
exact integer partial sums per output, the ``partial_sums`` strategy of
:func:`~mnq_search.quant._group.group_cost`) and merges them with one rescale per group::

    acc_g = sum_{c in group g} q[c] * w_int[o, c]           (exact integers)
    y[o]  = (sum_g acc_g * s_g) * s_w[o] + b[o]

Integer-only inference merges the partial sums with dyadic per-group multipliers
``s_g s_w / s_out`` (:func:`~mnq_search.quant._group.common_grid_multipliers`). Here the
float-held path holds the partial sums as exact integers in float32 (every partial sum of 8-bit
operands over ``K <= 1024`` channels is below 2**24) and the integer path computes them in int64:
the same integers, merged by :func:`merge_partial_sums` into the same bits (``tests/test_groups.py``).

The simulation runs all ``G`` partial sums as one product of ``G`` masked copies of the input
(``G`` times the multiply-adds of the layer; hardware permutes the channels instead and does the
layer's work once, which is what the cost model counts). That is why the models' forward uses the
fake-quant form instead (the input dequantized per (instance, channel), one product), which equals
the merged partial sums up to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..integer import HAVE_INT_MM, check_range, fast_enabled


def group_masks(group: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``(G, *group.shape)`` one-hot masks of the group index tensor."""
    g = torch.arange(groups, device=group.device).view((groups,) + (1,) * group.dim())
    return (group.unsqueeze(0) == g).to(dtype)


def linear_partial_sums(q: torch.Tensor, group: torch.Tensor, groups: int, w_int: torch.Tensor,
                        int8: bool = False) -> torch.Tensor:
    """``(G, ..., D)`` partial sums of ``q @ w_int^T`` per input group (integer-valued float32).

    ``q`` (B, ..., C) integers held in float, ``group`` broadcastable to it, ``w_int`` (D, C);
    ``int8``: both operands fit int8, so without gradients on the CPU the product may run as an
    int8 GEMM with exact int32 accumulators (the same integers)."""
    masked = q.unsqueeze(0) * group_masks(group, groups, q.dtype)
    if (int8 and HAVE_INT_MM and fast_enabled() and q.device.type == "cpu" and not torch.is_grad_enabled()
            and q.dtype == torch.float32):
        k = q.shape[-1]
        w8t = w_int.detach().to(torch.int8).t().contiguous()
        acc = torch._int_mm(masked.reshape(-1, k).to(torch.int8), w8t)
        return acc.float().view(*masked.shape[:-1], w_int.shape[0])
    return F.linear(masked, w_int)


def linear_partial_sums_int(q: torch.Tensor, group: torch.Tensor, groups: int, w_int: torch.Tensor) -> torch.Tensor:
    """The integer path of :func:`linear_partial_sums`: int64 in, int64 partial sums out (range-checked
    to int32)."""
    from ._linear import int_matmul

    masked = q.long().unsqueeze(0) * group_masks(group, groups, torch.int64)
    acc = int_matmul(masked, w_int.long().t())
    return check_range(acc, "group partial sum")


def matmul_partial_sums(q: torch.Tensor, group: torch.Tensor, groups: int, b: torch.Tensor) -> torch.Tensor:
    """``(G, ..., N, D)`` partial sums of ``q @ b`` over the groups of ``q``'s last (reduced) dim: the
    attention product ``P @ V`` with ``P`` group-quantized per (row, key)."""
    return (q.unsqueeze(0) * group_masks(group, groups, q.dtype)) @ b


def matmul_partial_sums_int(q: torch.Tensor, group: torch.Tensor, groups: int, b: torch.Tensor) -> torch.Tensor:
    """The integer path of :func:`matmul_partial_sums` (int64, range-checked to int32)."""
    from ._linear import int_matmul

    masked = q.long().unsqueeze(0) * group_masks(group, groups, torch.int64)
    return check_range(int_matmul(masked, b.long()), "group partial sum")


def merge_partial_sums(acc: torch.Tensor, group_scales: torch.Tensor, out_scale: torch.Tensor | float) -> torch.Tensor:
    """``(sum_g acc_g s_g) * out_scale``: the partial sums of :func:`linear_partial_sums` (or their
    int64 twins) merged in float32, in one fixed order so that both paths give the same bits.

    ``group_scales`` is ``(G,)`` (static groups)."""
    acc = acc.float()
    s = group_scales.float().view((-1,) + (1,) * (acc.dim() - 1))
    return (acc * s).sum(0) * out_scale
