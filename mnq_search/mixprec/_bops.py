"""Cost of a bit allocation: MACs, bit operations (BOPs) and weight bytes per layer.

Mix-QViT (Ranjan & Savakis, 2025) constrains its bit allocation by a compute budget. The
cost model here is the usual one of mixed-precision search: a layer's BOPs are its
multiply-accumulates per image times its weight and activation bit-widths,
``BOPs_l = MACs_l * w_bits_l * a_bits_l``, summed over the weight layers.

MACs are measured with forward hooks on one image, for every ``nn.Linear`` and ``nn.Conv2d``
(in a converted model, every input-quantized wrapper: a module holding ``q_in`` and ``linear`` or
``conv``). Layer names are the float model's paths in both cases (``blocks.0.attn.qkv``), so a
table measured on one applies to the other. The attention matmuls (``q k^T``, ``A v``) hold no
weights and are not counted in a weight layer's BOPs; when the Softmax slots' bit-widths are searched
(``--joint-nl-bits``) they are, by :func:`attention_macs` and :func:`attention_bops`: ``q k^T`` at
the qkv grid's bits squared, ``A v`` at the probabilities' bits (the Softmax slot's) times the qkv
grid's.

Weight bytes: ``(w_bits * weights + bias_bits * biases) / 8`` per layer (bias at 32 bits, the
int32 accumulator grid).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from mnq_search.budget import parse_budget_spec
from mnq_search.errors import UsageError

Bits = tuple[int, int]
DEFAULT_BITS: Bits = (8, 8)


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a converted model (it keeps the float model's paths)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "slot_ops"):
        return inner
    return model


def _core(mod: nn.Module) -> nn.Module:
    """The Linear / Conv2d inside a quantized wrapper, or ``mod`` itself."""
    for attr in ("linear", "conv"):
        inner = getattr(mod, attr, None)
        if isinstance(inner, (nn.Linear, nn.Conv2d)):
            return inner
    return mod


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> the module to hook: a quantized wrapper, or a plain Linear / Conv2d."""
    found: dict[str, nn.Module] = {}
    inner_ids: set[int] = set()
    for name, mod in _unwrap(model).named_modules():
        if id(mod) in inner_ids:
            continue
        core = _core(mod)
        if hasattr(mod, "q_in") and core is not mod:
            found[name] = mod
            inner_ids.add(id(core))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            found[name] = mod
    return found


def _infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    pe = getattr(_unwrap(model), "patch_embed", None)
    size = getattr(pe, "img_size", None)
    proj = _core(getattr(pe, "proj", None)) if pe is not None else None
    if size is None or not isinstance(proj, nn.Conv2d):
        raise UsageError("cannot infer the input size of this model: pass input_shape=(channels, height, width)")
    return (proj.in_channels, *size)


