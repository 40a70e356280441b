"""Drop-in replacements for ``nn.Linear`` / ``nn.Conv2d`` inside a timm model: each quantizes its
input to ``bits`` (an :class:`ActQuant`), runs the integer layer and returns the dequantized int32
accumulator, so timm's own forward code runs unchanged around it.

A :class:`QLinear` may quantize its input per instance-aware channel group (IGQ-ViT) or per channel
instead of per tensor (:meth:`QLinear.set_groups`, issue 15); the product then runs as per-group
partial sums (:mod:`._group_matmul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._channel import ChannelActQuant
from ._fake_quant import ActQuant
from ._group import GroupActQuant
from ._group_matmul import linear_partial_sums, linear_partial_sums_int, merge_partial_sums
from ._linear import QuantConv2d, QuantLinear

CHANNEL = "channel"  # the group setting of a static per-channel input quantizer


def check_groups(value: object, channels: int, what: str = "groups") -> int | str:
    """A group setting: a positive int (1 = per tensor) at most ``channels``, or ``"channel"``."""
    if value == CHANNEL:
        return CHANNEL
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive integer or 'channel', got {value!r}")
    if value > channels:
        raise UsageError(f"{what} ({value}) must not exceed the number of channels ({channels})")
    return value


def _set_bits(wrapper: nn.Module, layer: nn.Module, weight_bits: int, act_bits: int) -> None:
    from ..budget import LAYER_BITS, valid_layer_bits

    for what, b in (("weight bits", weight_bits), ("activation bits", act_bits)):
        if not valid_layer_bits(b):  # one layer may go below the model's 4..8 (Mix-QViT allocations)
            raise UsageError(f"{what}: must be an integer in {LAYER_BITS[0]}..{LAYER_BITS[1]}, got {b!r}")
    layer.weight_bits = int(weight_bits)
    wrapper.q_in.bits = int(act_bits)


class QLinear(nn.Module):
    """Input-quantized integer Linear (``bits`` activations and weights)."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.q_in = ActQuant(bits)
        self.linear = QuantLinear.from_float(linear, bits)
        self.q_group: GroupActQuant | ChannelActQuant | None = None

    def set_bits(self, weight_bits: int, act_bits: int) -> None:
        """Per-layer bit-widths (mixed precision): the weights' and the input quantizer's (and its
        groups'); the calibrated input range is kept (it does not depend on the bits)."""
        _set_bits(self, self.linear, weight_bits, act_bits)
        if self.q_group is not None:
            self.q_group.bits = act_bits

    @property
    def groups(self) -> int | str:
        """The input quantizer's setting: 1 (per tensor), ``G`` instance-aware groups, or ``"channel"``."""
        if self.q_group is None:
            return 1
        return CHANNEL if isinstance(self.q_group, ChannelActQuant) else self.q_group.groups

    def set_groups(self, groups: int | str) -> None:
        """Quantize the input per tensor (1), in ``G`` instance-aware groups (IGQ-ViT, static group
        ranges), or per channel with static scales (``"channel"``); a new quantizer is uncalibrated."""
        groups = check_groups(groups, self.linear.in_features)
        if groups == self.groups:
            return
        dev = self.linear.weight.device
        if groups == 1:
            self.q_group = None
        elif groups == CHANNEL:
            self.q_group = ChannelActQuant(self.q_in.bits, self.linear.in_features).to(dev)
        else:
            self.q_group = GroupActQuant(self.q_in.bits, groups).to(dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_group is not None and self.q_in._enabled:
            return self._forward_groups(x)
        fast = self.q_in.quantize_int8(x)  # without gradients, on the CPU: the integer GEMM
        if fast is not None:
            return self.linear.forward_int8(*fast)[0]
        q, s = self.q_in.quantize(x)
        return self.linear(q, None)[0] if s is None else self.linear.forward_q(q, s)[0]

    def _forward_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant: the input dequantized on its (instance, channel) grids, one product with the
        integer weights; equal to merging the exact per-group partial sums of the integer path
        (:meth:`forward_int_groups`) up to float32 rounding."""
        gq = self.q_group(x)
        w_int, s_w = self.linear.quant_weight()
        y = F.linear(gq.q * gq.scale, w_int) * s_w
        if isinstance(self.q_group, ChannelActQuant):  # static per-channel: the folded float reference
            return y if self.linear.bias is None else y + self.linear.bias
        return self._add_bias(y, gq.group_scales, s_w)

    def _add_bias(self, y: torch.Tensor, group_scales: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
        s_top = group_scales.max() * s_w  # the bias as int32 at the widest group's accumulator scale
        b = self.linear.bias_int(s_top)
        return y if b is None else y + (b * s_top).float()

    def partial_sums(self, x: torch.Tensor, integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouped product as the integer pipeline computes it: (the ``G`` partial sums
        ``(G, ..., D)``, float-held or, ``integer``, int64; the output merged from them with one rescale
        per group). Static instance-aware groups only."""
        if not isinstance(self.q_group, GroupActQuant) or self.q_group.dynamic:
            raise UsageError("partial sums need static instance-aware groups (set_groups(G), G > 1)")
        with torch.no_grad():
            gq = self.q_group(x)
            w_int, s_w = self.linear.quant_weight()
            fn = linear_partial_sums_int if integer else linear_partial_sums
            acc = fn(gq.q, gq.group, self.q_group.groups, w_int)
            return acc, self._add_bias(merge_partial_sums(acc, gq.group_scales, s_w), gq.group_scales, s_w)


class QConv2d(nn.Module):
    """Input-quantized integer Conv2d (the patch embedding)."""

    def __init__(self, conv: nn.Conv2d, bits: int):
        super().__init__()
        self.q_in = ActQuant(bits)
        self.conv = QuantConv2d.from_float(conv, bits)

    def set_bits(self, weight_bits: int, act_bits: int) -> None:
        """Per-layer bit-widths, as :meth:`QLinear.set_bits`."""
        _set_bits(self, self.conv, weight_bits, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self.q_in.quantize(x)
        return self.conv(q, None)[0] if s is None else self.conv.forward_q(q, s)[0]
