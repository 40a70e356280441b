"""Model zoo: named, seeded recipes that build a timm model for a small data set and pretrain it.

Each entry names a timm architecture, the keyword arguments that adapt it to the input
(image size, patch size, channels, classes), and the float training recipe. The embedded default,
``fmnist-deit-tiny``, is DeiT-Tiny's structure (12 blocks, embed 192, 3 heads: 12 Softmax, 12 GELU,
25 LayerNorm) for 28x28 single-channel Fashion-MNIST images with 4x4 patches.

>>> from mnq_search.zoo import list_zoo, create_zoo_model
>>> "fmnist-deit-tiny" in list_zoo()
True
>>> model = create_zoo_model("fmnist-deit-tiny")   # random weights; see load_default_model()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from .errors import UsageError, unknown_choice


@dataclass(frozen=True)
class Recipe:
    """Float pretraining recipe (AdamW, one-cycle schedule, label smoothing, shift/flip augmentation)."""

    epochs: int = 40
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    label_smoothing: float = 0.1
    max_shift: int = 2
    seed: int = 0
    holdout: int = 0  # training images never trained on: the validation split (see data.VALIDATION_SIZE)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    timm_name: str
    kwargs: dict[str, Any]
    data: str = "fmnist"
    input_size: int = 28  # side of the tensor fed to the model (Fashion-MNIST is padded up to it)
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""


_ZOO: dict[str, ZooEntry] = {}


def register_zoo(entry: ZooEntry) -> ZooEntry:
    if entry.name in _ZOO:
        raise ValueError(f"zoo entry {entry.name!r} registered twice")
    _ZOO[entry.name] = entry
    return entry


def list_zoo() -> list[str]:
    return sorted(_ZOO)


def get_zoo_entry(name: str) -> ZooEntry:
    if name not in _ZOO:
        raise unknown_choice("zoo model", name, _ZOO)
    return _ZOO[name]


def create_zoo_model(name: str, **overrides: Any) -> torch.nn.Module:
    """Build the zoo model ``name`` with random weights (timm ``pretrained=False``)."""
    entry = get_zoo_entry(name)
    kwargs = {**entry.kwargs, **overrides}
    return timm.create_model(entry.timm_name, pretrained=False, **kwargs)


_FMNIST_VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, drop_path_rate=0.1)

register_zoo(ZooEntry(
    name="fmnist-deit-tiny",
    timm_name="vit_tiny_patch16_224",
    kwargs=dict(_FMNIST_VIT, embed_dim=192, num_heads=3, depth=12),
    description="DeiT-Tiny structure (12 blocks, embed 192, 3 heads), 28x28x1 input, 4x4 patches",
))
register_zoo(ZooEntry(
    name="fmnist-vit-small",
    timm_name="vit_small_patch16_224",
    kwargs=dict(_FMNIST_VIT, embed_dim=384, num_heads=6, depth=12),
    description="ViT-Small structure (12 blocks, embed 384, 6 heads), 28x28x1 input, 4x4 patches",
))
register_zoo(ZooEntry(
    name="fmnist-swin-tiny",
    timm_name="swin_tiny_patch4_window7_224",
    # 28x28 images padded to 32x32, 2x2 patches: stages at 16, 8, 4, 2 tokens per side, windows of 4
    # (timm shrinks the last stage's window to 2), so all four Swin-T stages (2, 2, 6, 2 blocks) are used.
    kwargs=dict(img_size=32, patch_size=2, in_chans=1, num_classes=10, window_size=4,
                drop_path_rate=0.1),
    input_size=32,
    description="Swin-Tiny structure (depths 2-2-6-2, embed 96), 28x28x1 padded to 32, 2x2 patches",
))


register_zoo(ZooEntry(
    name="fmnist-swin-micro",
    timm_name="swin_tiny_patch4_window7_224",
    # Swin's op structure at a CPU-trainable size: 28x28 padded to 32x32, 2x2 patches, windows of 4;
    # three stages at 16, 8, 4 tokens per side (shifted windows with their masks in the first two),
    # two patch mergings, 10 blocks (2-6-2), embed 64: 10 Softmax, 10 GELU, 24 LayerNorm, 3.0 M params.
    kwargs=dict(img_size=32, patch_size=2, in_chans=1, num_classes=10, window_size=4, embed_dim=64,
                depths=(2, 6, 2), num_heads=(2, 4, 8), drop_path_rate=0.1),
    input_size=32,
    recipe=Recipe(epochs=18, holdout=5000),
    description="Swin structure at CPU size (depths 2-6-2, embed 64, windows 4), 28x28x1 padded to 32, 2x2 patches",
))
register_zoo(ZooEntry(
    name="fmnist-vit-deep",
    timm_name="vit_tiny_patch16_224",
    # Deeper and narrower than the default (16 blocks of width 64 instead of 12 of 192): more slots in
    # series for quantization error to propagate through (16 Softmax, 16 GELU, 33 LayerNorm) and
    # fewer channels per LayerNorm row, so one outlier channel weighs more in its statistics. Width 64
    # (0.8 M parameters) keeps the recipe near 2 CPU-hours: 12 epochs took 81 min on one thread with
    # the other core busy (width 96 took 20 min per epoch: 4 h for 12). Shipped: 82.82 % float top-1.
    kwargs=dict(_FMNIST_VIT, embed_dim=64, num_heads=2, depth=16),
    recipe=Recipe(epochs=12, holdout=5000),
    description="deeper, narrower ViT (16 blocks, embed 64, 2 heads), 28x28x1 input, 4x4 patches",
))


WEIGHTS_DIR = Path(__file__).parent / "weights"


def default_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def missing_weights(name: str, what: str = "", fix: str = "pass --checkpoint PATH") -> UsageError:
    """The one-line error for a zoo model without its weights file; ``what`` says where the name
    came from (e.g. " of studies/x.toml"), ``fix`` is the second way out besides pretraining it."""
    return UsageError(f"no weights for zoo model {name!r}{what}: run 'mnq-search pretrain {name}' "
                      f"first, or {fix}")


def shipped_record(name: str) -> dict | None:
    """The training record shipped next to a zoo model's weights (epochs, float top-1 on the test
    set, time, device), or None when the model has no shipped weights."""
    if not default_weights_path(name).is_file():
        return None
    rec = WEIGHTS_DIR / f"{name}.json"
    return json.loads(rec.read_text()) if rec.is_file() else {}
