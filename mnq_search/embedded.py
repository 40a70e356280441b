"""The images of the default run, shipped inside the package: ``make run`` needs no data set.

``mnq_search/assets/fmnist_default_subset.npz`` holds exactly the Fashion-MNIST images the default
run reads: the 2,000 test images of the fixed seeded evaluation subset and the 128 calibration
images (from the training split, outside the validation split), with their labels and their
indices in the full splits. Fashion-MNIST (Zalando Research) is MIT-licensed.

:class:`EmbeddedFmnistSource` serves them when the full data set is not installed. It gives the
same batches as :class:`~mnq_search.data.FmnistSource` for any evaluation subset of at most 2,000
images and any calibration set of at most 128 (the seeded subsets are nested: a smaller one is
part of the larger). Anything else (``--eval-size all``, QAT, the validation split) needs the full
data set, and :meth:`EmbeddedFmnistSource.require` says so before any work starts.

Rebuild the file from the full data set with ``python -m mnq_search.embedded``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import (CALIB_SEED, EVAL_SEED, FMNIST_HINT, DataSource, FmnistSource, TensorSplit, calibration_indices,
                   iterate_batches, seeded_subset)
from .errors import UsageError

EMBEDDED_FILE = Path(__file__).parent / "assets" / "fmnist_default_subset.npz"
EVAL_IMAGES = 2000  # the default --eval-size
CALIB_IMAGES = 128  # the default --calib-size
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000


def write_embedded_subset(source: FmnistSource, path: str | Path = EMBEDDED_FILE) -> Path:
    """Write the default run's images of ``source`` (the full data set) to ``path`` (npz, compressed)."""
    from .io import atomic_path

    test_idx = seeded_subset(len(source.test), EVAL_IMAGES, EVAL_SEED)
    calib_idx = calibration_indices(len(source.train), CALIB_IMAGES, CALIB_SEED)
    test, calib = source.test.subset(test_idx), source.train.subset(calib_idx)
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, test_index=test_idx.numpy(), test_images=test.images.numpy(),
                                test_labels=test.labels.numpy(), calib_index=calib_idx.numpy(),
                                calib_images=calib.images.numpy(), calib_labels=calib.labels.numpy())
    return Path(path)


def _need_full(what: str) -> UsageError:
    return UsageError(f"{what} needs the full Fashion-MNIST (only the default run's {EVAL_IMAGES} test and "
                      f"{CALIB_IMAGES} calibration images ship with mnq-search): {FMNIST_HINT}")


class EmbeddedFmnistSource(DataSource):
    """The default run's Fashion-MNIST images from the package (see the module docstring)."""

    spec = "fmnist"  # reopening a run's data finds the full set if it is there since, else this again

    def __init__(self, pad_to: int | None = None, path: str | Path = EMBEDDED_FILE):
        with np.load(path) as z:
            self.test_index = torch.from_numpy(z["test_index"]).long()
            self.test = TensorSplit(torch.from_numpy(z["test_images"]), torch.from_numpy(z["test_labels"]).long())
            self.calib_index = torch.from_numpy(z["calib_index"]).long()
            self.calib = TensorSplit(torch.from_numpy(z["calib_images"]),
                                     torch.from_numpy(z["calib_labels"]).long())
        self.pad_to = pad_to
        self.embedded = True

    @property
    def train_size(self) -> int:
        return TRAIN_SIZE

    def require(self, eval_size: int | None = None, calib_size: int = 0, training: bool = False,
                validation: int = 0) -> None:
        if eval_size is None or eval_size > EVAL_IMAGES:
            raise _need_full("--eval-size all" if eval_size is None else f"--eval-size {eval_size}")
        if calib_size > CALIB_IMAGES:
            raise _need_full(f"--calib-size {calib_size}")
        if training:
            raise _need_full("training (QAT)")
        if validation:
            raise _need_full("the validation split")

    @staticmethod
    def _select(split: TensorSplit, have: torch.Tensor, want: torch.Tensor) -> TensorSplit:
        pos = torch.searchsorted(have, want)
        if bool((pos >= len(have)).any()) or not torch.equal(have[pos.clamp(max=len(have) - 1)], want):
            raise UsageError("internal: the embedded subset does not hold the requested images")
        return split.subset(pos)

    def calib_batches(self, n, batch_size, seed=CALIB_SEED):
        if n > CALIB_IMAGES or seed != CALIB_SEED:
            raise _need_full(f"{n} calibration images")
        want = calibration_indices(TRAIN_SIZE, n, seed)
        return iterate_batches(self._select(self.calib, self.calib_index, want), batch_size, self.pad_to)

    def eval_batches(self, n, batch_size, seed=EVAL_SEED):
        if n is None or n > EVAL_IMAGES or seed != EVAL_SEED:
            raise _need_full("all test images" if n is None else f"{n} test images")
        want = seeded_subset(TEST_SIZE, n, seed)
        return iterate_batches(self._select(self.test, self.test_index, want), batch_size, self.pad_to)

    def eval_size(self, n):
        return min(EVAL_IMAGES if n is None else n, EVAL_IMAGES)

    def validation_batches(self, n, batch_size):
        raise _need_full("the validation split")

    def train_batches(self, *args, **kwargs):
        raise _need_full("training (QAT)")


if __name__ == "__main__":  # python -m mnq_search.embedded [PATH]: rebuild from the full data set
    import sys

    out = write_embedded_subset(FmnistSource(), sys.argv[1] if len(sys.argv) > 1 else EMBEDDED_FILE)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
