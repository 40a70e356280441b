"""Bit operations of an assignment's weight layers (Mix-QViT's cost): ``sum MACs x w_bits x a_bits``
per image, in billions (``gbops``, lower is better).

Bit-widths come from the assignment's ``<layer>@bits`` keys (a joint search over methods and
bit-widths, ``--joint-bits``); layers it does not name keep the model's. MACs are measured once on
the run's model (:func:`mnq_search.mixprec.layer_macs`, one image). With ``proxy`` it makes the
accuracy x BOPs Pareto front of issue 14: ``--objective proxy,bops --sampler nsga2 --joint-bits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import Objective
from ._registry import register_objective


@register_objective("bops")
class BopsObjective(Objective):
    direction = "minimize"
    metric = "gbops"
    description = "bit operations per image of the weight layers (GBOPs), from the assignment's bit-widths"

    def __init__(self) -> None:
        self.macs: dict[str, int] | None = None
        self.base: dict[str, tuple[int, int]] = {}

    def setup(self, ctx: Any) -> None:
        from mnq_search.mixprec import layer_bits, layer_macs

        self.macs = layer_macs(ctx.qmodel)
        self.base = layer_bits(ctx.qmodel)

    def evaluate(self, assignment: Mapping[str, Any], ctx: Any = None, trial: Any = None) -> float:
        from mnq_search.mixprec import total_bops
        from mnq_search.slot import split_bits

        if self.macs is None:
            self.setup(ctx)
        bits = {**self.base, **{layer: (b, b) for layer, b in split_bits(assignment)[1].items()}}
        return total_bops(self.macs, bits) / 1e9
