"""Output-SQNR score: the paper's "SQNR output" decision rule (Table 2)."""

from __future__ import annotations

from ._base import LayerScore
from ._registry import register_objective


@register_objective("sqnr_output")
class SqnrOutputScore(LayerScore):
    """Highest ASQNR of the slot's output: the method whose output is closest to the float model's."""

    direction = "maximize"
    description = "highest output ASQNR"

    def score(self, row):
        return float(row["asqnr_out"])
