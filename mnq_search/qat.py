"""Quantization-aware training (QAT) of a converted model: STE, AdamW, warm-up + cosine schedule.

The paper's accuracy comes from QAT after the assignment is chosen (STE, AdamW; I-ViT's recipe:
lr 1e-6 on ImageNet, min lr = lr/15, cosine, weight decay 1e-4, batch 128, drop-path 0.1, label
smoothing 0.1). Activation ranges keep following the batches during training (EMA), frozen in
evaluation. Optional knowledge distillation from the float model (logits KL; not in the paper).

Exact resume: the data order and augmentation of an epoch are functions of (seed, epoch), and
a checkpoint written after every epoch holds the model (weights, ranges, calibrated state), the
optimizer, the step, the history and the RNG states, so a run interrupted anywhere and resumed
from its last checkpoint ends with the weights of an uninterrupted run.

Data parallel under ``torchrun --nproc-per-node N``: DDP averages gradients; observers reduce
their batch ranges across ranks, so N processes with a global batch B compute what one process
with batch B computes. Rank 0 alone writes files and shows progress.

Mixed precision on CUDA: TF32 matmuls (8-bit integer operands and their fp32 sums are exact in
TF32, so the quantizer arithmetic is unchanged); bf16 autocast is *not* used for the quantized
model (it rounds the accumulators), only for a distillation teacher.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist
from .calibrate import evaluate
from .convert import QuantModel
from .data import DataSource
from .errors import UsageError
from .io import atomic_path, atomic_write_text, csv_text

HISTORY_FIELDS = ("epoch", "step", "loss", "top1", "images_per_s", "osc_rate")


@dataclass
class QATConfig:
    epochs: int = 1
    steps: int | None = None  # total optimizer steps; overrides epochs (short QAT rounds)
    lr: float = 5e-5
    min_lr_ratio: float = 1 / 15
    warmup_frac: float = 0.05
    weight_decay: float = 1e-4
    batch_size: int = 128
    label_smoothing: float = 0.1
    distill: bool = False
    distill_alpha: float = 0.5  # loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)
    distill_temp: float = 1.0
    holdout: int | None = None  # training images held out (None: the validation split; at least that)
    seed: int = 0
    eval_every_steps: int | None = None  # also evaluate every K steps (for pruners), not only per epoch
    recipe: str = "plain"  # "vvtq": oscillation tracking and the variation-aware regulariser (mnq_search.vvtq)
    vvtq_strength: float = 0.01  # the regulariser's final strength (VVTQ's schedule)
    vvtq_freeze: float | None = None  # freeze weights whose EMA oscillation frequency exceeds this
    vvtq_lsq: bool = False  # vvtq: learn the weight steps (LSQ, module-dependent granularity)
    multicrop: int = 0  # > 0: multi-crop KD from this many cached teacher crops per image (replaces CE)
    multicrop_top_k: int = 5  # soft-label classes cached per crop
    multicrop_cache: str | None = None  # the soft-label cache file (default: <out>/soft_labels.pt)

    def validate(self) -> None:
        from .vvtq._recipe import RECIPES

        if self.recipe not in RECIPES:
            raise UsageError(f"--qat-recipe: choose from {', '.join(RECIPES)} (got {self.recipe!r})")
        if self.vvtq_strength < 0:
            raise UsageError(f"--vvtq-strength must be non-negative, got {self.vvtq_strength}")
        if self.vvtq_lsq and self.recipe != "vvtq":
            raise UsageError("--vvtq-lsq is part of --qat-recipe vvtq")
        if self.vvtq_freeze is not None and not 0 <= self.vvtq_freeze < 1:
            raise UsageError(f"--vvtq-freeze must be in [0, 1), got {self.vvtq_freeze}")
        if self.multicrop < 0 or self.multicrop_top_k <= 0:
            raise UsageError(f"--multicrop must be >= 0 and --multicrop-top-k positive, got {self.multicrop}, "
                             f"{self.multicrop_top_k}")
        if self.multicrop and self.distill:
            raise UsageError("--multicrop already distils from the cached teacher outputs; drop --distill")
        if self.multicrop_cache is not None and not str(self.multicrop_cache).endswith((".pt", ".npz")):
            raise UsageError(f"--multicrop-cache files end in .pt or .npz, got {self.multicrop_cache}")
        if self.epochs <= 0 and not self.steps:
            raise UsageError(f"--epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps <= 0:
            raise UsageError(f"--steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.eval_every_steps is not None and self.eval_every_steps <= 0:
            raise UsageError(f"--qat-eval-every must be positive, got {self.eval_every_steps}")
        if self.batch_size <= 0 or self.batch_size % dist.world():
            raise UsageError(f"--batch-size must be a positive multiple of the {dist.world()} processes, "
                             f"got {self.batch_size}")


def lr_at(step: int, total: int, cfg: QATConfig) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine from lr to lr * min_lr_ratio."""
    warm = max(1, int(total * cfg.warmup_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's convention: no weight decay on biases, norm weights, tokens and position embeddings."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "dist_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def history_csv(rows: list[dict]) -> str:
    return csv_text(HISTORY_FIELDS, rows)


def train_qat(qmodel: QuantModel, data: DataSource, cfg: QATConfig, device: str = "cpu",
              out: str | Path | None = None, teacher: torch.nn.Module | None = None, resume: bool = False,
              eval_fn: Callable[[QuantModel], float] | None = None,
              on_eval: Callable[[int, float], None] | None = None, progress: bool = True,
              stop_after_steps: int | None = None) -> list[dict]:
    """Train ``qmodel`` (calibrated) in place; returns the history (one row per evaluation).

    Args:
        qmodel: the converted, calibrated model (on ``device``).
        data: training batches come from ``data.train_batches`` (minus ``cfg.holdout`` images, at
            least the validation split).
        out: folder for ``checkpoint.pt`` and ``history.csv`` (rank 0), or None for no files.
        teacher: the float model for ``cfg.distill`` and ``cfg.multicrop`` (its soft labels are cached
            once: ``cfg.multicrop_cache``, else ``out/soft_labels.pt``, and per process).
        resume: continue from ``out/checkpoint.pt`` if it exists.
        eval_fn: returns the top-1 of the model (after each epoch, at the end of a ``steps`` run, and
            every ``cfg.eval_every_steps`` steps).
        on_eval: called with (step, top1) after each evaluation (e.g. an Optuna pruner's report).
        stop_after_steps: stop (as if interrupted) after this many steps in this call (tests).
    """
    cfg.validate()
    if (cfg.distill or cfg.multicrop) and teacher is None:
        raise UsageError("--distill and --multicrop need the float model as teacher")
    holdout = data.check_holdout(cfg.holdout)  # never train on the validation split
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size, holdout)
    if steps_per_epoch <= 0:
        raise UsageError(f"training data is smaller than one batch of {cfg.batch_size}")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = qmodel
    ddp = None
    if dist.is_dist():
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                                      broadcast_buffers=False)
    recipe = None
    if cfg.recipe == "vvtq":  # before the optimizer: with LSQ, the recipe adds the step parameters
        from .vvtq._recipe import VvtqOptions, VvtqRecipe

        recipe = VvtqRecipe(model, VvtqOptions(max_strength=cfg.vvtq_strength, freeze_threshold=cfg.vvtq_freeze,
                                               lsq=cfg.vvtq_lsq), total, epochs)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    history: list[dict] = []
    step, start_epoch = 0, 0
    ckpt_path = Path(out) / "checkpoint.pt" if out else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        st = torch.load(ckpt_path, map_location=device, weights_only=False)
        if st.get("config") != asdict(cfg):
            raise UsageError(f"{ckpt_path} was written with other QAT settings; resume with the same ones")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, start_epoch, history = st["step"], st["epoch"], st["history"]
        _set_rng_state(st["rng"])
    else:
        torch.manual_seed(cfg.seed)
    if recipe is not None and step > 0:
        raise UsageError("resuming a --qat-recipe vvtq run is not supported yet (its oscillation counts are not "
                         "checkpointed): start it again")

    crops = _soft_labels(data, holdout, cfg, teacher, device, out, progress) if cfg.multicrop else None

    steps_this_call = 0
    for epoch in range(start_epoch, epochs):
        model.train()
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"QAT epoch {epoch + 1}/{epochs}",
                   disable=not (progress and dist.is_main()), leave=False, mininterval=2)
        batches = (_crop_batches(crops, epoch, cfg) if crops is not None
                   else data.train_batches(epoch, cfg.batch_size, cfg.seed, holdout, dist.rank(), dist.world()))
        for x, y in batches:
            if step >= total:
                break
            x = x.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            logits = (ddp or model)(x)
            if crops is not None:  # y: the crops' cached teacher soft labels
                from .vvtq import kd_loss

                loss = kd_loss(logits, y)
            else:
                y = y.to(device, non_blocking=True)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if cfg.distill:
                with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                                     enabled=device.startswith("cuda")):
                    t_logits = teacher(x).float()
                kl = F.kl_div(F.log_softmax(logits / cfg.distill_temp, -1), F.log_softmax(t_logits / cfg.distill_temp, -1),
                              reduction="batchmean", log_target=True) * cfg.distill_temp**2
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
            if recipe is not None:
                reg = recipe.penalty(step)
                if reg is not None:
                    loss = loss + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if recipe is not None:
                recipe.after_step()
            step += 1
            steps_this_call += 1
            seen += x.shape[0] * dist.world()
            loss_sum += loss.item()
            n_loss += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n_loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            k = cfg.eval_every_steps
            if k and eval_fn is not None and step % k == 0 and step % steps_per_epoch and step < total:
                top1 = eval_fn(model) if dist.is_main() else None  # mid-epoch evaluation
                if on_eval is not None and top1 is not None:
                    on_eval(step, top1)
                history.append(dict(epoch=epoch + 1, step=step, loss=round(loss_sum / n_loss, 5),
                                    top1=None if top1 is None else round(top1, 3),
                                    images_per_s=round(seen / max(time.perf_counter() - t0, 1e-9), 1)))
                model.train()
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                bar.close()
                return history
        bar.close()
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        top1 = None
        if eval_fn is not None:
            top1 = eval_fn(model) if dist.is_main() else None
            if on_eval is not None and top1 is not None:
                on_eval(step, top1)
        history.append(dict(epoch=epoch + 1, step=step, loss=round(loss_sum / max(n_loss, 1), 5),
                            top1=None if top1 is None else round(top1, 3), images_per_s=round(rate, 1),
                            osc_rate=None if recipe is None else round(recipe.end_epoch(epoch + 1), 6)))
        if recipe is not None and out is not None and dist.is_main():
            atomic_write_text(Path(out) / "oscillation.csv",
                              csv_text(("epoch", "layer", "rate", "mean_frequency", "frozen"), recipe.epoch_rows))
        if ckpt_path is not None and dist.is_main():
            with atomic_path(ckpt_path) as tmp:
                torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, epoch=epoch + 1,
                                history=history, rng=_rng_state(), config=asdict(cfg)), tmp)
            atomic_write_text(Path(out) / "history.csv", history_csv(history))
        dist.barrier()
        if step >= total:
            break
    return history


