"""The lowest layer: integer arithmetic that the quantizers (:mod:`mnq_search.quant`) and the
non-linear methods (:mod:`mnq_search.methods`) both build on, and that imports nothing else of
mnq-search.

- :mod:`._ops`: primitives on int64 tensors and on float-held integers (shifts, half-up rounding,
  floor division, bit length, integer square root, range checks, dyadic multipliers);
- :mod:`._rounding`: rounding to a grid with the straight-through estimator; supported bit-widths;
- :mod:`._compiled`: numba set-up, the row-block runner, and the one-pass element-wise kernels
  (quantizer, integer GEMM epilogue, signal/noise sums), with the switch :func:`fast_kernels`.
"""

from ._compiled import HAVE_INT_MM as HAVE_INT_MM
from ._compiled import HAVE_NUMBA as HAVE_NUMBA
from ._compiled import bias_scale_cpu as bias_scale_cpu
from ._compiled import fast_enabled as fast_enabled
from ._compiled import fast_kernels as fast_kernels
from ._compiled import int_linear_cpu as int_linear_cpu
from ._compiled import jit as jit
from ._compiled import power_sums as power_sums
from ._compiled import quantize_cpu as quantize_cpu
from ._compiled import quantize_int8_cpu as quantize_int8_cpu
from ._compiled import quantize_mask_cpu as quantize_mask_cpu
from ._compiled import run_rows as run_rows
from ._ops import INT32_MAX as INT32_MAX
from ._ops import IntegerOverflowError as IntegerOverflowError
from ._ops import as_kind as as_kind
from ._ops import check_range as check_range
from ._ops import dyadic as dyadic
from ._ops import is_int as is_int
from ._ops import round_shr as round_shr
from ._rounding import BITS_RANGE as BITS_RANGE
from ._rounding import check_bits as check_bits
from ._rounding import qrange as qrange
from ._rounding import quantize_ste as quantize_ste
from ._rounding import round_ste as round_ste
from ._rounding import to_grid as to_grid

__all__ = ["BITS_RANGE", "HAVE_INT_MM", "HAVE_NUMBA", "INT32_MAX", "IntegerOverflowError", "as_kind",
           "bias_scale_cpu", "check_bits", "check_range", "dyadic", "fast_enabled", "fast_kernels", "int_linear_cpu",
           "is_int", "jit", "power_sums", "qrange", "quantize_cpu", "quantize_int8_cpu", "quantize_mask_cpu",
           "quantize_ste", "round_ste", "round_shr", "run_rows", "to_grid"]
