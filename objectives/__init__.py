"""How an assignment (or one slot's method) is scored; found by name.

>>> from objectives import Objective, get_objective, list_objectives
>>> "sqnr_diff" in list_objectives()
True
>>> list_objectives(Objective)
['bops', 'cost', 'proxy', 'proxy_sqnr', 'qat']
"""

from ._base import DIRECTIONS as DIRECTIONS
from ._base import LayerScore as LayerScore
from ._base import Objective as Objective
from ._registry import get_objective as get_objective
from ._registry import list_objectives as list_objectives
from ._registry import register_objective as register_objective

from . import sqnr as sqnr  # noqa: E402
from . import sqnr_diff as sqnr_diff  # noqa: E402
from . import proxy as proxy  # noqa: E402
from . import qat as qat  # noqa: E402
from . import cost as cost  # noqa: E402
from . import bops as bops  # noqa: E402

__all__ = ["DIRECTIONS", "LayerScore", "Objective", "get_objective", "list_objectives", "register_objective"]
