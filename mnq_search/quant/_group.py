"""Instance-aware group quantization of activations and softmax attention (IGQ-ViT).

Moon, Kim, Cheon and Ham, "Instance-Aware Group Quantization for Vision Transformers", CVPR 2024.
The channels of an activation map are split into ``G`` groups *per input instance*, so that the
channels of a group have similar ranges, and each group has its own quantizer; the same scheme
quantizes softmax attention across key tokens, and the number of groups of a layer is a searched
choice with a bit-operation (BOP) cost. This file holds:

- :class:`GroupActQuant`: the group quantizer of token activations ``(B, ..., C)`` (signed);
- :class:`GroupSoftmaxQuant`: the same over the key dimension of attention probabilities
  ``(B, H, N_q, N_k)`` (unsigned grid);
- :func:`to_common_grid` (with :func:`common_grid_multipliers` and :func:`requantize_groups`):
  the integer-only dyadic requantization that puts the integers of all groups on one grid, so
  that a consumer can add their products;
- :func:`group_cost` and :func:`attention_group_cost`: the BOP and integer-op overhead of ``G``
  groups over per-tensor quantization, to add to a BOP budget.

Calibration (``train()`` mode). Every (instance, channel) has a range key
``a = max(|min|, |max|)``, the min/max over the instance's tokens (for probabilities, the value
itself). The quantizer keeps (1) the per-tensor running min/max of the project's
:class:`MinMaxObserver` (EMA), whose absmax is the widest group's range, and (2) a histogram of
the keys in log2 space (16 bins per octave over ``[2**-32, 2**32)``, the same EMA on the bin
weights). After every calibration batch the ``G`` group ranges are recomputed as the *covering*
ranges that minimize the expected rounding-noise power of the calibration channels,
``sum_keys r(key)**2`` with ``r(key)`` the smallest group range ``>= key`` (noise power of a channel
is ``step**2 / 12``, ``step = r / qmax``): an exact dynamic program over the occupied bins' upper
edges, ``O(G m**2)`` for ``m`` occupied bins, stored in the ``group_ranges`` buffer. Why: static group
ranges must be fixed before inference; an equal-count split of the channels (tried first) spends
the groups on the dense bulk and leaves one coarse group for the instance-varying outliers, which
then dominate the error (on the activations of ``test_group.py``, momentum None, the 4-bit SQNR
went from 7.4 dB at G = 1 to 8.2 dB at G = 16 with that split, and to 20.1 dB with this
objective). The widest range is the observer's, so ``G = 1`` is the calibrated per-tensor quantizer
exactly. The histogram, unlike the observer, is not all-reduced across data-parallel ranks.

Assignment at run time (static mode, the default). Each channel of each instance goes to the group
with the *smallest range that still covers its key* (equal ranges go to the lowest group index; a
channel wider than every group goes to the widest group and clips): the rule the ranges were
optimized for. Covering avoids clipping whenever possible and, among covering groups, the narrowest
gives the finest step. With the ranges sorted (they are kept ascending) this is a binary search,
``ceil(log2 G)`` compares per channel. The group scales are static, ``s_g = r_g / (2**(b-1) - 1)``
(unsigned ``r_g / (2**b - 1)``), so the per-group requantization multipliers are constants, as
integer-only inference needs.

Dynamic mode (``dynamic=True``): per instance the channels are ranked by key and cut into ``G``
contiguous rank chunks of near-equal size (chunk ``floor(rank * G / C)``), and each group's scale is
the absmax of its members in that instance. It is a float reference, not integer-only (its scales,
hence its multipliers, are computed at run time); for ``G = C`` it is per-channel dynamic
quantization.

Rounding is half-up (``floor(v + 1/2)``) and the gradient is the straight-through estimator of the
project's quantizer: ``1/s`` where the rounded value lies inside the clamp range, 0 outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# Attribute access at call time (not ``from ... import``), so that quant/__init__ may import this
# file at any position among its own imports.
from mnq_search import quant as _quant
from mnq_search.errors import UsageError

__all__ = ["GroupActQuant", "GroupCost", "GroupQuant", "GroupSoftmaxQuant", "attention_group_cost",
           "common_grid_multipliers", "cover_groups", "covering_ranges", "group_cost", "rank_chunks",
           "requantize_groups", "to_common_grid"]

BITS_MIN, BITS_MAX = 2, 16  # activation bit-widths accepted here
COMMON_BITS_MAX = 32  # widest common accumulation grid
Q_ABS_LIMIT = 2**22  # |q| * m stays below 2**53 for 31-bit mantissas: exact on the float-held path
RATIO_LIMIT = 2.0**31  # larger scale ratios would saturate the dyadic mantissa


def _check_int(value: object, what: str, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise UsageError(f"{what} must be an integer {span}, got {value!r}")
    return value


class GroupQuant(NamedTuple):
    """What a group quantizer returns.

    Attributes:
        q: the integers of the input (float32 tensor holding integers), shape of the input.
        scale: the scale of every (instance, channel), broadcastable to ``q`` (``q * scale`` is the
            dequantized input).
        group: the group index of every (instance, channel), int64, shaped like ``scale``.
        group_scales: the scale of each group: shape ``(G,)`` in static mode, per instance
            ``(..., G)`` (same number of dims as ``group``) in dynamic mode.
    """

    q: torch.Tensor
    scale: torch.Tensor
    group: torch.Tensor
    group_scales: torch.Tensor


class _RoundClamp(torch.autograd.Function):
    """clamp(floor(v + 1/2)) with the straight-through gradient (zero where the rounded value clips)."""

    @staticmethod
    def forward(ctx, v, qmin, qmax):
        r = torch.floor(v + 0.5)
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return torch.clamp(r, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


def _round_clamp(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    v = x / scale.detach()
    if torch.is_grad_enabled() and v.requires_grad:
        return _RoundClamp.apply(v, qmin, qmax)
    return torch.clamp(torch.floor(v + 0.5), qmin, qmax)


def rank_chunks(key: torch.Tensor, groups: int) -> torch.Tensor:
    """The rank chunk of every channel: ``floor(rank * G / C)`` with ranks by ascending ``key``.

    Args:
        key: ``(I, C)`` range keys of ``I`` instances.
        groups: ``G <= C``.

    Returns:
        ``(I, C)`` int64 chunk indices in ``0..G-1`` (ties ranked by channel index, so deterministic).
    """
    c = key.shape[-1]
    order = torch.argsort(key, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(c, device=key.device).expand_as(order))
    return torch.div(rank * groups, c, rounding_mode="floor")


def cover_groups(key: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """The group with the smallest range ``>= key`` for every channel (the widest if none covers).

    Args:
        key: range keys, any shape.
        ranges: ``(G,)`` group ranges.

    Returns:
        int64 group indices shaped like ``key``; equal ranges resolve to the lowest index.
    """
    sorted_r, order = torch.sort(ranges.to(key.dtype), stable=True)
    pos = torch.searchsorted(sorted_r, key.contiguous()).clamp_(max=ranges.numel() - 1)
    return order[pos]


HIST_BINS_PER_OCTAVE = 16
HIST_LOG2_MIN, HIST_LOG2_MAX = -32, 32
HIST_BINS = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE


def key_bins(key: torch.Tensor) -> torch.Tensor:
    """Histogram bin of range keys: ``floor((log2(key) + 32) * 16)`` clamped to ``0..HIST_BINS-1``."""
    v = (torch.log2(key.double()) - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE
    return torch.floor(torch.nan_to_num(v, nan=0.0).clamp(0, HIST_BINS - 1)).long()


def bin_upper_edges(device: torch.device | None = None) -> torch.Tensor:
    """float64 upper edge of every bin (every key in a bin lies below it)."""
    i = torch.arange(1, HIST_BINS + 1, dtype=torch.float64, device=device)
    return torch.exp2(i / HIST_BINS_PER_OCTAVE + HIST_LOG2_MIN)


def covering_ranges(weights: torch.Tensor, candidates: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``groups`` covering ranges that minimize ``sum_k w_k * r(k)**2`` (exact dynamic program).

    Candidate ``j`` stands for the keys with weight ``weights[j]`` lying in ``(candidates[j-1],
    candidates[j]]``; the last candidate is the widest range and is always chosen. A key's range
    ``r(k)`` is the smallest chosen candidate at or above it.

    Args:
        weights: ``(m,)`` non-negative weights.
        candidates: ``(m,)`` strictly ascending candidate ranges.
        groups: number of ranges ``G``.

    Returns:
        ``(G,)`` float64 ascending ranges; when fewer than ``G`` distinct ranges help, the widest is
        repeated at the end.
    """
    w = weights.to(torch.float64)
    c2 = candidates.to(torch.float64) ** 2
    m = c2.numel()
    cum = torch.cumsum(w, 0)
    cost = cum * c2  # one group whose range is candidate j covers all keys up to j
    below = torch.ones(m, m, dtype=torch.bool, device=w.device).tril()  # split i must lie below j
    choices = []
    for _ in range(1, min(groups, m)):
        trans = cost[:, None] + (cum[None, :] - cum[:, None]) * c2[None, :]
        best, arg = trans.masked_fill(below, math.inf).min(dim=0)
        take = best < cost
        choices.append(torch.where(take, arg, torch.full_like(arg, -1)))
        cost = torch.where(take, best, cost)
    j, chosen = m - 1, [m - 1]
    for ch in reversed(choices):
        i = int(ch[j])
        if i >= 0:
            chosen.append(i)
            j = i
    ranges = candidates.to(torch.float64)[sorted(chosen)]
    return torch.cat([ranges, ranges[-1:].expand(groups - ranges.numel())])


