"""Drop-in replacements for ``nn.Linear`` / ``nn.Conv2d`` inside a timm model: each quantizes its
input to ``bits`` (an :class:`ActQuant`), runs the integer layer and returns the dequantized int32
accumulator, so timm's own forward code runs unchanged around it.
"""

from __future__ import annotations

import torch
from torch import nn

from ._fake_quant import ActQuant
from ._linear import QuantConv2d, QuantLinear


class QLinear(nn.Module):
    """Input-quantized integer Linear (``bits`` activations and weights)."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.q_in = ActQuant(bits)
        self.linear = QuantLinear.from_float(linear, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.q_in.quantize_int8(x)  # without gradients, on the CPU: the integer GEMM
        if fast is not None:
            return self.linear.forward_int8(*fast)[0]
        q, s = self.q_in.quantize(x)
        return self.linear(q, None)[0] if s is None else self.linear.forward_q(q, s)[0]


class QConv2d(nn.Module):
    """Input-quantized integer Conv2d (the patch embedding)."""

    def __init__(self, conv: nn.Conv2d, bits: int):
        super().__init__()
        self.q_in = ActQuant(bits)
        self.conv = QuantConv2d.from_float(conv, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self.q_in.quantize(x)
        return self.conv(q, None)[0] if s is None else self.conv.forward_q(q, s)[0]