def layer_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """Multiply-accumulates per image of every weight layer, measured on one image.

    Args:
        model: a float or converted model (run once in eval mode on zeros, then restored).
        input_shape: one image's shape without the batch dimension (default: a timm ViT's
            ``(in_chans, *img_size)``).

    Returns:
        Layer path -> MACs per image, in forward order.
    """
    shape = tuple(input_shape) if input_shape is not None else _infer_input_shape(model)
    layers = _weight_layers(model)
    macs: dict[str, int] = {}

    def hook(name: str, mod: nn.Module):
        core = _core(mod)

        def fn(_m, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(core, nn.Linear):
                count = inputs[0].numel() * core.out_features
            else:
                kh, kw = core.kernel_size
                count = out.numel() * (core.in_channels // core.groups) * kh * kw
            macs[name] = macs.get(name, 0) + int(count)
        return fn

    handles = [mod.register_forward_hook(hook(name, mod)) for name, mod in layers.items()]
    param = next(model.parameters(), None)
    x = torch.zeros((1, *shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def attention_macs(qmodel: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Softmax slot -> (MACs per image of each of its attention's two products, the bits of the qkv
    grid they multiply), measured on the first image of ``x`` (a copy of the converted model runs it, float)."""
    import copy

    from mnq_search.attention import _QuantAttentionBase

    qmodel = copy.deepcopy(qmodel).set_quant(False)  # shapes only: the float path, whatever is calibrated
    attns = {mod.softmax.name: mod for mod in qmodel.modules() if isinstance(mod, _QuantAttentionBase)}
    out: dict[str, tuple[int, int]] = {}

    def record(slot, args) -> None:  # a pre-hook returning a value would replace the input
        attn = attns[slot.name]
        out.setdefault(slot.name, (args[0].numel() * attn.head_dim, int(attn.q_qkv.bits)))

    hooks = [a.softmax.register_forward_pre_hook(record) for a in attns.values()]
    try:
        with torch.no_grad():
            qmodel.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return out


def attention_bops(macs: Mapping[str, tuple[int, int]], p_bits: Mapping[str, int] | int) -> int:
    """BOPs per image of the attention products: ``MACs * a * a`` for ``q k^T`` and ``MACs * p * a``
    for ``A v``, per Softmax slot of ``macs`` (:func:`attention_macs`), ``p`` its bits in ``p_bits``
    (one number: every slot's)."""
    total = 0
    for slot, (m, a) in macs.items():
        p = p_bits if isinstance(p_bits, int) else p_bits[slot]
        total += int(m) * a * (a + int(p))
    return total


def layer_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(weight count, bias count) of every weight layer, with :func:`layer_macs`'s names.

    Args:
        model: a float or converted model.

    Returns:
        Layer path -> (number of weights, number of bias values).
    """
    out = {}
    for name, mod in _weight_layers(model).items():
        core = _core(mod)
        out[name] = (core.weight.numel(), 0 if core.bias is None else core.bias.numel())
    return out


def layer_bits(model: nn.Module) -> dict[str, Bits]:
    """The (weight bits, activation bits) of every quantized layer of a converted model.

    Args:
        model: a converted model (its ``QLinear`` / ``QConv2d`` wrappers); plain layers are skipped.

    Returns:
        Layer path -> (w_bits, a_bits).
    """
    return {name: (int(_core(mod).weight_bits), int(mod.q_in.bits))
            for name, mod in _weight_layers(model).items() if hasattr(mod, "q_in")}


def _check_names(table: Mapping[str, object], bits: Mapping[str, Bits]) -> None:
    unknown = sorted(set(bits) - set(table))
    if unknown:
        raise UsageError(f"bits given for unknown layers: {', '.join(unknown)}")


def _pair(name: str, value) -> Bits:
    try:
        w, a = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: bits must be a (w_bits, a_bits) pair, got {value!r}") from None
    if not (1 <= w <= 32 and 1 <= a <= 32):
        raise UsageError(f"{name}: bits must be in 1..32, got ({w}, {a})")
    return w, a


def total_bops(macs: Mapping[str, int], bits: Mapping[str, Bits] | None = None,
               default: Bits = DEFAULT_BITS) -> int:
    """Bit operations of an allocation: ``sum_l MACs_l * w_bits_l * a_bits_l``.

    Args:
        macs: layer -> MACs per image (:func:`layer_macs`).
        bits: layer -> (w_bits, a_bits); layers not named use ``default``.
        default: the bits of every layer not in ``bits``.

    Returns:
        BOPs per image.
    """
    bits = bits or {}
    _check_names(macs, bits)
    total = 0
    for name, m in macs.items():
        w, a = _pair(name, bits.get(name, default))
        total += int(m) * w * a
    return total


def weight_bytes(params: Mapping[str, tuple[int, int]], bits: Mapping[str, Bits] | None = None,
                 default: Bits = DEFAULT_BITS, bias_bits: int = 32) -> float:
    """Storage of the weight layers: ``(w_bits * weights + bias_bits * biases) / 8`` summed.

    Args:
        params: layer -> (weights, biases) (:func:`layer_params`).
        bits: layer -> (w_bits, a_bits); only w_bits matters; layers not named use ``default``.
        default: the bits of every layer not in ``bits``.
        bias_bits: the bias width.

    Returns:
        Bytes.
    """
    bits = bits or {}
    _check_names(params, bits)
    total = 0
    for name, (n_w, n_b) in params.items():
        w, _ = _pair(name, bits.get(name, default))
        total += w * n_w + bias_bits * n_b
    return total / 8


def parse_budget(text: str, macs: Mapping[str, int], group_overhead: Callable[[int], float] | None = None) -> float:
    """A BOPs budget from a string.

    Accepted forms: a uniform setting ``"w6a6"`` (the BOPs of every layer at 6-bit weights and
    6-bit activations), with a group count ``"w4a4g8"`` (plus ``group_overhead(8)``, the overhead of
    8 groups at every group layer), or an absolute count: ``"2.5e9"``, ``"1.2G"``, ``"800M"``,
    ``"3e12"`` (units k, M, G, T; an optional ``"BOPs"`` suffix).

    Args:
        text: the budget.
        macs: layer -> MACs per image, for the uniform form.
        group_overhead: G -> BOPs per image of G groups everywhere, for the group form.

    Returns:
        The budget in BOPs per image.
    """
    spec = parse_budget_spec(text)
    if spec.bits is not None:
        extra = 0.0
        if spec.groups is not None:
            if group_overhead is None:
                raise UsageError(f"budget {text!r}: a group budget needs a search over group counts (--joint-groups)")
            extra = float(group_overhead(spec.groups))
        return float(total_bops(macs, default=spec.bits)) + extra
    return spec.bops
