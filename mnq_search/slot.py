"""A *slot*: one named non-linear layer of a converted model, whose integer method can be set.

The slot owns the quantizer of its input (``bits`` for Softmax and GELU, 16 bits for LayerNorm:
every LayerNorm input is the residual stream) and the method that computes the op on that
grid, or the exact float op when its method is ``"float"``. For LayerNorm the slot keeps the
float ``nn.LayerNorm`` and every method shares its weight and bias, so switching methods keeps
what QAT learned.

A slot is a drop-in module: ``slot(x)`` returns a float tensor (on the method's output grid,
whose scale is left in ``slot.out_scale`` for the attention matmul that follows a Softmax).
With quantization off (``set_quant(False)`` on the model) it is the float op.

A method may declare per-slot parameters (IndexSoftmax's table size ``K`` and threshold ``T``): the
slot keeps their values per method (:meth:`NonLinearSlot.set_param`), and an assignment names them
as ``<slot>#<method>.<param>`` (:func:`param_key`) next to the slot's method.

A recorder (see :mod:`mnq_search.sensitivity`) may be attached: it receives the slot's name, the
input the op saw (dequantized) and its output.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import unknown_choice
from .methods import NONLINEAR_METHODS, get_method_class, make_nonlinear
from .methods._registry import check_params
from .quant import ActQuant

FLOAT = "float"
MASK_SENTINEL = -(2**15)  # integer a masked attention logit takes (Swin): far below any 8-bit logit

Recorder = Callable[[str, torch.Tensor, torch.Tensor], None]


PARAM_SEP = "#"


def methods_for(op: str, include_float: bool = False) -> tuple[str, ...]:
    return NONLINEAR_METHODS[op] + ((FLOAT,) if include_float else ())


def param_key(slot: str, method: str, param: str) -> str:
    """The assignment key of a method parameter of a slot: ``blocks.0.attn.softmax#index.K``."""
    return f"{slot}{PARAM_SEP}{method}.{param}"


BITS_SUFFIX = "@bits"  # "<layer>@bits" -> b (weights and inputs) or "wXaY"; "<slot>@bits" -> a Softmax/GELU slot's b
GROUPS_SUFFIX = "@groups"  # assignment key of a group layer's setting: "<layer>@groups" -> 1, G or "channel"


def bits_key(layer: str) -> str:
    return layer + BITS_SUFFIX


def groups_key(layer: str) -> str:
    """The assignment key of a group layer's setting (:mod:`mnq_search.groups`): a block linear's
    path, or an attention's softmax slot for its probabilities, then ``@groups``."""
    return layer + GROUPS_SUFFIX


def split_layer_keys(assignment) -> tuple[dict, dict[str, int | str], dict[str, int | str]]:
    """(the assignment without layer keys, layer -> bits of its ``<layer>@bits`` keys (``b`` or
    ``"wXaY"``: :func:`layer_bit_pairs` reads them), layer -> group setting of its ``<layer>@groups`` keys)."""
    rest, bits, groups = {}, {}, {}
    for k, v in assignment.items():
        if k.endswith(BITS_SUFFIX):
            bits[k[: -len(BITS_SUFFIX)]] = v
        elif k.endswith(GROUPS_SUFFIX):
            groups[k[: -len(GROUPS_SUFFIX)]] = v
        else:
            rest[k] = v
    return rest, bits, groups


def split_slot_bits(bits, slots) -> tuple[dict, dict]:
    """(the values of ``bits`` (a ``split_layer_keys`` layer -> bits map) whose names are in ``slots``:
    Softmax/GELU slots' bits, the rest: weight layers' bits)."""
    return ({k: v for k, v in bits.items() if k in slots}, {k: v for k, v in bits.items() if k not in slots})


def layer_bit_pairs(bits) -> dict[str, tuple[int, int]]:
    """``{layer: (weight bits, activation bits)}`` of ``<layer>@bits`` values (``6`` or ``"w4a8"``); a
    one-line UsageError for a value that is neither."""
    from .budget import LAYER_BITS, bits_pair
    from .errors import UsageError

    out = {}
    for layer, value in bits.items():
        pair = bits_pair(value)
        if pair is None:
            raise UsageError(f"bits of {layer}: expected a bit-width in {LAYER_BITS[0]}..{LAYER_BITS[1]} or 'wXaY', "
                             f"got {value!r}")
        out[layer] = pair
    return out


def split_param_key(key: str) -> tuple[str, str, str] | None:
    """(slot, method, param) of a parameter key, None for a slot name."""
    if PARAM_SEP not in key:
        return None
    slot, rest = key.split(PARAM_SEP, 1)
    method, _, param = rest.partition(".")
    return slot, method, param


def method_params(op: str, method: str) -> dict[str, tuple]:
    """The per-slot parameters ``method`` declares for ``op`` (name -> choices, default first)."""
    return {} if method == FLOAT else dict(get_method_class(op, method).PARAMS)


