"""Per-weight oscillation tracking of integer weights during QAT, with optional freezing.

Oscillation as in Nagel, Fournarakis, Bondarenko, Blankevoort, "Overcoming Oscillations in
Quantization-Aware Training" (ICML 2022), used by VVTQ (Huang, Shen, Dong, Cheng, "Quantization
Variation: A New Perspective on Training Transformers with Low-Bit Precision", 2023) to show that
ViT weights oscillate during QAT. For one weight with integers ``q_t`` at optimizer steps t::

    delta_t = q_t - q_{t-1}
    o_t     = 1 if delta_t != 0 and sign(delta_t) == -sign(delta_tau) else 0
              (tau: the last step before t with a non-zero change; a flip = up then down or down
              then up, however many steps of no change lie between)
    f_t     = m * o_t + (1 - m) * f_{t-1}          # EMA oscillation frequency, f_0 = 0

Raw counts are kept too (per weight: all flips since the start, and flips in the current epoch).
The per-epoch report of a layer holds ``rate`` (the fraction of its weights that flipped at least
once in the epoch) and ``mean_frequency`` (flips per weight per observed transition in the epoch).

Freezing (Nagel et al., iterative weight freezing): once a weight's EMA frequency exceeds
``freeze_threshold`` (strictly), it is frozen for good at the integer it has at that step; frozen
weights are reported by :meth:`OscillationTracker.frozen_mask` and pinned by
:meth:`OscillationTracker.apply_freeze` / :meth:`OscillationTracker.freeze_latent_`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError


@dataclass
class _LayerState:
    prev: torch.Tensor  # the integers at the previous update
    last_dir: torch.Tensor  # sign of the last non-zero change (0 before any change), int8
    ema: torch.Tensor  # EMA oscillation frequency, float32
    total: torch.Tensor  # flips since the start, int64
    epoch: torch.Tensor  # flips in the current epoch, int64
    frozen: torch.Tensor  # bool
    frozen_value: torch.Tensor  # the integer a frozen weight is pinned to
    epoch_steps: int = 0  # transitions observed in the current epoch
    steps: int = 0  # transitions observed since the start
    history: list[dict] = field(default_factory=list)


class OscillationTracker:
    """Counts integer-weight oscillations per weight, for any number of named layers.

    Call :meth:`update` with each layer's integer weights after every optimizer step (the first
    call of a layer only records its integers), :meth:`end_epoch` at the end of an epoch for the
    per-layer report.

    Args:
        momentum: the EMA momentum ``m`` of the oscillation frequency (Nagel et al. use 0.01).
        freeze_threshold: freeze weights whose EMA frequency exceeds this (None: no freezing).
    """

    def __init__(self, momentum: float = 0.01, freeze_threshold: float | None = None):
        if not 0.0 < momentum <= 1.0:
            raise UsageError(f"oscillation EMA momentum must be in (0, 1], got {momentum}")
        if freeze_threshold is not None and not 0.0 <= freeze_threshold < 1.0:
            raise UsageError(f"freeze threshold must be in [0, 1), got {freeze_threshold}")
        self.momentum, self.freeze_threshold = float(momentum), freeze_threshold
        self._layers: dict[str, _LayerState] = {}

    @property
    def names(self) -> list[str]:
        return list(self._layers)

    def _layer(self, name: str) -> _LayerState:
        if name not in self._layers:
            raise UsageError(f"no oscillation record for layer {name!r}; known: {', '.join(self._layers) or 'none'}")
        return self._layers[name]

    @torch.no_grad()
    def update(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """Record the integers ``q`` of layer ``name`` at this step.

        Args:
            name: the layer's name.
            q: its integer weights (any integer or integer-valued float dtype, fixed shape).

        Returns:
            The bool mask of the weights that flipped at this step (all False on the first call).
        """
        q = q.detach()
        if q.is_floating_point():
            q = torch.round(q)
        q = q.to(torch.int64)
        st = self._layers.get(name)
        if st is None:
            zeros = torch.zeros_like(q)
            self._layers[name] = _LayerState(
                prev=q.clone(), last_dir=torch.zeros_like(q, dtype=torch.int8),
                ema=torch.zeros_like(q, dtype=torch.float32), total=zeros.clone(), epoch=zeros.clone(),
                frozen=torch.zeros_like(q, dtype=torch.bool), frozen_value=q.clone())
            return torch.zeros_like(q, dtype=torch.bool)
        if q.shape != st.prev.shape:
            raise UsageError(f"layer {name!r}: integers of shape {tuple(q.shape)}, expected {tuple(st.prev.shape)}")
        q = q.to(st.prev.device)
        direction = torch.sign(q - st.prev).to(torch.int8)
        flipped = (direction * st.last_dir) == -1
        st.ema.mul_(1.0 - self.momentum).add_(flipped.float(), alpha=self.momentum)
        st.last_dir = torch.where(direction != 0, direction, st.last_dir)
        st.total += flipped
        st.epoch += flipped
        st.prev = q.clone()
        st.steps += 1
        st.epoch_steps += 1
        if self.freeze_threshold is not None:
            new = (st.ema > self.freeze_threshold) & ~st.frozen
            st.frozen_value = torch.where(new, q, st.frozen_value)
            st.frozen |= new
        return flipped

    # --- statistics ---------------------------------------------------------------------------

    def counts(self, name: str) -> torch.Tensor:
        """Per-weight flips since the start (int64)."""
        return self._layer(name).total.clone()

    def epoch_counts(self, name: str) -> torch.Tensor:
        """Per-weight flips in the current epoch (int64)."""
        return self._layer(name).epoch.clone()

    def ema_frequency(self, name: str) -> torch.Tensor:
        """Per-weight EMA oscillation frequency (float32)."""
        return self._layer(name).ema.clone()

    def epoch_stats(self, name: str) -> dict:
        """The current epoch's numbers of a layer so far (see :meth:`end_epoch`)."""
        st = self._layer(name)
        n = st.epoch.numel()
        flipped_once = int((st.epoch > 0).sum())
        flips = int(st.epoch.sum())
        return dict(weights=n, steps=st.epoch_steps, flips=flips, oscillating=flipped_once,
                    rate=flipped_once / n if n else 0.0,
                    mean_frequency=flips / (n * st.epoch_steps) if n and st.epoch_steps else 0.0,
                    mean_ema=float(st.ema.mean()) if n else 0.0, frozen=int(st.frozen.sum()))

    def end_epoch(self) -> dict[str, dict]:
        """Close the epoch: per layer its report, also appended to :meth:`history`; epoch counts reset.

        Each report holds ``weights``, ``steps`` (transitions observed), ``flips`` (total in the
        epoch), ``oscillating`` (weights that flipped at least once), ``rate`` (= oscillating /
        weights), ``mean_frequency`` (= flips / (weights * steps)), ``mean_ema`` and ``frozen``.
        """
        report = {}
        for name, st in self._layers.items():
            report[name] = self.epoch_stats(name)
            st.history.append(report[name])
            st.epoch.zero_()
            st.epoch_steps = 0
        return report

    def history(self, name: str) -> list[dict]:
        """The reports of the closed epochs of a layer, oldest first."""
        return list(self._layer(name).history)

    # --- freezing -----------------------------------------------------------------------------

    def frozen_mask(self, name: str) -> torch.Tensor:
        """Bool mask of the frozen weights of a layer (all False without a threshold)."""
        return self._layer(name).frozen.clone()

    def frozen_values(self, name: str) -> torch.Tensor:
        """The integers the frozen weights are pinned to (meaningful where the mask is True)."""
        return self._layer(name).frozen_value.clone()

    def apply_freeze(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """``q`` with its frozen entries replaced by their pinned integers (same dtype as ``q``)."""
        st = self._layer(name)
        if q.shape != st.frozen.shape:
            raise UsageError(f"layer {name!r}: integers of shape {tuple(q.shape)}, expected {tuple(st.frozen.shape)}")
        frozen = st.frozen.to(q.device)
        return torch.where(frozen, st.frozen_value.to(device=q.device, dtype=q.dtype), q)

    @torch.no_grad()
    def freeze_latent_(self, name: str, weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Pin the frozen latent weights in place at their bin centres ``q_frozen * step``.

        ``step`` must broadcast to ``weight`` (e.g. :meth:`LsqQuantizer.integers`'s step). Zero
        their gradients (``weight.grad[mask] = 0``) or re-apply after each step to keep them there.
        Returns the mask.
        """
        mask = self.frozen_mask(name).to(weight.device)
        if weight.shape != mask.shape:
            raise UsageError(f"layer {name!r}: weight of shape {tuple(weight.shape)}, expected {tuple(mask.shape)}")
        centres = self._layer(name).frozen_value.to(weight.device, weight.dtype) * step.to(weight.dtype)
        weight.copy_(torch.where(mask, centres, weight))
        return mask
