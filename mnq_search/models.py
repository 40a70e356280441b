"""Model factory: zoo names (with their shipped or pretrained weights) and any timm name with a
local checkpoint file. Nothing is downloaded."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from .errors import UsageError
from .io import load_weights_into
from .zoo import (
    create_zoo_model,
    default_weights_path,
    get_zoo_entry,
    list_zoo,
    missing_weights,
)

DEFAULT_MODEL = "fmnist-deit-tiny"


@dataclass
class ModelInfo:
    name: str
    source: str  # "zoo" or "timm"
    checkpoint: str | None
    data: str | None  # default data spec (zoo models) or None (ImageNet-style: needs --data)
    input_size: int
    weights_meta: dict[str, Any] = field(default_factory=dict)


def classifier_key(model: torch.nn.Module) -> str:
    """The state-dict key of the classifier's weight (timm's ``default_cfg["classifier"]``: ``head``
    for ViT/DeiT, ``head.fc`` for Swin)."""
    return f"{model.default_cfg.get('classifier', 'head')}.weight"


def _head_size(state: dict[str, torch.Tensor], key: str) -> int | None:
    w = state.get(key)
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def load_model(name: str | None = None, checkpoint: str | Path | None = None,
               random_weights: bool = False, num_classes: int | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """Build ``name`` (default: the embedded ``fmnist-deit-tiny``) and load its weights.

    Zoo models load ``checkpoint`` or the file shipped in ``mnq_search/weights``; timm names need
    ``checkpoint`` (a safetensors or torch state dict, e.g. a DeiT-T ImageNet checkpoint) unless
    ``random_weights`` (for speed measurements). The classifier takes ``num_classes`` outputs if
    given, else as many as the checkpoint's classifier weight has (a fine-tuned checkpoint keeps its
    own head); any other tensor that does not fit is a one-line error naming it.
    """
    name = name or DEFAULT_MODEL
    loaded = None
    if checkpoint is not None:
        from .io import load_state_dict

        loaded = load_state_dict(checkpoint)
    if name in list_zoo():
        entry = get_zoo_entry(name)
        model = create_zoo_model(name)
        classes = num_classes or (_head_size(loaded[0], classifier_key(model)) if loaded else None)
        if classes and classes != model.num_classes:
            model = create_zoo_model(name, num_classes=classes)
        weights = Path(checkpoint) if checkpoint else default_weights_path(name)
        info = ModelInfo(name, "zoo", str(weights), entry.data, entry.input_size)
        if checkpoint or weights.is_file():
            meta = load_weights_into(model, weights, loaded)
            if "mnq_search" in meta:
                info.weights_meta = json.loads(meta["mnq_search"])
        elif not random_weights:
            raise missing_weights(name)
        else:
            info.checkpoint = None
        return model.eval(), info
    if timm.is_model(name):
        if checkpoint is None and not random_weights:
            raise UsageError(f"timm model {name!r} needs local weights: pass --checkpoint PATH "
                             "(downloads from the Hub are not supported)")
        model = timm.create_model(name, pretrained=False)
        classes = num_classes or (_head_size(loaded[0], classifier_key(model)) if loaded else None)
        if classes and classes != model.num_classes:
            model = timm.create_model(name, pretrained=False, num_classes=classes)
        if checkpoint is not None:
            load_weights_into(model, checkpoint, loaded)
        size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
        return model.eval(), ModelInfo(name, "timm", str(checkpoint) if checkpoint else None, None, size)
    close = difflib.get_close_matches(name, list_zoo() + timm.list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown model {name!r}{hint}; choose a zoo model ({', '.join(list_zoo())}) "
                     "or a timm model name")