def _soft_labels(data: DataSource, holdout: int, cfg: QATConfig, teacher, device: str, out, progress: bool):
    """(uint8 training images, their input transform, the soft-label cache): loaded from
    ``cfg.multicrop_cache`` (or ``<out>/soft_labels.pt``) when it holds these images with enough crops
    and classes, else built by running the teacher once per crop and saved there."""
    from .vvtq import SoftLabelCache, build_soft_label_cache

    key = (id(data), id(teacher), holdout, cfg.multicrop, cfg.multicrop_top_k, cfg.seed, str(device))
    if key in _SOFT_LABELS:  # the short QAT rounds of a search share one cache
        return _SOFT_LABELS[key][2:]
    images, transform = data.train_images_u8(holdout)
    images = images.to(device)
    path = Path(cfg.multicrop_cache) if cfg.multicrop_cache else (Path(out) / "soft_labels.pt" if out else None)
    if path is not None and path.is_file():
        cache = SoftLabelCache.load(path)
        cache.check_images(images)
        if (cache.num_crops != cfg.multicrop or cache.top_k != cfg.multicrop_top_k
                or cache.meta.get("seed") != cfg.seed or cache.meta.get("holdout") != holdout):
            raise UsageError(f"{path} holds {cache.num_crops} crops x top-{cache.top_k} (seed "
                             f"{cache.meta.get('seed')}, holdout {cache.meta.get('holdout')}); this run asks "
                             f"{cfg.multicrop} x top-{cfg.multicrop_top_k} (seed {cfg.seed}, holdout {holdout}): "
                             "remove it or name another --multicrop-cache")
        _SOFT_LABELS[key] = teacher, data, images, transform, cache  # the references keep the ids unique
        return images, transform, cache
    cache = build_soft_label_cache(teacher, images, cfg.multicrop, cfg.multicrop_top_k, seed=cfg.seed,
                                   transform=transform, progress=progress and dist.is_main())
    cache.meta["holdout"] = holdout  # which training images: the kept part of the train split
    if path is not None and dist.is_main():
        cache.save(path)
    _SOFT_LABELS[key] = teacher, data, images, transform, cache  # the references keep the ids unique
    return images, transform, cache


