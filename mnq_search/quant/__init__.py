"""Integer quantizers: linear (dyadic, HAWQ-V3) and the non-linear methods' public entry points.

>>> from mnq_search.quant import make_nonlinear, NONLINEAR_METHODS
>>> sorted(NONLINEAR_METHODS)
['gelu', 'layernorm', 'softmax']
"""

from ._dyadic import dyadic as dyadic
from ._dyadic import dyadic_value as dyadic_value
from ._dyadic import requantize as requantize
from ._fake_quant import BITS_RANGE as BITS_RANGE
from ._fake_quant import ActQuant as ActQuant
from ._fake_quant import check_bits as check_bits
from ._fake_quant import qrange as qrange
from ._fake_quant import quantize_ste as quantize_ste
from ._fake_quant import symmetric_scale as symmetric_scale
from ._linear import QuantConv2d as QuantConv2d
from ._linear import QuantLinear as QuantLinear
from ._linear import QuantMatMul as QuantMatMul
from ._observer import MinMaxObserver as MinMaxObserver
from ._wrappers import QConv2d as QConv2d
from ._wrappers import QLinear as QLinear


def __getattr__(name: str):
    # The methods package builds on this one (fake-quant, observers), so its public names are
    # resolved on first use rather than at import, which keeps the two free of an import cycle.
    if name in ("make_nonlinear", "NONLINEAR_METHODS"):
        from .. import methods

        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ActQuant", "BITS_RANGE", "MinMaxObserver", "NONLINEAR_METHODS", "QConv2d", "QLinear", "QuantConv2d",
           "QuantLinear",
           "QuantMatMul", "check_bits", "dyadic", "dyadic_value", "make_nonlinear", "qrange", "quantize_ste",
           "requantize", "symmetric_scale"]
