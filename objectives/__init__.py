"""How an assignment (or one slot's method) is scored; found by name.

>>> from objectives import get_objective, list_objectives
>>> "sqnr_diff" in list_objectives()
True
"""

from ._base import DIRECTIONS as DIRECTIONS
from ._base import LayerScore as LayerScore
from ._registry import get_objective as get_objective
from ._registry import list_objectives as list_objectives
from ._registry import register_objective as register_objective

from . import sqnr as sqnr  # noqa: E402
from . import sqnr_diff as sqnr_diff  # noqa: E402

__all__ = ["DIRECTIONS", "LayerScore", "get_objective", "list_objectives", "register_objective"]
