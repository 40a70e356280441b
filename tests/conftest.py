"""Shared test set-up: CPU by default, two threads, deterministic seeds, no downloads."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICE = os.environ.get("TORCH_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _full_fmnist() -> bool:
    from mnq_search.data import find_fmnist
    from mnq_search.errors import UsageError

    try:
        find_fmnist(None)
        return True
    except UsageError:
        return False


FULL_FMNIST = _full_fmnist()
needs_full_fmnist = pytest.mark.skipif(
    not FULL_FMNIST, reason="needs the full Fashion-MNIST (Debian package dataset-fashion-mnist, or MNQ_FMNIST_DIR); "
                            "only the default run's images ship with the package")
