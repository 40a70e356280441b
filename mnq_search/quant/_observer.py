"""Range observers: running min/max (EMA) per tensor or per channel, kept as buffers.

The references keep ranges as plain attributes and recompute them in every forward, so a
reloaded checkpoint loses them; here they are registered buffers and round-trip through
``state_dict``. An observer updates only when its owner asks (training/calibration).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_


class MinMaxObserver(nn.Module):
    """EMA of the batch min and max: ``v = momentum * v + (1 - momentum) * batch_v``.

    Args:
        momentum: 0.95 as in I-ViT/HAWQ ``QuantAct``; 0 keeps only the latest batch, and
            ``momentum=None`` keeps the running extremes (plain min/max).
        channel_dim: reduce over every dim except this one (per-channel ranges), or None.
    """

    def __init__(self, momentum: float | None = 0.95, channel_dim: int | None = None, channels: int = 1):
        super().__init__()
        self.momentum = momentum
        self.channel_dim = channel_dim
        shape = (channels,) if channel_dim is not None else ()
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_dim is None:
            return torch.aminmax(x)  # one pass
        dims = [d for d in range(x.dim()) if d != self.channel_dim % x.dim()]
        return x.amin(dim=dims), x.amax(dim=dims)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the range (no host synchronization, so cheap inside QAT on GPU)."""
        lo, hi = self._reduce(x.detach().float())
        all_reduce_(lo, "min")  # data-parallel: the range of the global batch on every rank
        all_reduce_(hi, "max")
        if self.min_val.shape != lo.shape:
            self.min_val = torch.zeros_like(lo)
            self.max_val = torch.zeros_like(hi)
        init = self.initialized
        if self.momentum is None:
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:
            m = self.momentum
            new_lo, new_hi = m * self.min_val + (1 - m) * lo, m * self.max_val + (1 - m) * hi
        self.min_val.copy_(torch.where(init, new_lo, lo))
        self.max_val.copy_(torch.where(init, new_hi, hi))
        self.initialized.fill_(True)

    def reset(self) -> None:
        self.min_val.zero_()
        self.max_val.zero_()
        self.initialized.fill_(False)

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, channel_dim={self.channel_dim}"
