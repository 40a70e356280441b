"""Data sets: Fashion-MNIST held in memory, ImageNet-style folders, and seeded splits.

A data set is named by a *spec* string:

- ``fmnist`` (default): Fashion-MNIST from ``$MNQ_FMNIST_DIR`` if set, else the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or a torchvision download
  folder; when none is there, the default run's own images, which ship with the package
  (:mod:`mnq_search.embedded`);
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
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UsageError
from .preflight import parse_data_spec

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_HINT = ("install the Debian package 'dataset-fashion-mnist' (apt install dataset-fashion-mnist), "
                "set MNQ_FMNIST_DIR to a folder with the four idx .gz files, or pass --download to "
                "fetch it with torchvision")


def _fmnist_candidates(path: str | None) -> list[Path]:
    if path:
        return [Path(path), Path(path) / "FashionMNIST" / "raw"]
    if os.environ.get("MNQ_FMNIST_DIR"):  # set: the only place looked at
        return [Path(os.environ["MNQ_FMNIST_DIR"])]
    out = [Path("/usr/share/datasets/fashion-mnist"),
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
    raise UsageError(f"Fashion-MNIST not found in {where}: {FMNIST_HINT}")


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


VALIDATION_SIZE = 5000  # training images held out of every training run: the validation split
CALIB_SEED = 0  # the calibration images are the same for every --seed (only the search and QAT vary)
EVAL_SEED = 0  # likewise the evaluation subset, so runs compare on one set


class DataSource:
    """Three disjoint sets of images and the training batches, all seeded:

    - **calibration**: a fixed seeded subset of the training split *minus* the validation split;
    - **validation**: :data:`VALIDATION_SIZE` training images (a tenth of a smaller training
      split) held out of every training run (QAT excludes them; the project's own zoo models were
      pretrained without them, the embedded default was not) and used by whatever selects on
      accuracy or loss (Optuna objectives, ``sequential``, ``coordinate``);
    - **evaluation** (test): a fixed seeded subset of the test split, or all of it; only final
      numbers use it.

    Subclasses: :class:`FmnistSource`, :class:`ImageFolderSource`, and the embedded subset
    (:mod:`mnq_search.embedded`)."""

    spec: str = ""

    @property
    def validation_size(self) -> int:
        return validation_size(self.train_size)

    @property
    def num_classes(self) -> int:
        """Classes of the labels (a model's classifier needs at least this many outputs)."""
        return len(FMNIST_CLASSES)

    @property
    def train_size(self) -> int:
        raise NotImplementedError

    def calib_batches(self, n: int, batch_size: int, seed: int = CALIB_SEED) -> Batches:
        raise NotImplementedError

    def eval_batches(self, n: int | None, batch_size: int, seed: int = EVAL_SEED) -> Batches:
        raise NotImplementedError

    def validation_batches(self, n: int, batch_size: int) -> Batches:
        """``n`` images of the validation split (the same n for every call, nested: the first 2,000
        are part of the first 5,000)."""
        raise NotImplementedError

    def require(self, eval_size: int | None = None, calib_size: int = 0, training: bool = False,
                validation: int = 0) -> None:
        """Raise a one-line UsageError now, before any work, if the data set cannot serve a run that
        evaluates ``eval_size`` images (None: all), calibrates on ``calib_size``, trains (QAT), or
        scores ``validation`` images of the validation split."""
        if validation > self.validation_size:
            raise UsageError(f"the validation split has {self.validation_size} images; asked for {validation}")

    def eval_size(self, n: int | None) -> int:
        raise NotImplementedError

    def train_batches(self, epoch: int, batch_size: int, seed: int, holdout: int | None = None, rank: int = 0,
                      world: int = 1) -> Batches:
        """Augmented training batches of one epoch: a permutation of the training split minus the
        ``holdout`` images (None: the validation split; a larger holdout contains it) that depends
        only on (seed, epoch); each *global* batch of ``batch_size`` is cut into ``world`` interleaved
        slices and this rank gets slice ``rank`` (last partial batch dropped), with the same
        augmentation it would get in a single process."""
        raise NotImplementedError

    def train_images_u8(self, holdout: int | None = None) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(the kept training images as uint8 (N, C, H, W), the function that turns uint8 images into
        model inputs): what multi-crop distillation crops from. In-memory data sets only."""
        raise UsageError(f"multi-crop distillation needs an in-memory data set (Fashion-MNIST); {self.spec} is not")

    def steps_per_epoch(self, batch_size: int, holdout: int | None = None) -> int:
        return (self.train_size - (self.validation_size if holdout is None else holdout)) // batch_size

    def check_holdout(self, holdout: int | None) -> int:
        """The training images a QAT run holds out: at least the validation split."""
        holdout = self.validation_size if holdout is None else holdout
        if holdout < self.validation_size:
            raise UsageError(f"a training run must hold out at least the {self.validation_size} validation "
                             f"images, got {holdout}")
        return holdout


HOLDOUT_SEED = 1234  # the held-out part of the training split is fixed, whatever --seed is


def validation_size(n_train: int) -> int:
    """:data:`VALIDATION_SIZE`, or a tenth of a training split smaller than ten times that."""
    return min(VALIDATION_SIZE, n_train // 10)


def _holdout_split(n_total: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices: the last ``holdout`` of one fixed permutation are held out, so a
    smaller holdout is part of a larger one (the validation split is part of every training holdout)."""
    if holdout < 0 or holdout >= n_total:
        raise UsageError(f"holdout size must be in [0, {n_total}), got {holdout}")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return perm[: n_total - holdout].sort().values, perm[n_total - holdout:].sort().values


def calibration_indices(n_train: int, n: int, seed: int = CALIB_SEED) -> torch.Tensor:
    """The calibration images: a seeded subset of the training split outside the validation split."""
    keep, _ = _holdout_split(n_train, validation_size(n_train))
    return keep[seeded_subset(len(keep), n, seed)]


def validation_indices(n_train: int, n: int) -> torch.Tensor:
    """``n`` images of the validation split (the last n of the holdout permutation: nested)."""
    size = validation_size(n_train)
    if not 0 < n <= size:
        raise UsageError(f"the validation split has {size} images; asked for {n}")
    return _holdout_split(n_train, n)[1]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FmnistSource(DataSource):
    def __init__(self, path: str | None = None, pad_to: int | None = None, download: bool = False):
        self.spec = f"fmnist:{path}" if path else "fmnist"
        self.train = load_fmnist("train", path, download)
        self.test = load_fmnist("test", path, download)
        self.pad_to = pad_to

    @property
    def train_size(self):
        return len(self.train)

    def calib_batches(self, n, batch_size, seed=CALIB_SEED):
        return iterate_batches(self.train.subset(calibration_indices(len(self.train), n, seed)), batch_size,
                               self.pad_to)

    def eval_batches(self, n, batch_size, seed=EVAL_SEED):
        return iterate_batches(self.test.subset(seeded_subset(len(self.test), n, seed)), batch_size, self.pad_to)

    def validation_batches(self, n, batch_size):
        return iterate_batches(self.train.subset(validation_indices(len(self.train), n)), batch_size, self.pad_to)

    def eval_size(self, n):
        return len(self.test) if n is None else min(n, len(self.test))

    def train_images_u8(self, holdout=None):
        keep, _ = _holdout_split(len(self.train), self.validation_size if holdout is None else holdout)
        return self.train.images[keep], lambda u8: normalize_fmnist(u8, self.pad_to)

    def train_batches(self, epoch, batch_size, seed, holdout=None, rank=0, world=1, max_shift=2):
        keep, _ = _holdout_split(len(self.train), self.validation_size if holdout is None else holdout)
        order = keep[_epoch_order(len(keep), seed, epoch)]
        for step in range(len(order) // batch_size):
            idx = order[step * batch_size:(step + 1) * batch_size]
            g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + step)
            params = [p[rank::world] for p in shift_flip_params(batch_size, g, max_shift)]
            idx = idx[rank::world]
            imgs = augment_shift_flip(self.train.images[idx], None, max_shift, params=tuple(params))
            yield normalize_fmnist(imgs, self.pad_to), self.train.labels[idx]



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

    @property
    def train_size(self):
        return len(self.train)

    @property
    def num_classes(self):
        return len(self.train.classes)

    def _loader(self, ds, index: torch.Tensor, batch_size: int):
        from torch.utils.data import DataLoader, Subset

        return iter(DataLoader(Subset(ds, index.tolist()), batch_size=batch_size, shuffle=False,
                               num_workers=self.workers))

    def calib_batches(self, n, batch_size, seed=CALIB_SEED):
        return self._loader(self.train, calibration_indices(len(self.train), n, seed), batch_size)

    def eval_batches(self, n, batch_size, seed=EVAL_SEED):
        return self._loader(self.val, seeded_subset(len(self.val), n, seed), batch_size)

    def validation_batches(self, n, batch_size):
        return self._loader(self.train, validation_indices(len(self.train), n), batch_size)

    def eval_size(self, n):
        return len(self.val) if n is None else min(n, len(self.val))

    def train_batches(self, epoch, batch_size, seed, holdout=None, rank=0, world=1):
        from torch.utils.data import DataLoader, Subset

        keep, _ = _holdout_split(len(self.train), self.validation_size if holdout is None else holdout)
        order = keep[_epoch_order(len(keep), seed, epoch)]
        steps = len(order) // batch_size
        mine = order[: steps * batch_size].view(steps, batch_size)[:, rank::world].reshape(-1)
        torch.manual_seed(seed * 100_003 + epoch + 7919 * rank)  # the random crops of this epoch
        loader = DataLoader(Subset(self.train_aug, mine.tolist()), batch_size=batch_size // world,
                            shuffle=False, num_workers=self.workers, drop_last=True)
        return iter(loader)


def open_data(spec: str | None, model: torch.nn.Module, default: str | None = None, input_size: int = 28,
              download: bool = False) -> DataSource:
    """Open the data set named by ``spec`` (or the model's ``default``) for ``model``."""
    spec = spec or default
    if spec is None:
        raise UsageError("this model has no default data set: pass --data imagefolder:PATH")
    kind, path = parse_data_spec(spec)
    if kind == "fmnist":
        in_chans = getattr(model, "patch_embed").proj.in_channels if hasattr(model, "patch_embed") else 1
        if in_chans != 1:
            raise UsageError(f"Fashion-MNIST has 1 channel but the model takes {in_chans}: "
                             "use --data imagefolder:PATH")
        pad_to = input_size if input_size != 28 else None
        if not path and not download:
            try:
                find_fmnist(None)
            except UsageError:  # not installed: the default run's images ship with the package
                from .embedded import EmbeddedFmnistSource

                return EmbeddedFmnistSource(pad_to)
        return FmnistSource(path or None, pad_to=pad_to, download=download)
    return ImageFolderSource(path, model)
