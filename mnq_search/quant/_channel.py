"""Static per-channel activation quantizer: the reference between per-tensor and instance-aware
groups (issue 15).

Every channel (last dim) has its own symmetric range, the EMA of its absmax over calibration
batches (all instances and tokens together), frozen in ``eval()``: one static scale per channel,
the same for every input. It returns a :class:`~mnq_search.quant._group.GroupQuant` whose groups
are the channels themselves, so a consumer treats it like a group quantizer with ``G = C``.

Integer-only inference folds the per-channel factors into the producer's affine and the consumer's
weights (RepQ-ViT's reparameterisation); here the consumer multiplies the dequantized input, a
float reference for that folded form.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ._fake_quant import qrange, quantize_ste, symmetric_scale
from ._group import GroupQuant
from ._observer import MinMaxObserver


class ChannelActQuant(nn.Module):
    """Signed symmetric per-channel quantizer with static (calibrated) scales, channels last.

    Args:
        bits: activation bit-width.
        channels: number of channels ``C``.
        momentum: EMA momentum as in :class:`MinMaxObserver`.

    forward(x) -> GroupQuant(q, scale (1, ..., 1, C), group (1, ..., 1, C), group_scales (C,)).
    """

    def __init__(self, bits: int, channels: int, momentum: float | None = 0.95):
        super().__init__()
        self.bits = bits
        self.channels = channels
        self.observer = MinMaxObserver(momentum, channel_dim=-1, channels=channels)

    @property
    def group_scales(self) -> torch.Tensor:
        return symmetric_scale(self.observer.absmax(), self.bits)

    def reset(self) -> None:
        self.observer.reset()

    def forward(self, x: torch.Tensor) -> GroupQuant:
        if x.shape[-1] != self.channels:
            raise UsageError(f"ChannelActQuant for {self.channels} channels got shape {tuple(x.shape)}")
        x = x.float()
        if self.training:
            self.observer.update(x)
        elif not bool(self.observer.initialized):
            raise UsageError("per-channel quantizer is not calibrated: run it in train() mode on calibration data first")
        s = self.group_scales
        side = (1,) * (x.dim() - 1) + (self.channels,)
        qmin, qmax = qrange(self.bits)
        q = quantize_ste(x, s.view(side), qmin, qmax)
        group = torch.arange(self.channels, device=x.device).view(side)
        return GroupQuant(q, s.view(side), group, s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.channels}"
