"""A tiny QAT loop per method: a toy model whose only non-linearity is the method under test
learns a toy task through the STE (the loss falls well below its starting value)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnq_search.methods import NONLINEAR_METHODS
from mnq_search.methods import make_nonlinear
from mnq_search.quant import ActQuant, QuantLinear

ALL = [(op, m) for op, ms in NONLINEAR_METHODS.items() for m in ms]


class Toy(nn.Module):
    """tokens (B, T, D) -> quantized linear -> method -> quantized linear -> mean over tokens -> logits."""

    def __init__(self, op, method, d=16, classes=4):
        super().__init__()
        self.op = op
        self.q_in = ActQuant(8)
        self.fc1 = QuantLinear(d, d)
        self.fc1b = QuantLinear(d, d)
        ln = nn.LayerNorm(d) if op == "layernorm" else None
        self.method = make_nonlinear(op, method, 8, ln)
        self.q_mid = ActQuant(self.method.in_bits)
        self.q_mid_b = ActQuant(8)
        self.q_logits = ActQuant(8)
        self.q_out = ActQuant(8)
        self.head = QuantLinear(d, classes)

    def forward(self, x):
        x, s = self.q_in(x)
        h, _ = self.fc1(x, s)
        h, s_h = self.q_mid(h)
        if self.op == "softmax":  # attention-like: softmax over tokens of q k^T, then @ values
            k, _ = self.fc1b(x, s)
            k, s_k = self.q_mid_b(k)
            logits, s_l = self.q_logits(h @ k.transpose(-1, -2) / 4)
            p, _ = self.method(logits, s_l)
            h = p @ x
        else:
            h, s_y = self.method(h, s_h)
        h, s_o = self.q_out(h)
        y, _ = self.head(h, s_o)
        return y.mean(dim=1)


@pytest.mark.parametrize("op, method", ALL)
def test_toy_qat_lowers_the_loss(op, method):
    torch.manual_seed(0)
    x = torch.randn(256, 6, 16)
    teacher = torch.randn(16, 4)
    y = (torch.tanh(x) @ teacher).mean(1).argmax(-1)
    model = Toy(op, method)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(120):
        idx = torch.randint(0, 256, (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.75 * start, (start, end)
