"""Registry of integer non-linear methods by (op, family), and the factory ``make_nonlinear``.

A new family is one file that decorates its classes with :func:`register_method`; importing it
adds its names to :data:`NONLINEAR_METHODS` (in registration order).
"""

from __future__ import annotations

from torch import nn

from ..errors import unknown_choice
from ._base import NonLinearMethod

OPS = ("softmax", "gelu", "layernorm")
_METHODS: dict[tuple[str, str], type[NonLinearMethod]] = {}
#: op -> the method families available for it, e.g. ``NONLINEAR_METHODS["gelu"] == ("ibert", "ivit")``
NONLINEAR_METHODS: dict[str, tuple[str, ...]] = {op: () for op in OPS}


def register_method(op: str, family: str):
    """Class decorator registering a :class:`NonLinearMethod` for ``op`` under ``family``."""
    if op not in OPS:
        raise unknown_choice("op", op, OPS)

    def add(cls: type[NonLinearMethod]) -> type[NonLinearMethod]:
        if (op, family) in _METHODS:
            raise ValueError(f"method {family!r} for {op!r} registered twice")
        cls.op, cls.family = op, family
        _METHODS[(op, family)] = cls
        NONLINEAR_METHODS[op] = NONLINEAR_METHODS[op] + (family,)
        return cls

    return add


def get_method_class(op: str, method: str) -> type[NonLinearMethod]:
    if op not in OPS:
        raise unknown_choice("op", op, OPS)
    if (op, method) not in _METHODS:
        raise unknown_choice(f"{op} method", method, NONLINEAR_METHODS[op])
    return _METHODS[(op, method)]


def make_nonlinear(op: str, method: str, bits: int = 8, float_module: nn.Module | None = None,
                   fine_grid: bool = False) -> NonLinearMethod:
    """Build the integer ``method`` for ``op``.

    Args:
        op: ``"softmax"`` (over the last dim), ``"gelu"`` or ``"layernorm"`` (over the last dim).
        method: a family in ``NONLINEAR_METHODS[op]``.
        bits: the model's activation bit-width (4..8).
        float_module: for LayerNorm, the ``nn.LayerNorm`` to copy (weight, bias, eps).
        fine_grid: exp/erf kernels on a grid no coarser than 2**-6 (see :class:`NonLinearMethod`).

    Raises:
        ValueError: unknown op, method or bits; the message names the valid choices.

    Example:
        >>> import torch
        >>> from mnq_search.methods import make_nonlinear
        >>> m = make_nonlinear("softmax", "ivit", bits=8)
        >>> s_x = torch.tensor(0.05)
        >>> x = torch.randint(-128, 128, (2, 3, 10)).float() * s_x
        >>> y, s_y = m(x, s_x)
        >>> bool(((y / s_y) == (y / s_y).round()).all())
        True
    """
    return get_method_class(op, method)(bits=bits, float_module=float_module, fine_grid=fine_grid)
