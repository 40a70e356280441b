"""Integer quantizers of the linear part: observers, the activation quantizer, dyadic
requantization (HAWQ-V3), and integer Linear / Conv2d / MatMul with their input-quantized wrappers.

The non-linear methods build on this package: :mod:`mnq_search.methods`.
"""

from ._channel import ChannelActQuant as ChannelActQuant
from ._dyadic import dyadic as dyadic
from ._dyadic import dyadic_value as dyadic_value
from ._dyadic import requantize as requantize
from ._fake_quant import BITS_RANGE as BITS_RANGE
from ._fake_quant import ActQuant as ActQuant
from ._fake_quant import check_bits as check_bits
from ._fake_quant import qrange as qrange
from ._fake_quant import quantize_ste as quantize_ste
from ._fake_quant import symmetric_scale as symmetric_scale
from ._group import GroupActQuant as GroupActQuant
from ._group import GroupSoftmaxQuant as GroupSoftmaxQuant
from ._linear import QuantConv2d as QuantConv2d
from ._linear import QuantLinear as QuantLinear
from ._linear import QuantMatMul as QuantMatMul
from ._observer import MinMaxObserver as MinMaxObserver
from ._wrappers import QConv2d as QConv2d
from ._wrappers import QLinear as QLinear


def __getattr__(name: str):
    # Deprecated: the methods build on this package, so this one no longer exports them (the layers
    # import one way); import them from mnq_search.methods.
    if name in ("make_nonlinear", "NONLINEAR_METHODS"):
        import warnings

        from .. import methods

        warnings.warn(f"mnq_search.quant.{name} moved to mnq_search.methods.{name}", DeprecationWarning, stacklevel=2)
        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FINE_QUANTIZERS = (ChannelActQuant, GroupActQuant, GroupSoftmaxQuant)  # calibrated like ActQuant

__all__ = ["ActQuant", "BITS_RANGE", "ChannelActQuant", "FINE_QUANTIZERS", "GroupActQuant", "GroupSoftmaxQuant", "MinMaxObserver", "QConv2d", "QLinear", "QuantConv2d",
           "QuantLinear",
           "QuantMatMul", "check_bits", "dyadic", "dyadic_value", "qrange", "quantize_ste",
           "requantize", "symmetric_scale"]