_SOFT_LABELS: dict = {}  # soft-label caches built or loaded in this process


def _crop_batches(crops, epoch: int, cfg: QATConfig):
    """One epoch of (student input, soft targets): one cached crop per image, full batches only, this
    rank's interleaved slice of each global batch."""
    from .vvtq import SoftTargets, epoch_batches

    images, transform, cache = crops
    r, w = dist.rank(), dist.world()
    for b in epoch_batches(cache, images, epoch, cfg.batch_size, 1, cfg.seed):
        if b.images.shape[0] < cfg.batch_size:
            return
        t = b.targets
        yield transform(b.images[r::w]), SoftTargets(t.indices[r::w], t.probs[r::w], t.rest[r::w], t.temperature)


def make_eval_fn(data: DataSource, eval_size: int | None, batch_size: int, device: str, validation: bool = False,
                 progress: bool = False) -> Callable[[QuantModel], float]:
    """top-1 on the test split's fixed subset, or on ``eval_size`` images of the validation split
    (``validation``); the full result of the latest call (top-5, image count) is kept in ``fn.last``."""

    def fn(model) -> float:
        batches = data.validation_batches(eval_size, batch_size) if validation else data.eval_batches(eval_size, batch_size)
        fn.last = evaluate(model, batches, device, progress, "eval", keep_correct=True)
        return fn.last["top1"]

    fn.last = None
    return fn
