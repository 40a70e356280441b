"""The variation-aware weight regulariser of VVTQ (Huang, Shen, Dong, Cheng, "Quantization Variation:
A New Perspective on Training Transformers with Low-Bit Precision", 2023): "a variation-aware
regularization term to suppress the oscillation of weights".

The formula chosen here. For a module m with latent weights ``w``, step ``s`` (broadcastable) and
integer range ``[qmin, qmax]``, in units of the step::

    u   = clamp(w / s, qmin, qmax)
    d   = u - floor(u + 1/2)                      # signed distance to the nearest grid point, [-1/2, 1/2)
    R_m = mean(d ** 2)                            # (or the sum: ``reduction="sum"``)
          [+ sum over bins b with n_b > 1 of Var(u | floor(u + 1/2) = b)   if bin_variance]
    R   = strength * sum_m v_m * R_m

with ``v_m`` the module's measured variation: its oscillation rate from
:class:`mnq_search.vvtq.OscillationTracker` (fraction of weights that flipped in the last epoch) or
the standard deviation of its weights' per-step changes from :class:`WeightChangeStats`. Modules that
do not oscillate (``v_m = 0``) are not regularised: the term acts where the variation is.

How it relates to the paper and its code. The term pulls latent weights to the centres of their
quantization bins, which removes the incentive to hop between two neighbouring integers (the
oscillation). ``s**2 * mean(d**2)`` is the "oscillation dampening" loss of Nagel et al. (ICML 2022),
``mean((s * q - clamp(w))**2)`` with the grid point held fixed, which the official VVTQ code uses,
adding (as in Han et al.'s bin regularization, 2021) the within-bin variance of the weights over all
bins (``bin_variance=True`` here). The differences are this project's reading: the distance is
measured in steps (so modules with different steps are comparable and the term does not shrink as
``s`` shrinks), and each module is weighted by its measured variation. Weights beyond the clamp range
have ``d = 0`` (their clipping error is LSQ's business, as in the official code). The gradient flows
to ``w`` (``dR_m/dw = 2 d / (N s)``, pointing away from the nearest grid point, so descent moves the
weight toward it) and to ``s`` when it requires grad; pass ``s.detach()`` to regularise weights only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import UsageError
from ._lsq import lsq_qrange

REDUCTIONS = ("mean", "sum")


def _grid(w: torch.Tensor, step: torch.Tensor | float, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = lsq_qrange(bits, signed)
    step = step.to(w) if isinstance(step, torch.Tensor) else torch.tensor(float(step), dtype=w.dtype, device=w.device)
    if bool((step.detach() <= 0).any()):
        raise UsageError("the regulariser's step sizes must be positive")
    u = torch.clamp(w / step, qmin, qmax)
    return u, torch.floor(u.detach() + 0.5)


def bin_distance(w: torch.Tensor, step: torch.Tensor | float, bits: int, signed: bool = True) -> torch.Tensor:
    """``d = u - floor(u + 1/2)`` with ``u = clamp(w / step)``: the signed distance of each weight to
    its grid point, in steps, in ``[-1/2, 1/2)`` (differentiable; the grid point is constant)."""
    u, centre = _grid(w, step, bits, signed)
    return u - centre


def bin_regularizer(w: torch.Tensor, step: torch.Tensor | float, bits: int, signed: bool = True,
                    reduction: str = "mean", bin_variance: bool = False) -> torch.Tensor:
    """One module's term ``R_m``: the mean (or sum) of ``d ** 2``, plus the within-bin variances.

    Args:
        w: the latent weights.
        step: their step, a scalar or broadcastable to ``w`` (e.g. ``(out, 1)`` per channel).
        bits: bit width; ``signed`` selects the integer range.
        reduction: ``"mean"`` or ``"sum"`` of ``d ** 2`` over the weights.
        bin_variance: also add, for every bin with at least two weights, the unbiased variance of
            ``u`` over the weights in the bin (Han et al.'s bin regularization, the official code).
    """
    if reduction not in REDUCTIONS:
        raise UsageError(f"unknown reduction {reduction!r}; choose from: {', '.join(REDUCTIONS)}")
    if w.numel() == 0:
        raise UsageError("the regulariser got an empty weight tensor")
    u, centre = _grid(w, step, bits, signed)
    d2 = (u - centre) ** 2
    r = d2.mean() if reduction == "mean" else d2.sum()
    if bin_variance:
        r = r + _bin_variance(u.reshape(-1), centre.reshape(-1), lsq_qrange(bits, signed)[0])
    return r


def _bin_variance(u: torch.Tensor, centre: torch.Tensor, qmin: int) -> torch.Tensor:
    idx = (centre - qmin).long()
    nbins = int(idx.max()) + 1
    n = torch.zeros(nbins, dtype=u.dtype, device=u.device).index_add_(0, idx, torch.ones_like(u))
    total = torch.zeros(nbins, dtype=u.dtype, device=u.device).index_add(0, idx, u)
    mean = total / n.clamp(min=1)
    sq = torch.zeros(nbins, dtype=u.dtype, device=u.device).index_add(0, idx, (u - mean[idx]) ** 2)
    var = sq / (n - 1).clamp(min=1)
    return torch.where(n > 1, var, torch.zeros_like(var)).sum()


def variation_aware_regularizer(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor | float, int]],
                                variation: Mapping[str, float], strength: float = 1.0,
                                reduction: str = "mean", signed: bool = True,
                                bin_variance: bool = False) -> torch.Tensor:
    """``R = strength * sum_m v_m * R_m`` over the named modules.

    Args:
        modules: name -> (latent weights, step, bits).
        variation: name -> ``v_m >= 0`` (e.g. ``{n: r["rate"] for n, r in tracker.end_epoch().items()}``
            or :meth:`WeightChangeStats.variation`); every module needs one.
        strength: the overall factor (see :func:`regularizer_strength` for the official schedule).
    """
    if not modules:
        raise UsageError("the variation-aware regulariser got no modules")
    if strength < 0:
        raise UsageError(f"regulariser strength must be non-negative, got {strength}")
    total = None
    for name, (w, step, bits) in modules.items():
        if name not in variation:
            raise UsageError(f"no variation measured for module {name!r}")
        v = float(variation[name])
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"module {name!r}: variation must be finite and non-negative, got {v}")
        term = v * bin_regularizer(w, step, bits, signed, reduction, bin_variance)
        total = term if total is None else total + term
    return strength * total


def regularizer_strength(epoch: float, epochs: int, max_strength: float = 0.01, start_frac: float = 0.25) -> float:
    """The strength schedule of the official VVTQ training script: 0 for the first ``start_frac`` of
    the epochs, then a half-cosine ramp up to ``max_strength`` at the last epoch."""
    if epochs <= 0:
        raise UsageError(f"epochs must be positive, got {epochs}")
    if not 0.0 <= start_frac < 1.0:
        raise UsageError(f"start_frac must be in [0, 1), got {start_frac}")
    start = start_frac * epochs
    if epoch < start:
        return 0.0
    t = min(1.0, (epoch - start) / (epochs - start))
    return max_strength * 0.5 * (1.0 - math.cos(math.pi * t))


class WeightChangeStats:
    """The standard deviation of the per-step changes of each module's latent weights, in steps.

    Call :meth:`update` after every optimizer step; the change ``(w_t - w_{t-1}) / s`` of every
    weight is one sample (a running sum, so memory is one copy of the weights per module).
    """

    def __init__(self):
        self._prev: dict[str, torch.Tensor] = {}
        self._acc: dict[str, list[float]] = {}  # n, sum, sum of squares (float64)

    @torch.no_grad()
    def update(self, name: str, w: torch.Tensor, step: torch.Tensor | float = 1.0) -> None:
        """Record the latent weights ``w`` of module ``name`` (``step``: the unit of the changes)."""
        u = (w.detach() / torch.as_tensor(step, dtype=w.dtype, device=w.device)).double()
        prev = self._prev.get(name)
        if prev is not None:
            if prev.shape != u.shape:
                raise UsageError(f"module {name!r}: weights of shape {tuple(u.shape)}, expected {tuple(prev.shape)}")
            delta = u - prev
            acc = self._acc.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += delta.numel()
            acc[1] += float(delta.sum())
            acc[2] += float((delta * delta).sum())
        self._prev[name] = u.clone()

    def std(self, name: str) -> float:
        """Population standard deviation of the recorded changes (0.0 before two updates)."""
        if name not in self._prev:
            raise UsageError(f"no weight changes recorded for module {name!r}")
        n, s, s2 = self._acc.get(name, (0.0, 0.0, 0.0))
        if n == 0:
            return 0.0
        mean = s / n
        return math.sqrt(max(0.0, s2 / n - mean * mean))

    def variation(self) -> dict[str, float]:
        """name -> :meth:`std`, for :func:`variation_aware_regularizer`."""
        return {name: self.std(name) for name in self._prev}

    def reset(self) -> None:
        """Forget the accumulated changes (keeps the last weights, e.g. at an epoch boundary)."""
        self._acc.clear()
