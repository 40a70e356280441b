"""How assignments are searched; found by name.

>>> from strategies import get_strategy, list_strategies
>>> list_strategies()[:3]
['uniform:ibert', 'uniform:fqvit', 'uniform:ivit']
"""

from ._base import StrategyResult as StrategyResult
from ._base import Strategy as Strategy
from ._registry import get_strategy as get_strategy
from ._registry import list_strategies as list_strategies
from ._registry import register_strategy as register_strategy

from . import uniform as uniform  # noqa: E402
from . import greedy as greedy  # noqa: E402
from . import random as random  # noqa: E402
from . import local as local  # noqa: E402
from . import mixqvit as mixqvit  # noqa: E402
from . import optuna_joint as optuna_joint  # noqa: E402
from . import unified as unified  # noqa: E402

__all__ = ["Strategy", "StrategyResult", "get_strategy", "list_strategies", "register_strategy"]
