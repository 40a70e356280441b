"""A fourth method family in one file, as a user would write one: ``exact``, the float op itself
on the slot's integer input, its output rounded to a fine grid (a reference to compare the integer
families with). Importing this file registers the family and its three methods; nothing else in
mnq-search changes (tests/test_plugin_family.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnq_search.methods import AffineLayerNorm, Family, NonLinearMethod, register_family, register_method

FAMILY = register_family(Family(
    name="exact", title="Exact", color="tab:brown", paper="the float op, output rounded to a fine grid",
    cost={"softmax": {"element": {"add": 1, "mul": 1, "lookup": 1}, "row": {"div": 1}},
          "gelu": {"element": {"mul": 2, "lookup": 1}},
          "layernorm": {"element": {"add": 2, "mul": 2}, "row": {"div": 1}}},
))


def _round(y: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
    out = torch.floor(y / scale + 0.5)
    return out.long() if not like.is_floating_point() else out.to(like.dtype)


@register_method("softmax", "exact")
class ExactSoftmax(NonLinearMethod):
    def kernel(self, q, s_x):
        return _round(torch.softmax(q.double() * s_x, dim=-1), 2.0**-15, q), 2.0**-15

    def float_op(self, x):
        return torch.softmax(x, dim=-1)


@register_method("gelu", "exact")
class ExactGELU(NonLinearMethod):
    def kernel(self, q, s_x):
        return _round(F.gelu(q.double() * s_x), s_x / 64, q), s_x / 64

    def float_op(self, x):
        return F.gelu(x)


@register_method("layernorm", "exact")
class ExactLayerNorm(AffineLayerNorm):
    def kernel(self, q, s_x):
        w = self.weight.detach().double() if self.weight is not None else None
        b = self.bias.detach().double() if self.bias is not None else None
        y = F.layer_norm(q.double() * s_x, (q.shape[-1],), w, b, self.eps)
        return _round(y, 2.0**-10, q), 2.0**-10
