"""Float pretraining of zoo models by their seeded recipe (``mnq-search pretrain NAME``).

The whole data set is held on the device as uint8 tensors; each epoch is a seeded permutation cut
into batches, augmented on the device (:meth:`FmnistSource.train_batches`; under ``torchrun`` each
rank trains on its slice of every global batch). AdamW with a one-cycle schedule (linear warm-up, cosine
decay), label smoothing, bf16 autocast (on CUDA, and on CPUs too: AMX/AVX512-bf16 makes it about
1.4x faster than fp32 on this project's CPU machines). A training state is saved after every epoch
(``state.pt``) so an interrupted run resumes where it stopped; the final weights are written as
fp16 safetensors with the recipe and the measured test top-1 in the file's metadata.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist
from .data import FmnistSource, TensorSplit, iterate_batches, seeded_subset
from .errors import UsageError
from .io import atomic_path, atomic_write_json, save_weights
from .zoo import Recipe, ZooEntry, create_zoo_model, get_zoo_entry


@torch.inference_mode()
def evaluate_float(model: torch.nn.Module, split: TensorSplit, pad_to: int | None, device,
                   batch_size: int = 1000, bf16: bool = False) -> float:
    """Top-1 (percent) of ``model`` on a Fashion-MNIST split (fp32 unless ``bf16``)."""
    model.eval()
    correct = 0
    for x, y in iterate_batches(split, batch_size, pad_to, device):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(split)


def one_cycle_lr(step: int, total: int, base_lr: float, warmup_frac: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_frac`` of the steps, then cosine decay to 0."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base_lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def pretrain(name: str, out: str | Path, epochs: int | None = None, device: str = "cpu",
             data_path: str | None = None, resume: bool = True, quiet: bool = False,
             train_size: int | None = None, test_size: int | None = None) -> dict:
    """Train zoo model ``name`` from scratch by its recipe; returns the result record.

    Data parallel under ``torchrun`` (each rank a slice of every global batch, the same
    augmentation as one process). Writes ``out/state.pt`` after each epoch, then
    ``out/<name>.safetensors`` (fp16) and ``out/<name>.json`` (recipe, per-epoch top-1, time, device).
    ``train_size`` trains on a fixed subset of the training split (tests, quick looks).
    """
    entry: ZooEntry = get_zoo_entry(name)
    recipe: Recipe = entry.recipe
    epochs = epochs or recipe.epochs
    out = Path(out)
    device = dist.init(device)
    dev = torch.device(device)
    data = FmnistSource(data_path, pad_to=entry.input_size if entry.input_size != 28 else None)
    holdout = len(data.train) - train_size if train_size else recipe.holdout
    if recipe.batch_size % dist.world():
        raise UsageError(f"the batch of {recipe.batch_size} does not split over {dist.world()} processes")
    data.train = data.train.to(dev)
    steps_per_epoch = max(1, data.steps_per_epoch(recipe.batch_size, holdout))
    total = steps_per_epoch * epochs

    torch.manual_seed(recipe.seed)
    model = create_zoo_model(name).to(dev)
    ddp = None
    if dist.is_dist():
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0
    state_file = out / "state.pt"
    if resume and state_file.is_file():
        st = torch.load(state_file, map_location=dev, weights_only=False)
        if st["name"] == name and st["epochs"] == epochs:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start_epoch, history, elapsed = st["epoch"], st["history"], st["elapsed"]
            if "rng" in st:  # states written before the RNG was saved resume with a fresh one
                torch.set_rng_state(st["rng"])
            if not quiet and dist.is_main():
                print(f"resuming {name} at epoch {start_epoch}/{epochs}")

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{epochs}",
                   disable=quiet or not dist.is_main(), mininterval=10, leave=False)
        loss_sum = 0.0
        for i, (x, y) in enumerate(data.train_batches(epoch, recipe.batch_size, recipe.seed, holdout,
                                                      dist.rank(), dist.world(), recipe.max_shift)):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(step, total, recipe.lr, recipe.warmup_frac)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy((ddp or model)(x), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            bar.update(1)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        elapsed += time.time() - t0
        if dist.is_main():
            top1 = evaluate_float(model, data.test.subset(seeded_subset(len(data.test), test_size, recipe.seed)),
                                  data.pad_to, dev, bf16=True)
            history.append(dict(epoch=epoch + 1, loss=loss_sum / steps_per_epoch, top1=top1, seconds=round(elapsed, 1)))
            if not quiet:
                print(f"{name} epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f} "
                      f"test top-1 {top1:.2f} % ({elapsed:.0f} s)", flush=True)
            with atomic_path(state_file) as tmp:
                torch.save(dict(name=name, epochs=epochs, epoch=epoch + 1, model=model.state_dict(), opt=opt.state_dict(),
                                history=history, elapsed=elapsed, rng=torch.get_rng_state()), tmp)
        dist.barrier()

    record: dict = {}
    if dist.is_main():
        # The shipped file is fp16: report the top-1 of exactly those weights, evaluated in fp32.
        model.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
        test = data.test.subset(seeded_subset(len(data.test), test_size, recipe.seed))
        record = dict(
            name=name, timm_name=entry.timm_name, kwargs=entry.kwargs, recipe=recipe.__dict__,
            epochs=epochs, train_size=len(data.train) - holdout, test_size=len(test),
            top1=evaluate_float(model, test, data.pad_to, dev), history=history, seconds=round(elapsed, 1),
            world_size=dist.world(),
            device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            torch=torch.__version__, date=_dt.date.today().isoformat(),
        )
        save_weights(model, out / f"{name}.safetensors", metadata={"mnq_search": json.dumps(record)})
        atomic_write_json(out / f"{name}.json", record)
    dist.barrier()
    return record
