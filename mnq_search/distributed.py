"""Data parallelism the way timm scales training: ``torchrun --nproc-per-node N mnq-search ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`init` starts the process group (NCCL on
CUDA, gloo on CPU). Rank 0 alone writes files and shows progress. Range observers call
:func:`all_reduce_` so every rank quantizes with the ranges of the *global* batch, which makes a
data-parallel run compute what one process with the same global batch computes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> str:
    """Start the process group when launched by torchrun; returns the device this rank uses."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, min or max) across ranks; a no-op in a single process."""
    if is_dist():
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
