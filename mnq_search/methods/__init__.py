"""Integer non-linear methods, one family per file, found by name through a registry.

>>> from mnq_search.methods import NONLINEAR_METHODS
>>> NONLINEAR_METHODS["gelu"]
('ibert', 'ivit')
"""

from ._base import AffineLayerNorm as AffineLayerNorm
from ._base import NonLinearMethod as NonLinearMethod
from ._registry import NONLINEAR_METHODS as NONLINEAR_METHODS
from ._registry import OPS as OPS
from ._registry import get_method_class as get_method_class
from ._registry import make_nonlinear as make_nonlinear
from ._registry import register_method as register_method

# the built-in families, in the order the paper lists them (registration order = choice order)
from . import ibert as ibert  # noqa: E402
from . import fqvit as fqvit  # noqa: E402
from . import ivit as ivit  # noqa: E402

__all__ = ["AffineLayerNorm", "NONLINEAR_METHODS", "NonLinearMethod", "OPS", "get_method_class",
           "make_nonlinear", "register_method"]
