"""Data sets: Fashion-MNIST held in memory, ImageNet-style folders, and seeded splits.

A data set is named by a *spec* string:

- ``fmnist`` (default): Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), ``$MNQ_FMNIST_DIR``, or a torchvision download folder;
- ``fmnist:PATH``: the four idx ``.gz`` files in PATH (or PATH/FashionMNIST/raw);
- ``imagefolder:PATH``: an ImageNet-style tree with ``train/`` and ``val/`` class folders (or class
  folders directly in PATH, used for every split), preprocessed with the model's own timm config.

Fashion-MNIST is small enough to hold as uint8 tensors on the device; batches are cut from it and
augmented on the device (random shift by padding and cropping, horizontal flip), with no DataLoader.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UsageError

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FMNIST_HINT = ("install the Debian package 'dataset-fashion-mnist' (apt install dataset-fashion-mnist), "
                "set MNQ_FMNIST_DIR to a folder with the four idx .gz files, or pass --download to "
                "fetch it with torchvision")


def _fmnist_candidates(path: str | None) -> list[Path]:
    if path:
        return [Path(path), Path(path) / "FashionMNIST" / "raw"]
    out = []
    if os.environ.get("MNQ_FMNIST_DIR"):
        out.append(Path(os.environ["MNQ_FMNIST_DIR"]))
    out += [Path("/usr/share/datasets/fashion-mnist"),
            Path.home() / ".cache" / "mnq-search" / "FashionMNIST" / "raw"]
    return out


def find_fmnist(path: str | None = None, download: bool = False) -> Path:
    """Return the folder holding the Fashion-MNIST idx files, or raise a UsageError saying how to get them."""
    for cand in _fmnist_candidates(path):
        if all((cand / f).is_file() for pair in _FMNIST_FILES.values() for f in pair):
            return cand
    if download:
        from torchvision.datasets import FashionMNIST  # optional path, needs internet
        root = Path(path) if path else Path.home() / ".cache" / "mnq-search"
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        return root / "FashionMNIST" / "raw"
    where = path or "the default places"
    raise UsageError(f"Fashion-MNIST not found in {where}: {_FMNIST_HINT}")


def _read_idx(file: Path) -> np.ndarray:
    try:
        with gzip.open(file, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"cannot read {file}: {exc}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UsageError(f"{file} is not an idx uint8 file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UsageError(f"{file} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


@dataclass
class TensorSplit:
    """A split held in memory: ``images`` uint8 (N, 1, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> "TensorSplit":
        return TensorSplit(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> "TensorSplit":
        index = index.to(self.labels.device)
        return TensorSplit(self.images[index], self.labels[index])


def load_fmnist(split: str, path: str | None = None, download: bool = False) -> TensorSplit:
    """Load the Fashion-MNIST ``train`` or ``test`` split as uint8 tensors."""
    if split not in _FMNIST_FILES:
        raise UsageError(f"unknown Fashion-MNIST split {split!r}; choose train or test")
    root = find_fmnist(path, download)
    img_file, lbl_file = _FMNIST_FILES[split]
    images = _read_idx(root / img_file)
    labels = _read_idx(root / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UsageError(f"Fashion-MNIST files in {root} have inconsistent shapes")
    if images.shape[0] == 0:
        raise UsageError(f"Fashion-MNIST {split} split in {root} is empty")
    return TensorSplit(torch.from_numpy(images.copy()).unsqueeze(1),
                       torch.from_numpy(labels.astype(np.int64)))


def normalize_fmnist(images_u8: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """uint8 (N,1,28,28) -> normalized float; optionally zero-pads (in normalized space) to ``pad_to``."""
    x = (images_u8.float() / 255.0 - FMNIST_MEAN) / FMNIST_STD
    if pad_to is not None and pad_to != x.shape[-1]:
        p = (pad_to - x.shape[-1]) // 2
        fill = -FMNIST_MEAN / FMNIST_STD  # the value of a black pixel
        x = torch.nn.functional.pad(x, (p, pad_to - x.shape[-1] - p, p, pad_to - x.shape[-2] - p), value=fill)
    return x


def shift_flip_params(n: int, generator: torch.Generator, max_shift: int = 2) -> tuple[torch.Tensor, ...]:
    """Per-sample (dy, dx, flip) for :func:`augment_shift_flip`, drawn on the CPU from ``generator``."""
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def augment_shift_flip(images_u8: torch.Tensor, generator: torch.Generator | None, max_shift: int = 2,
                       params: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Random shift by up to ``max_shift`` pixels (zero padding, then crop) and horizontal flip, batched.
    ``params`` (from :func:`shift_flip_params`) replaces the draw from ``generator``."""
    n, c, h, w = images_u8.shape
    dev = images_u8.device
    padded = torch.nn.functional.pad(images_u8, (max_shift,) * 4)
    dy, dx, flip = params if params is not None else shift_flip_params(n, generator, max_shift)
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])  # (n, h)
    cols = torch.arange(w, device=dev)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + dx[:, None]  # (n, w)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded[:, 0][idx_n, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1).expand(n, c, h, w) if c == 1 else out


def seeded_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    """The first ``n`` of a seeded permutation of ``range(n_total)`` (all, in order, when n is None)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    if n <= 0:
        raise UsageError(f"subset size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def iterate_batches(split: TensorSplit, batch_size: int, pad_to: int | None = None,
                    device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized ``(images, labels)`` batches in order (for evaluation and calibration)."""
    for start in range(0, len(split), batch_size):
        imgs = split.images[start:start + batch_size].to(device)
        yield normalize_fmnist(imgs, pad_to), split.labels[start:start + batch_size].to(device)


# --- data sources for the pipeline --------------------------------------------------------------

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class DataSource:
    """Calibration images (from the training split), evaluation images (held-out split) and
    training batches, all seeded. Subclasses: :class:`FmnistSource`, :class:`ImageFolderSource`."""

    spec: str = ""

    def calib_batches(self, n: int, batch_size: int, seed: int) -> Batches:
        raise NotImplementedError

    def eval_batches(self, n: int | None, batch_size: int, seed: int) -> Batches:
        raise NotImplementedError

    def eval_size(self, n: int | None) -> int:
        raise NotImplementedError

    def train_batches(self, epoch: int, batch_size: int, seed: int, holdout: int = 0, rank: int = 0,
                      world: int = 1) -> Batches:
        """Augmented training batches of one epoch: a permutation of the training split (minus the
        ``holdout`` images) that depends only on (seed, epoch); each *global* batch of ``batch_size``
        is cut into ``world`` interleaved slices and this rank gets slice ``rank`` (last partial
        batch dropped), with the same augmentation it would get in a single process."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int, holdout: int = 0) -> int:
        raise NotImplementedError

    def holdout_batches(self, n: int, batch_size: int) -> Batches:
        """The ``n`` held-out training images (never used by :meth:`train_batches` with the same
        ``holdout``), for model selection without touching the test split."""
        raise NotImplementedError


HOLDOUT_SEED = 1234  # the held-out part of the training split is fixed, whatever --seed is


def _holdout_split(n_total: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    if holdout < 0 or holdout >= n_total:
        raise UsageError(f"holdout size must be in [0, {n_total}), got {holdout}")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return perm[: n_total - holdout].sort().values, perm[n_total - holdout:].sort().values


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FmnistSource(DataSource):
    def __init__(self, path: str | None = None, pad_to: int | None = None, download: bool = False):
        self.spec = f"fmnist:{path}" if path else "fmnist"
        self.train = load_fmnist("train", path, download)
        self.test = load_fmnist("test", path, download)
        self.pad_to = pad_to

    def calib_batches(self, n, batch_size, seed):
        return iterate_batches(self.train.subset(seeded_subset(len(self.train), n, seed)), batch_size, self.pad_to)

    def eval_batches(self, n, batch_size, seed):
        return iterate_batches(self.test.subset(seeded_subset(len(self.test), n, seed)), batch_size, self.pad_to)

    def eval_size(self, n):
        return len(self.test) if n is None else min(n, len(self.test))

    def steps_per_epoch(self, batch_size, holdout=0):
        return (len(self.train) - holdout) // batch_size

    def train_batches(self, epoch, batch_size, seed, holdout=0, rank=0, world=1, max_shift=2):
        keep, _ = _holdout_split(len(self.train), holdout)
        order = keep[_epoch_order(len(keep), seed, epoch)]
        for step in range(len(order) // batch_size):
            idx = order[step * batch_size:(step + 1) * batch_size]
            g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + step)
            params = [p[rank::world] for p in shift_flip_params(batch_size, g, max_shift)]
            idx = idx[rank::world]
            imgs = augment_shift_flip(self.train.images[idx], None, max_shift, params=tuple(params))
            yield normalize_fmnist(imgs, self.pad_to), self.train.labels[idx]

    def holdout_batches(self, n, batch_size):
        _, held = _holdout_split(len(self.train), n)
        return iterate_batches(self.train.subset(held), batch_size, self.pad_to)


class ImageFolderSource(DataSource):
    """``PATH/train`` and ``PATH/val`` (or class folders directly in PATH, used for both), read with
    torchvision's ImageFolder and the model's own timm eval transform (mean/std, resize, crop)."""

    def __init__(self, path: str, model: torch.nn.Module, workers: int | None = None):
        from torchvision.datasets import ImageFolder
        from timm.data import create_transform, resolve_data_config

        root = Path(path)
        if not root.is_dir():
            raise UsageError(f"image folder not found: {root}")
        cfg = resolve_data_config({}, model=model)
        tf = create_transform(**cfg)
        train_tf = create_transform(**cfg, is_training=True)
        train_dir = root / "train" if (root / "train").is_dir() else root
        val_dir = root / "val" if (root / "val").is_dir() else root
        try:
            self.train = ImageFolder(str(train_dir), transform=tf)
            self.val = self.train if val_dir == train_dir else ImageFolder(str(val_dir), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise UsageError(f"image folder {root} has no images: {str(exc).splitlines()[0]}") from None
        if len(self.train) == 0 or len(self.val) == 0:
            raise UsageError(f"image folder {root} has no images")
        self.train_aug = ImageFolder(str(train_dir), transform=train_tf)
        self.spec = f"imagefolder:{path}"
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers

    def _batches(self, ds, n, batch_size, seed):
        from torch.utils.data import DataLoader, Subset

        sub = Subset(ds, seeded_subset(len(ds), n, seed).tolist())
        return iter(DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=self.workers))

    def calib_batches(self, n, batch_size, seed):
        return self._batches(self.train, n, batch_size, seed)

    def eval_batches(self, n, batch_size, seed):
        return self._batches(self.val, n, batch_size, seed)

    def eval_size(self, n):
        return len(self.val) if n is None else min(n, len(self.val))

    def steps_per_epoch(self, batch_size, holdout=0):
        return (len(self.train) - holdout) // batch_size

    def train_batches(self, epoch, batch_size, seed, holdout=0, rank=0, world=1):
        from torch.utils.data import DataLoader, Subset

        keep, _ = _holdout_split(len(self.train), holdout)
        order = keep[_epoch_order(len(keep), seed, epoch)]
        steps = len(order) // batch_size
        mine = order[: steps * batch_size].view(steps, batch_size)[:, rank::world].reshape(-1)
        torch.manual_seed(seed * 100_003 + epoch + 7919 * rank)  # the random crops of this epoch
        loader = DataLoader(Subset(self.train_aug, mine.tolist()), batch_size=batch_size // world,
                            shuffle=False, num_workers=self.workers, drop_last=True)
        return iter(loader)

    def holdout_batches(self, n, batch_size):
        from torch.utils.data import DataLoader, Subset

        _, held = _holdout_split(len(self.train), n)
        return iter(DataLoader(Subset(self.train, held.tolist()), batch_size=batch_size, num_workers=self.workers))


def open_data(spec: str | None, model: torch.nn.Module, default: str | None = None, input_size: int = 28,
              download: bool = False) -> DataSource:
    """Open the data set named by ``spec`` (or the model's ``default``) for ``model``."""
    spec = spec or default
    if spec is None:
        raise UsageError("this model has no default data set: pass --data imagefolder:PATH")
    kind, _, path = spec.partition(":")
    if kind == "fmnist":
        in_chans = getattr(model, "patch_embed").proj.in_channels if hasattr(model, "patch_embed") else 1
        if in_chans != 1:
            raise UsageError(f"Fashion-MNIST has 1 channel but the model takes {in_chans}: "
                             "use --data imagefolder:PATH")
        return FmnistSource(path or None, pad_to=input_size if input_size != 28 else None, download=download)
    if kind == "imagefolder":
        if not path:
            raise UsageError("--data imagefolder:PATH needs a path")
        return ImageFolderSource(path, model)
    raise UsageError(f"unknown data spec {spec!r}; use fmnist, fmnist:PATH or imagefolder:PATH")
