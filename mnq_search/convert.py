"""Convert a float timm ViT / DeiT / Swin into a quantized model with named non-linear slots.

The conversion replaces modules and keeps timm's forward code:

- ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin) -> :mod:`mnq_search.attention`
  (explicit softmax slot ``<path>.softmax``, integer q k^T and attn v);
- every ``nn.LayerNorm`` -> a ``layernorm`` slot at its path (16-bit input: the residual stream);
- every GELU module -> a ``gelu`` slot at its path (``bits`` input);
- every ``nn.Linear`` / ``nn.Conv2d`` -> an input-quantized integer layer (``bits`` weights and
  activations, int32 accumulators).

What stays float between quantizers (cls token, position embedding, pooling, the residual sums)
is quantized by the next consumer: every LayerNorm input at 16 bits (I-ViT's 16-bit residual
stream), every Linear input at ``bits``. I-ViT also requantizes the stream after each residual add;
here the stream is summed from dequantized branches and rounded to 16 bits where it is read,
which differs from it by at most one 16-bit rounding.

Example:
    >>> import timm
    >>> from mnq_search.convert import convert_model
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> q = convert_model(vit, bits=8)
    >>> sorted(q.slot_ops())[:3]
    ['blocks.0.attn.softmax', 'blocks.0.mlp.act', 'blocks.0.norm1']
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping

import torch
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from .attention import QuantAttention, QuantWindowAttention
from .errors import UsageError
from .methods import OPS
from .quant import FINE_QUANTIZERS, ActQuant, QConv2d, QLinear, QuantConv2d, QuantLinear, check_bits
from .slot import FLOAT, NonLinearSlot

SUPPORTED = (VisionTransformer, SwinTransformer)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _is_gelu(mod: nn.Module) -> bool:
    return type(mod).__name__ in ("GELU", "GELUTanh", "QuickGELU") or isinstance(mod, nn.GELU)


class QuantModel(nn.Module):
    """A converted model: ``forward`` is the timm model's; slots are found by name.

    Args:
        model: the converted timm model (see :func:`convert_model`).
        bits: the bit-width of its linear layers (weights and inputs).
        nl_bits: the bit-width of its non-linear slots (default: ``bits``).
    """

    def __init__(self, model: nn.Module, bits: int, fine_grid: bool = False, nl_bits: int | None = None):
        super().__init__()
        self.model = model
        self.bits = bits
        self.nl_bits = nl_bits or bits
        self.fine_grid = fine_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- slots and assignment ------------------------------------------------------------
    @property
    def slots(self) -> dict[str, NonLinearSlot]:
        return {m.name: m for m in self.model.modules() if isinstance(m, NonLinearSlot)}

    def slot_ops(self) -> dict[str, str]:
        """Slot name -> op, in forward order."""
        return {name: slot.op for name, slot in self.slots.items()}

    def count_slots(self) -> dict[str, int]:
        c = Counter(self.slot_ops().values())
        return {op: c.get(op, 0) for op in OPS}

    def get_assignment(self) -> dict[str, str]:
        return {name: slot.method for name, slot in self.slots.items()}

    def set_assignment(self, assignment: Mapping[str, str]) -> None:
        """Set the method of every slot named in ``assignment``, every method parameter named
        as ``<slot>#<method>.<param>``, every weight layer's or Softmax/GELU slot's bit-width named
        ``<layer>@bits`` (:meth:`set_slot_bits`) and every
        group layer's setting named ``<layer>@groups`` (validated first: nothing changes when a
        name, a method or a value is wrong). Changed bits or groups need a new calibration."""
        from .plan import validate_assignment
        from .slot import split_layer_keys, split_param_key, split_slot_bits

        assignment, bits, groups = split_layer_keys(assignment)
        validate_assignment(assignment, self.slot_ops())
        if groups:
            from .groups import check_group_spec

            check_group_spec(self, groups)
        slots = self.slots
        slot_bits, bits = split_slot_bits(bits, slots)
        for k, v in slot_bits.items():
            slots[k].check_bits(v)
        if bits:  # "<layer>@bits": a weight layer's bits (b, or "wXaY"), set_layer_bits checks all first
            from .mixprec import set_layer_bits
            from .slot import layer_bit_pairs

            set_layer_bits(self, layer_bit_pairs(bits))
        if slot_bits:  # "<slot>@bits": a Softmax or GELU slot's bits
            self.set_slot_bits(slot_bits)
        if groups:  # "<layer>@groups": instance-aware groups of a block linear's input or of the probabilities
            from .groups import set_groups

            set_groups(self, groups)
        for name, value in assignment.items():
            key = split_param_key(name)
            if key is not None:
                slots[key[0]].set_param(key[1], key[2], value)
        for name, method in assignment.items():
            if split_param_key(name) is None:
                slots[name].set_method(method)

    def slot_bits(self) -> dict[str, int]:
        """The bit-width of every Softmax and GELU slot (the ones :meth:`set_slot_bits` can change)."""
        return {name: slot.bits for name, slot in self.slots.items() if slot.op != "layernorm"}

    def set_slot_bits(self, bits: Mapping[str, int]) -> None:
        """Set Softmax and GELU slots' bit-widths (:meth:`NonLinearSlot.set_bits`; all checked
        first); a Softmax's probability groups (IGQ-ViT) follow its output grid. Needs a new calibration."""
        slots = self.slots
        for name, b in bits.items():
            if name not in slots:
                raise UsageError(f"bits given for {name!r}, which is not a slot of this model")
            slots[name].check_bits(b)
        for name, b in bits.items():
            slots[name].set_bits(b)

    def get_params(self) -> dict[str, object]:
        """Every method parameter set on a slot, as assignment keys (``<slot>#<method>.<param>``)."""
        from .slot import param_key

        return {param_key(name, m, p): v for name, slot in self.slots.items()
                for m, values in slot.params.items() for p, v in values.items()}

    # --- switches -------------------------------------------------------------------------
    def quantizers(self) -> list[ActQuant]:
        return [m for m in self.model.modules() if isinstance(m, ActQuant)]

    def set_quant(self, enabled: bool) -> "QuantModel":
        """Quantization on (default) or off; off, the model computes the float timm model."""
        for q in self.quantizers():
            q.set_enabled(enabled)
        return self

    def reset_ranges(self, modules: nn.Module | None = None) -> None:
        """Forget calibrated activation ranges and every method's calibrated state (before a new
        calibration), of the whole model or of the part ``modules``."""
        from .methods import NonLinearMethod

        for m in (modules or self.model).modules():
            if isinstance(m, ActQuant):
                m.observer.reset()
            elif isinstance(m, FINE_QUANTIZERS):
                m.reset()
            elif isinstance(m, NonLinearMethod):
                m.reset_calibration()


