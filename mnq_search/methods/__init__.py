"""Integer non-linear methods, one family per file, found by name through registries.

>>> from mnq_search.methods import NONLINEAR_METHODS, get_family
>>> NONLINEAR_METHODS["gelu"]
('ibert', 'ivit')
>>> get_family("fqvit").stand_ins
{'gelu': 'ibert'}
"""

from ._base import AffineLayerNorm as AffineLayerNorm
from ._base import NonLinearMethod as NonLinearMethod
from ._registry import COST_KINDS as COST_KINDS
from ._registry import COST_SECTIONS as COST_SECTIONS
from ._registry import NONLINEAR_METHODS as NONLINEAR_METHODS
from ._registry import OPS as OPS
from ._registry import Family as Family
from ._registry import get_family as get_family
from ._registry import list_families as list_families
from ._registry import register_family as register_family
from ._registry import uniform_assignment as uniform_assignment
from ._registry import unregister_family as unregister_family
from ._registry import get_method_class as get_method_class
from ._registry import make_nonlinear as make_nonlinear
from ._registry import register_method as register_method

# the built-in families, in the order the paper lists them (registration order = choice order)
from . import ibert as ibert  # noqa: E402
from . import fqvit as fqvit  # noqa: E402
from . import ivit as ivit  # noqa: E402
# newer families (issue 13): IntAttention's table softmax, IPTQ-ViT's data-fitted GELU
from . import index as index  # noqa: E402
from . import polyfit as polyfit  # noqa: E402

__all__ = ["AffineLayerNorm", "COST_KINDS", "COST_SECTIONS", "Family", "NONLINEAR_METHODS", "NonLinearMethod", "OPS",
           "get_family", "get_method_class", "list_families", "make_nonlinear", "register_family", "register_method",
           "uniform_assignment", "unregister_family"]