class _GroupQuantBase(nn.Module):
    """Shared calibration and quantization on ``(I, T, C)``: instances, tokens, channels."""

    signed = True

    def __init__(self, bits: int, groups: int, momentum: float | None = 0.95, dynamic: bool = False):
        super().__init__()
        self.bits = _check_int(bits, "bits", BITS_MIN, BITS_MAX)
        self.groups = _check_int(groups, "groups", 1)
        if momentum is not None and not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
                                         and 0 <= momentum < 1):
            raise UsageError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.dynamic = bool(dynamic)
        self.observer = _quant.MinMaxObserver(momentum)
        self.register_buffer("key_hist", torch.zeros(HIST_BINS, dtype=torch.float64))
        self.register_buffer("group_ranges", torch.zeros(self.groups))

    @property
    def qrange(self) -> tuple[int, int]:
        return _quant.qrange(self.bits, signed=self.signed)

    def reset(self) -> None:
        """Forget the calibration (before a new one)."""
        self.observer.reset()
        self.key_hist.zero_()
        self.group_ranges.zero_()

    def _scale_of(self, absmax: torch.Tensor) -> torch.Tensor:
        # signed: absmax / (2**(b-1) - 1); unsigned: max / (2**b - 1), the same form at b + 1 bits
        return _quant.symmetric_scale(absmax, self.bits if self.signed else self.bits + 1)

    @property
    def ranges(self) -> torch.Tensor:
        """``(G,)`` calibrated group ranges, ascending; the last is the per-tensor absmax."""
        return self.group_ranges

    @property
    def group_scales(self) -> torch.Tensor:
        """``(G,)`` static group scales from the calibrated ranges."""
        return self._scale_of(self.group_ranges)

    def _quantize3(self, x3: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, _, c = x3.shape
        if self.groups > c:
            raise UsageError(f"groups ({self.groups}) must not exceed the number of channels ({c})")
        xd = x3.detach()
        hi = xd.amax(dim=1)
        key = torch.maximum(xd.amin(dim=1).abs(), hi.abs()) if self.signed else hi.clamp(min=0)
        if self.training:
            self._observe(xd, key)
        if self.dynamic:
            group = rank_chunks(key, self.groups)
            gmax = torch.zeros(key.shape[0], self.groups, dtype=key.dtype, device=key.device)
            gmax.scatter_reduce_(-1, group, key, "amax")
            gscale = self._scale_of(gmax)  # (I, G)
            scale = torch.gather(gscale, -1, group)
        else:
            if not bool(self.observer.initialized):
                raise UsageError("group quantizer is not calibrated: run it in train() mode on calibration data first")
            ranges = self.group_ranges
            gscale = self._scale_of(ranges)  # (G,)
            group = cover_groups(key, ranges)
            scale = gscale[group]
        qmin, qmax = self.qrange
        q = _round_clamp(x3, scale.unsqueeze(1), qmin, qmax)
        return q, scale, group, gscale

    @torch.no_grad()
    def _observe(self, xd: torch.Tensor, key: torch.Tensor) -> None:
        self.observer.update(xd)
        counts = torch.bincount(key_bins(key).flatten(), minlength=HIST_BINS).to(self.key_hist)
        if self.momentum is None:
            self.key_hist.add_(counts)
        else:
            frac = counts / counts.sum()
            fresh = not bool(self.key_hist.any())
            self.key_hist.copy_(frac if fresh else self.momentum * self.key_hist + (1 - self.momentum) * frac)
        self.group_ranges.copy_(self._fit_ranges())

    def _fit_ranges(self) -> torch.Tensor:
        top = self.observer.absmax().to(torch.float64)
        edges = bin_upper_edges(self.key_hist.device)
        inner = (self.key_hist > 0) & (edges < top)
        candidates = torch.cat([edges[inner], top.reshape(1)])
        weights = torch.cat([self.key_hist[inner], self.key_hist[~inner].sum().reshape(1)])
        return covering_ranges(weights, candidates, self.groups).to(self.group_ranges.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, dynamic={self.dynamic}"


class GroupActQuant(_GroupQuantBase):
    """Instance-aware group quantizer of activations, channels last (IGQ-ViT, Sec. 3.2).

    An instance is one sample: for ``(B, N, C)`` token activations the per-channel min/max of an
    instance run over its ``N`` tokens; any middle dims count as tokens, ``(B, C)`` has one token.
    The grid of group ``g`` is signed symmetric, ``s_g = r_g / (2**(b-1) - 1)``, integers in
    ``[-2**(b-1), 2**(b-1) - 1]``. See the module docstring for the calibration and assignment.

    Args:
        bits: activation bit-width (2..16).
        groups: number of groups ``G`` (at most the number of channels).
        momentum: EMA momentum of the group ranges as in :class:`MinMaxObserver` (None keeps the
            running extremes).
        dynamic: per-instance group scales (float reference) instead of the calibrated ones.

    forward(x) -> :class:`GroupQuant` ``(q, scale, group, group_scales)``, ``scale`` and ``group``
    shaped ``(B, 1, ..., 1, C)``. The same input always gives the same result and an instance's result
    does not depend on the rest of the batch (in ``eval()``; ``train()`` also updates the ranges).
    """

    def forward(self, x: torch.Tensor) -> GroupQuant:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0 or x.shape[-1] == 0:
            raise UsageError(f"GroupActQuant expects a (batch, ..., channels) tensor, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        x = x.float()
        b, c = x.shape[0], x.shape[-1]
        q, scale, group, gscale = self._quantize3(x.reshape(b, -1, c))
        side = (b,) + (1,) * (x.dim() - 2)
        if self.dynamic:
            gscale = gscale.view(*side, self.groups)
        return GroupQuant(q.view(x.shape), scale.view(*side, c), group.view(*side, c), gscale)


class GroupSoftmaxQuant(_GroupQuantBase):
    """Group quantizer of softmax attention probabilities across key tokens (IGQ-ViT, Sec. 3.2).

    Input ``(B, H, N_q, N_k)`` probabilities (a softmax method's *output*, values in ``[0, 1]``).
    The channels are the ``N_k`` key tokens and an instance is one attention row ``(b, h, i)``, so
    the range key of a (row, key) is the probability itself: a row's keys are split into ``G``
    groups by value, large probabilities on a coarse grid and small ones on fine grids. Each group
    has an unsigned ``b``-bit grid ``s_g = max_g / (2**b - 1)``, integers in ``[0, 2**b - 1]``
    (negative inputs clip to 0), with ``max_g`` calibrated as for :class:`GroupActQuant` (the keys
    are the probabilities). ``G = 1`` is per-tensor unsigned quantization with the calibrated maximum.

    Args:
        bits: bit-width of the unsigned grid (2..16).
        groups: number of groups ``G`` (at most ``N_k``).
        momentum: EMA momentum of the group ranges (None keeps the running extremes).
        dynamic: per-row group scales (float reference) instead of the calibrated ones.

    forward(p) -> :class:`GroupQuant`; ``scale`` and ``group`` are per element (shape of ``p``),
    dynamic ``group_scales`` are ``(B, H, N_q, G)``. The consumer ``P @ V`` reduces over the key
    dim, so :func:`to_common_grid` (``signed=False``) brings a row onto one grid first.
    """

    signed = False

    def forward(self, p: torch.Tensor) -> GroupQuant:
        if not isinstance(p, torch.Tensor) or p.dim() != 4 or p.numel() == 0:
            raise UsageError(f"GroupSoftmaxQuant expects (batch, heads, queries, keys) probabilities, got shape "
                             f"{tuple(getattr(p, 'shape', ()))}")
        p = p.float()
        b, h, nq, nk = p.shape
        q, scale, group, gscale = self._quantize3(p.reshape(b * h * nq, 1, nk))
        if self.dynamic:
            gscale = gscale.view(b, h, nq, self.groups)
        return GroupQuant(q.view(p.shape), scale.view(p.shape), group.view(p.shape), gscale)


# --- the common accumulation grid ------------------------------------------------------------------

def common_grid_multipliers(group_scales: torch.Tensor, out_scale_or_bits: int | float | torch.Tensor, *,
                            in_bits: int | None = None, signed: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The dyadic multipliers ``m_g * 2**-e_g ~ s_g / s_out`` from every group grid to one grid.

    Computed once per layer (static group scales), so the float work here is off the integer path.

    Args:
        group_scales: ``(G,)`` or per-instance ``(..., G)`` positive group scales.
        out_scale_or_bits: the common grid: its scale (number or 0-dim tensor; the integers are then
            clamped to int32, the accumulator's register), or its signed bit-width ``B`` (2..32):
            then ``s_out = max_g s_g * M / (2**(B-1) - 1)`` with ``M`` the largest input magnitude
            (``2**(in_bits-1)`` signed, ``2**in_bits - 1`` unsigned), so no group integer clips.
        in_bits: bit-width of the group grids; needed when the common grid is given by bits.
        signed: whether the group grids are signed (activations) or unsigned (probabilities).

    Returns:
        ``(m, e, out_scale, (qmin, qmax))``: int64 ``m`` and ``e`` shaped like ``group_scales``,
        float64 0-dim ``out_scale`` and the clamp range of the common grid.
    """
    s = torch.as_tensor(group_scales).detach().to(torch.float64)
    if s.dim() == 0 or s.numel() == 0 or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise UsageError("group_scales must be a non-empty (..., G) tensor of positive finite scales")
    if isinstance(out_scale_or_bits, int) and not isinstance(out_scale_or_bits, bool):
        out_bits = _check_int(out_scale_or_bits, "common grid bits", 2, COMMON_BITS_MAX)
        if in_bits is None:
            raise UsageError("in_bits is required when the common grid is given by its bit-width")
        in_bits = _check_int(in_bits, "in_bits", BITS_MIN, BITS_MAX)
        in_mag = 2 ** (in_bits - 1) if signed else 2**in_bits - 1
        out_scale = s.max() * in_mag / (2 ** (out_bits - 1) - 1)
        qmin, qmax = _quant.qrange(out_bits)
    else:
        if isinstance(out_scale_or_bits, bool):
            raise UsageError(f"common grid must be a scale or a bit-width, got {out_scale_or_bits!r}")
        out_scale = torch.as_tensor(out_scale_or_bits).detach().to(torch.float64)
        if out_scale.numel() != 1 or not bool(torch.isfinite(out_scale).all()) or not bool((out_scale > 0).all()):
            raise UsageError("the common grid scale must be one positive finite number")
        out_scale = out_scale.reshape(())
        qmin, qmax = _quant.qrange(32)
    ratio = s / out_scale
    if bool((ratio >= RATIO_LIMIT).any()):
        raise UsageError("the common grid is too fine: a group scale is 2**31 times its scale or more")
    m, e = _quant.dyadic(ratio)
    return m, e, out_scale, (qmin, qmax)


def requantize_groups(q: torch.Tensor, group_idx: torch.Tensor, m: torch.Tensor, e: torch.Tensor,
                      qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round_half_up(q * m_g / 2**e_g))`` with ``g`` each element's group: integer ops only.

    Args:
        q: group integers, int64 (integer path) or float64 holding integers (float-held path).
        group_idx: int64 group per element, broadcastable to ``q`` (e.g. ``(B, 1, C)``).
        m: int64 mantissas ``(G,)``, or ``(..., G)`` with as many dims as ``group_idx``.
        e: int64 shifts shaped like ``m``.
        qmin: lower clamp of the common grid.
        qmax: upper clamp of the common grid.

    Returns:
        The integers on the common grid, same kind (dtype) as ``q``; both paths agree bit for bit.
    """
    if m.dim() == 1:
        mm, ee = m[group_idx], e[group_idx]
    else:
        full = tuple(group_idx.shape[:-1]) + (m.shape[-1],)
        mm = torch.gather(m.expand(full), -1, group_idx)
        ee = torch.gather(e.expand(full), -1, group_idx)
    return _quant.requantize(q, mm, ee, qmin, qmax)


def to_common_grid(q: torch.Tensor, group_idx: torch.Tensor, group_scales: torch.Tensor,
                   out_scale_or_bits: int | float | torch.Tensor, *, in_bits: int | None = None,
                   signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize the integers of every group onto one shared grid, integer-only (HAWQ-V3 dyadic).

    ``q_out = clamp(round_half_up(q * m_g / 2**e_g))`` with ``m_g * 2**-e_g ~ s_g / s_out``, so
    ``q_out * s_out ~ q * s_g`` and the consumer can add products of channels of different groups.
    An int64 ``q`` runs on the integer path (int64 multiply, add and shift); a float ``q`` runs on
    the float-held path in float64, which gives the same integers (``|q| < 2**22`` keeps every
    product below 2**53).

    Args:
        q: the group integers (e.g. :attr:`GroupQuant.q`), int64 or float holding integers.
        group_idx: int64 group of every element, broadcastable to ``q`` (:attr:`GroupQuant.group`).
        group_scales: ``(G,)`` or per-instance ``(..., G)`` group scales.
        out_scale_or_bits: the common grid's scale, or its bit-width (see
            :func:`common_grid_multipliers`).
        in_bits: bit-width of the group grids (required with a bit-width).
        signed: False for unsigned group grids (softmax probabilities).

    Returns:
        ``(q_out, out_scale)``: int64 (integer path) or float64 (float-held path) integers and the
        float64 0-dim scale of the common grid.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(group_idx, torch.Tensor):
        raise UsageError("q and group_idx must be tensors")
    if q.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) and not q.is_floating_point():
        raise UsageError(f"q must hold integers as an integer or float tensor, got {q.dtype}")
    if group_idx.dtype != torch.int64:
        raise UsageError(f"group_idx must be int64, got {group_idx.dtype}")
    q = q.to(torch.int64) if not q.is_floating_point() else q.detach().to(torch.float64)
    if q.numel() and q.is_floating_point() and not bool(torch.equal(q, torch.floor(q))):
        raise UsageError("q must hold integers (the float-held path takes integer values only)")
    if q.numel() and int(q.abs().max()) >= Q_ABS_LIMIT:
        raise UsageError("q must stay below 2**22 in magnitude for an exact requantization")
    m, e, out_scale, (qmin, qmax) = common_grid_multipliers(group_scales, out_scale_or_bits, in_bits=in_bits,
                                                           signed=signed)
    g = m.shape[-1]
    if group_idx.numel() and (int(group_idx.min()) < 0 or int(group_idx.max()) >= g):
        raise UsageError(f"group_idx must lie in 0..{g - 1}")
    if m.dim() > 1 and m.dim() != group_idx.dim():
        raise UsageError("per-instance group_scales need as many dims as group_idx")
    try:
        torch.broadcast_shapes(group_idx.shape, q.shape)
    except RuntimeError as err:
        raise UsageError(f"group_idx {tuple(group_idx.shape)} does not broadcast to q {tuple(q.shape)}") from err
    return requantize_groups(q, group_idx, m, e, qmin, qmax), out_scale


# --- cost accounting --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupCost:
    """The overhead of ``G`` groups over per-tensor static quantization at the same bit-widths.

    Attributes:
        stat_ops: per-channel min/max compares over the tokens and the range-key ops.
        assign_ops: compares of the group assignment (binary search over sorted thresholds).
        requant_mults: extra dyadic multiplies.
        requant_ops: the rounding adds and shifts of those multiplies, and merging adds.
        bops: bit operations of all of the above, plus ``gemm_extra_bops``.
        gemm_extra_bops: extra GEMM BOPs from wider operands (common-grid strategy only).
        int_ops: integer operations: ``stat_ops + assign_ops + requant_mults + requant_ops``.
        gemm_bops: the layer's GEMM at ``(act_bits, weight_bits)``, for scale.
    """

    stat_ops: int
    assign_ops: int
    requant_mults: int
    requant_ops: int
    bops: int
    gemm_extra_bops: int
    int_ops: int
    gemm_bops: int


STRATEGIES = ("partial_sums", "common_grid")


def group_cost(groups: int, channels: int, out_features: int, *, tokens: int = 1, instances: int = 1,
               act_bits: int = 8, weight_bits: int = 8, stat_bits: int = 32, acc_bits: int = 32,
               mult_bits: int = 32, signed: bool = True, strategy: str = "partial_sums",
               common_bits: int | None = None) -> GroupCost:
    """BOP and integer-op overhead of ``G`` instance-aware groups for one linear consumer.

    The layer multiplies ``(instances, tokens, channels)`` integer activations by a
    ``(channels, out_features)`` weight. The count is the work *beyond* per-tensor static
    quantization (``G = 1`` costs nothing: that quantizer needs no statistics and one output
    rescale, which the layer pays anyway). With ``I`` instances, ``T`` tokens, ``C`` channels,
    ``D`` outputs and ``L = ceil(log2 G)``:

    - statistics, at ``stat_bits`` (the width of the integers being quantized): a min and a max over
      the tokens, ``2 (T - 1) C`` compares per instance, plus ``2 C`` for the key
      ``max(-min, max)`` (negate, compare); unsigned inputs need only the max, ``(T - 1) C``, and the
      key is the max itself;
    - assignment: ``L C`` compares per instance (binary search of the key among the G - 1
      sorted thresholds, stored on the input grid), at ``stat_bits``;
    - ``strategy="partial_sums"`` (the GEMM accumulates each group's channels separately): every
      output then has ``G`` int32 partial sums instead of one, so ``(G - 1) I T D`` extra dyadic
      rescales, each a ``acc_bits x mult_bits`` multiply, a rounding add and a shift at
      ``acc_bits + mult_bits`` bits, plus ``(G - 1) I T D`` merging adds at ``acc_bits``; the GEMM's
      MACs are unchanged (every channel is in one group);
    - ``strategy="common_grid"`` (:func:`to_common_grid` before the GEMM): ``I T C`` dyadic rescales
      of the inputs (``act_bits x mult_bits`` multiply, rounding add and shift at
      ``act_bits + mult_bits`` bits) and a GEMM on ``common_bits``-bit activations, i.e.
      ``I T C D weight_bits (common_bits - act_bits)`` extra BOPs.

    BOP convention: a ``p x q``-bit multiply counts ``p q`` (as a GEMM MAC counts
    ``weight_bits * act_bits``), a ``w``-bit add, compare, negate or shift counts ``w``. Memory
    traffic (gathers of per-group multipliers, the per-instance channel permutation) is not counted.

    Args:
        groups: ``G`` (1 gives all zeros).
        channels: ``C``, the reduction dim of the consumer.
        out_features: ``D``.
        tokens: ``T``, tokens of an instance (the min/max run over them; 1 for softmax rows).
        instances: ``I`` (batch size, or ``B H N_q`` rows for attention).
        act_bits: bit-width of the group grids.
        weight_bits: bit-width of the weights.
        stat_bits: width of the integers whose min/max and thresholds are compared.
        acc_bits: accumulator width.
        mult_bits: dyadic mantissa width (31 bits plus sign: 32).
        signed: False for unsigned inputs (probabilities).
        strategy: ``"partial_sums"`` or ``"common_grid"``.
        common_bits: bit-width of the common grid (``"common_grid"`` only).

    Returns:
        A :class:`GroupCost` for all ``I`` instances.
    """
    g = _check_int(groups, "groups", 1)
    c = _check_int(channels, "channels", 1)
    d = _check_int(out_features, "out_features", 1)
    t = _check_int(tokens, "tokens", 1)
    n = _check_int(instances, "instances", 1)
    for name, v in (("act_bits", act_bits), ("weight_bits", weight_bits)):
        _check_int(v, name, BITS_MIN, BITS_MAX)
    for name, v in (("stat_bits", stat_bits), ("acc_bits", acc_bits), ("mult_bits", mult_bits)):
        _check_int(v, name, 2, 64)
    if g > c:
        raise UsageError(f"groups ({g}) must not exceed channels ({c})")
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose from: {', '.join(STRATEGIES)}")
    if strategy == "common_grid":
        if common_bits is None:
            raise UsageError("common_bits is required with strategy='common_grid'")
        _check_int(common_bits, "common_bits", act_bits, COMMON_BITS_MAX)
    gemm_bops = n * t * c * d * act_bits * weight_bits
    if g == 1:
        return GroupCost(0, 0, 0, 0, 0, 0, 0, gemm_bops)
    stat = n * ((2 * (t - 1) * c + 2 * c) if signed else (t - 1) * c)
    assign = n * c * math.ceil(math.log2(g))
    bops = (stat + assign) * stat_bits
    extra = 0
    if strategy == "partial_sums":
        mults = (g - 1) * n * t * d
        ops = 3 * mults  # rounding add, shift, merging add
        bops += mults * (acc_bits * mult_bits + 2 * (acc_bits + mult_bits) + acc_bits)
    else:
        mults = n * t * c
        ops = 2 * mults  # rounding add, shift
        bops += mults * (act_bits * mult_bits + 2 * (act_bits + mult_bits))
        extra = n * t * c * d * weight_bits * (common_bits - act_bits)
        bops += extra
    return GroupCost(stat, assign, mults, ops, bops, extra, stat + assign + mults + ops, gemm_bops)


def attention_group_cost(groups: int, heads: int, q_tokens: int, k_tokens: int, head_dim: int, *,
                         batch: int = 1, act_bits: int = 8, weight_bits: int = 8, stat_bits: int = 32,
                         **kwargs) -> GroupCost:
    """:func:`group_cost` of :class:`GroupSoftmaxQuant` feeding ``P @ V``.

    Every attention row is an instance (``I = batch * heads * q_tokens``, ``T = 1``), its ``N_k``
    keys are the channels and ``head_dim`` the outputs; the inputs are unsigned, so the range key
    is the probability itself and no min/max pass is needed: the overhead is ``ceil(log2 G)``
    compares per probability plus the rescaling of the chosen strategy. ``weight_bits`` is the
    bit-width of ``V``; ``stat_bits`` that of the softmax method's integer output. Other keywords go
    to :func:`group_cost`.
    """
    for name, v in (("heads", heads), ("q_tokens", q_tokens), ("batch", batch)):
        _check_int(v, name, 1)
    return group_cost(groups, k_tokens, head_dim, tokens=1, instances=batch * heads * q_tokens,
                      act_bits=act_bits, weight_bits=weight_bits, stat_bits=stat_bits, signed=False, **kwargs)