def convert_model(model: nn.Module, bits: int = 8, assignment: Mapping[str, str] | None = None,
                  inplace: bool = False, fine_grid: bool = False, nl_bits: int | None = None) -> QuantModel:
    """Quantize a timm ``VisionTransformer`` (ViT, DeiT) or ``SwinTransformer``.

    Args:
        model: the float model (weights already loaded).
        bits: weight and activation bit-width of the linear layers (4..8).
        nl_bits: input bit-width of the Softmax and GELU slots, and what the methods take as their
            bit-width (4..8; default ``bits``): the study of issue 17 varies it with the linear layers
            at 8 bits.
        assignment: slot -> method; slots not named stay ``"float"``.
        inplace: convert ``model`` itself instead of a deep copy.
        fine_grid: every method's exp/erf kernel on a grid no coarser than 2**-6 (off: the references').

    Returns:
        A :class:`QuantModel`, uncalibrated (see :mod:`mnq_search.calibrate`).
    """
    try:
        check_bits(bits)
        check_bits(nl_bits or bits, "nl_bits")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(model, SUPPORTED):
        raise UsageError(f"cannot convert {type(model).__name__}: mnq-search converts timm VisionTransformer "
                         "(ViT, DeiT) and SwinTransformer models")
    if not inplace:
        model = copy.deepcopy(model)
    for path, mod in list(model.named_modules()):
        if isinstance(mod, Attention):
            _set_submodule(model, path, QuantAttention(mod, bits, path, fine_grid, nl_bits))
        elif isinstance(mod, WindowAttention):
            _set_submodule(model, path, QuantWindowAttention(mod, bits, path, fine_grid, nl_bits))
    for path, mod in list(model.named_modules()):
        if isinstance(mod, (NonLinearSlot, QLinear, QConv2d, QuantLinear, QuantConv2d)) or ".float_module" in path:
            continue
        if isinstance(mod, nn.LayerNorm):
            _set_submodule(model, path, NonLinearSlot(path, "layernorm", nl_bits or bits, mod, fine_grid=fine_grid))
        elif _is_gelu(mod):
            _set_submodule(model, path, NonLinearSlot(path, "gelu", nl_bits or bits, mod, fine_grid=fine_grid))
        elif isinstance(mod, nn.Linear):
            _set_submodule(model, path, QLinear(mod, bits))
        elif isinstance(mod, nn.Conv2d):
            _set_submodule(model, path, QConv2d(mod, bits))
        elif isinstance(mod, (nn.Softmax, nn.BatchNorm2d, nn.GroupNorm)):
            raise UsageError(f"{path}: {type(mod).__name__} outside attention is not supported")
    qmodel = QuantModel(model, bits, fine_grid, nl_bits)
    if assignment:
        qmodel.set_assignment(assignment)
    return qmodel