class NonLinearSlot(nn.Module):
    """Args:
        name: the slot's module path, e.g. ``blocks.3.attn.softmax``.
        op: ``softmax``, ``gelu`` or ``layernorm``.
        bits: the model's bit-width.
        float_module: the float module the slot replaces (``nn.LayerNorm``, ``nn.GELU``) or None.
        method: initial method (``"float"`` by default).
        fine_grid: passed to every method (see :class:`~mnq_search.methods.NonLinearMethod`).
    """

    def __init__(self, name: str, op: str, bits: int, float_module: nn.Module | None = None, method: str = FLOAT,
                 fine_grid: bool = False):
        super().__init__()
        self.name = name
        self.op = op
        self.bits = bits
        self.fine_grid = fine_grid
        self.float_module = float_module
        self.method = FLOAT
        self.params: dict[str, dict] = {}  # method -> parameter values set on this slot
        self.impl: nn.Module | None = None
        self.q_in = ActQuant(16 if op == "layernorm" else bits)
        self.out_scale: torch.Tensor | None = None
        self.recorder: Recorder | None = None
        self.set_method(method)

    def set_method(self, method: str) -> None:
        """Switch the integer method (a fresh, uncalibrated instance; LayerNorm parameters are kept)."""
        if method not in methods_for(self.op, include_float=True):
            raise unknown_choice(f"method for {self.op} slot {self.name}", method,
                                 methods_for(self.op, include_float=True))
        if method == self.method and (self.impl is not None or method == FLOAT):
            return
        self.method = method
        self._build()

    def set_bits(self, bits: int) -> None:
        """Set the slot's bit-width (4..8; Softmax and GELU only: a LayerNorm's input is the 16-bit
        residual stream): its input grid and what its method takes as ``bits`` (a Softmax's output
        grid too). The method is rebuilt fresh and uncalibrated, as after :meth:`set_method`. The
        attention's probability groups (IGQ-ViT) read this width at every forward."""
        if self.check_bits(bits) == self.bits:
            return
        self.bits = bits
        self.q_in.bits = bits  # the calibrated input range is kept (it does not depend on the bits)
        if self.impl is not None:
            self._build()

    def check_bits(self, bits) -> int:
        """``bits`` if this slot can take it (see :meth:`set_bits`), else a one-line UsageError."""
        from .errors import UsageError
        from .integer import check_bits

        if self.op == "layernorm":
            raise UsageError(f"bits of {self.name}: a LayerNorm slot's input is the 16-bit residual stream; "
                             "only Softmax and GELU slots take a bit-width")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise UsageError(f"bits of {self.name}: expected an integer bit-width, got {bits!r}")
        try:
            check_bits(bits)
        except ValueError as exc:
            raise UsageError(f"bits of {self.name}: {exc}") from None
        return bits

    def set_param(self, method: str, name: str, value) -> None:
        """Set a parameter of ``method`` on this slot (validated); when the slot runs that method, it
        is rebuilt (fresh and uncalibrated, as after :meth:`set_method`)."""
        if method not in methods_for(self.op):
            raise unknown_choice(f"method for {self.op} slot {self.name}", method, methods_for(self.op))
        cls = get_method_class(self.op, method)
        check_params(cls, {name: value})
        current = self.params.get(method, {}).get(name, cls.PARAMS[name][0])
        self.params.setdefault(method, {})[name] = value
        if method == self.method and value != current:
            self._build()

    def _build(self) -> None:
        method = self.method
        if method == FLOAT:
            self.impl = None
            return
        impl = make_nonlinear(self.op, method, self.bits, self.float_module, fine_grid=self.fine_grid,
                              **self.params.get(method, {}))
        if self.op == "layernorm" and self.float_module is not None:
            # share the float LayerNorm's parameters, so QAT trains one set and the state dict holds
            # them once (under float_module); the method keeps plain references, not registrations
            for name in ("weight", "bias"):
                if getattr(impl, name, None) is not None:
                    delattr(impl, name)
                    object.__setattr__(impl, name, getattr(self.float_module, name))
        self.impl = impl.to(self.q_in.observer.min_val.device)
        if self.q_in.bits != impl.in_bits:
            self.q_in = ActQuant(impl.in_bits).to(self.q_in.observer.min_val.device)

    def float_op(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "softmax":
            return x.softmax(dim=-1)
        if self.float_module is not None:
            return self.float_module(x)
        return F.gelu(x)

    def forward(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """``masked`` (Softmax only): boolean tensor broadcastable to x, True where the logit is masked
        out (Swin's shifted windows). Float mode adds -inf there; quantized mode sets the integer
        to :data:`MASK_SENTINEL` after quantization, so the mask never enters the range statistics."""
        q, s = self.q_in.quantize(x)
        if s is None:  # quantization off: the float op (what timm computes)
            x_in = x
            y = self.float_op(x if masked is None else x.masked_fill(masked, float("-inf")))
            self.out_scale = None
        else:
            x_in = q * s
            qm = q if masked is None else q.masked_fill(masked, MASK_SENTINEL)
            if self.impl is None:
                y, self.out_scale = self.float_op(qm * s), None
            else:
                y, self.out_scale = self.impl.forward_q(qm, s)
        if self.recorder is not None:
            self.recorder(self.name, x_in.detach(), y.detach())
        return y

    def extra_repr(self) -> str:
        params = self.params.get(self.method)
        return (f"name={self.name!r}, op={self.op}, method={self.method}, bits={self.bits}"
                + (f", params={params}" if params else ""))
