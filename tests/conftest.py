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
