"""Multi-crop knowledge distillation with cached teacher soft labels (VVTQ: Huang, Shen, Dong, Cheng,
"Quantization Variation: A New Perspective on Training Transformers with Low-Bit Precision", 2023;
the caching scheme follows FKD, Shen and Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022).

For every training image, K random-resized crops are drawn once from a seeded generator; the float
teacher runs once per crop and its top-k soft labels are cached with the crop parameters. During
QAT, each epoch picks crops per image from the cache (seeded by (seed, epoch)), renders them again
from their parameters for the student, and the student is trained on the cached soft targets
(:func:`kd_loss`); the teacher never runs again.

Crops (on uint8 ``(N, C, H, W)`` images, e.g. Fashion-MNIST): area fraction ``a ~ U(scale)``, log
aspect ``log r ~ U(log ratio)``, crop ``h = sqrt(a H W / r)``, ``w = sqrt(a H W r)`` pixels, up to
10 draws until it fits (else the whole image), top-left corner uniform over the fitting positions,
horizontal flip with probability ``flip_prob``. The coordinates are continuous (fractions of the
image), stored as ``(top, left, height, width, flip)`` float32. A crop is rendered back to the input
size by bilinear resampling with half-pixel centres (``affine_grid`` + ``grid_sample``, border
padding, i.e. what ``interpolate(..., align_corners=False)`` does to the cropped region) and rounded
half-up to uint8, on the images' device.

Cached targets, per crop: the teacher's probabilities ``p = softmax(z_T / T)``, its top-k classes
(int16 indices), their probabilities renormalised to sum to 1 (float16), and the missing mass
``rest = 1 - sum of the top-k probabilities`` (float16, computed as the sum of the other classes'
probabilities so that it stays accurate when tiny).

KD loss (``T**2 * KL(target || student)``, averaged over the batch), with two ways to treat the
missing mass:

- ``"bucket"`` (default): the k classes plus one "all other classes" bucket. Target
  ``((1 - rest) * p_i, rest)``, student ``(q_i, 1 - sum_i q_i)`` with ``q = softmax(z_S / T)``. A KL
  between two distributions on k + 1 outcomes: zero when the student's probabilities equal the
  teacher's (up to float16 storage), and it still penalises student mass on the other classes.
- ``"renormalize"``: KL between the stored top-k distribution and the student's softmax
  renormalised over the same k classes (the missing mass is ignored on both sides).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import normalize_fmnist
from ..errors import UsageError

CROP_FIELDS = ("top", "left", "height", "width", "flip")
FORMAT = "mnq-vvtq-softlabels-1"
MISSING_MASS = ("bucket", "renormalize")
_ATTEMPTS = 10


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError("multi-crop KD needs uint8 images of shape (N, C, H, W)")
    if images.shape[0] == 0:
        raise UsageError("multi-crop KD got no images")


def sample_crop_params(num_images: int, num_crops: int, seed: int | torch.Generator,
                       scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       flip_prob: float = 0.5, image_size: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """Random-resized-crop parameters ``(num_images, num_crops, 5)`` float32 (see :data:`CROP_FIELDS`).

    Args:
        num_images, num_crops: how many.
        seed: an int seed or a CPU ``torch.Generator`` (all draws happen on the CPU).
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio width / height (drawn log-uniformly).
        flip_prob: probability of a horizontal flip.
        image_size: (H, W) of the images, for the aspect ratio in pixels.
    """
    if num_images <= 0 or num_crops <= 0:
        raise UsageError(f"need positive numbers of images and crops, got {num_images} and {num_crops}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise UsageError(f"crop scale range must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise UsageError(f"crop ratio range must satisfy 0 < lo <= hi, got {ratio}")
    if not 0.0 <= flip_prob <= 1.0:
        raise UsageError(f"flip probability must be in [0, 1], got {flip_prob}")
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    h_img, w_img = image_size
    m = num_images * num_crops
    area = (scale[0] + (scale[1] - scale[0]) * torch.rand(m, _ATTEMPTS, generator=g, dtype=torch.float64)) * h_img * w_img
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(m, _ATTEMPTS, generator=g, dtype=torch.float64))
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    fits = (w <= w_img) & (h <= h_img)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # first fitting attempt (0 if none)
    any_fit = fits.any(dim=1)
    pick = torch.arange(m)
    h = torch.where(any_fit, h[pick, first], torch.full((m,), float(h_img), dtype=torch.float64))
    w = torch.where(any_fit, w[pick, first], torch.full((m,), float(w_img), dtype=torch.float64))
    top = torch.rand(m, generator=g, dtype=torch.float64) * (h_img - h)
    left = torch.rand(m, generator=g, dtype=torch.float64) * (w_img - w)
    flip = (torch.rand(m, generator=g) < flip_prob).to(torch.float64)
    params = torch.stack([top / h_img, left / w_img, h / h_img, w / w_img, flip], dim=1)
    return params.to(torch.float32).view(num_images, num_crops, len(CROP_FIELDS))


def render_crops(images: torch.Tensor, params: torch.Tensor, index: torch.Tensor | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """The crops ``params`` (M, 5) of ``images[index]`` resized to ``size`` (default: the input's), uint8.

    Args:
        images: uint8 ``(N, C, H, W)``.
        params: ``(M, 5)`` crop parameters (fractions of H and W, flip 0/1).
        index: ``(M,)`` image of each crop (default: crop m of image m, M = N).
        size: output (H, W).

    Returns:
        uint8 ``(M, C, H_out, W_out)`` on ``images.device``.

    Output pixel centres are placed evenly inside the crop and sampled bilinearly from the whole
    source image, so the outermost output pixels may blend in source pixels just beyond the crop's
    edge (cutting the crop out first and resizing it would clamp to the crop's edge pixels instead).
    """
    _check_images(images)
    params = torch.as_tensor(params, dtype=torch.float32)
    if params.dim() != 2 or params.shape[1] != len(CROP_FIELDS):
        raise UsageError(f"crop parameters must have shape (M, {len(CROP_FIELDS)}), got {tuple(params.shape)}")
    dev = images.device
    if index is None:
        if params.shape[0] != images.shape[0]:
            raise UsageError(f"{params.shape[0]} crops for {images.shape[0]} images: pass the image index")
        src = images
    else:
        src = images[torch.as_tensor(index, dtype=torch.long, device=dev)]
    n, c = src.shape[:2]
    out_h, out_w = size if size is not None else tuple(images.shape[-2:])
    p = params.to(dev)
    top, left, h, w, flip = p.unbind(1)
    sign = 1.0 - 2.0 * flip  # -1 mirrors the crop
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=dev)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2.0 * left + w - 1.0
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2.0 * top + h - 1.0
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    out = F.grid_sample(src.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)


@dataclass
class SoftTargets:
    """Top-k soft targets of a batch: ``indices`` (B, k) long, ``probs`` (B, k) float32 summing to 1,
    ``rest`` (B,) float32 the teacher's mass outside the top k, and the teacher's ``temperature``."""

    indices: torch.Tensor
    probs: torch.Tensor
    rest: torch.Tensor
    temperature: float

    def dense(self, num_classes: int) -> torch.Tensor:
        """The (B, num_classes) distribution of the "bucket" target with the rest mass spread uniformly
        over the other classes (for inspection; the loss does not need it)."""
        k = self.indices.shape[1]
        other = (self.rest / max(num_classes - k, 1)).unsqueeze(1)
        out = other.expand(-1, num_classes).clone()
        return out.scatter_(1, self.indices, self.probs * (1.0 - self.rest).unsqueeze(1))


@dataclass
class SoftLabelCache:
    """Cached crops and teacher soft labels for N images x K crops.

    Attributes:
        params: (N, K, 5) float32 crop parameters.
        indices: (N, K, k) int16 top-k classes, most probable first.
        probs: (N, K, k) float16 their probabilities renormalised over the top k.
        rest: (N, K) float16 the teacher's probability mass outside the top k.
        num_classes, temperature: of the teacher's softmax.
        meta: how the crops were drawn (seed, scale, ratio, flip_prob, image_size).
    """

    params: torch.Tensor
    indices: torch.Tensor
    probs: torch.Tensor
    rest: torch.Tensor
    num_classes: int
    temperature: float
    meta: dict

    @property
    def num_images(self) -> int:
        return self.params.shape[0]

    @property
    def num_crops(self) -> int:
        return self.params.shape[1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]

    def targets(self, image: torch.Tensor, crop: torch.Tensor, device: torch.device | str = "cpu") -> SoftTargets:
        """The soft targets of crops ``crop[i]`` of images ``image[i]`` (1-D long tensors)."""
        image, crop = torch.as_tensor(image, dtype=torch.long), torch.as_tensor(crop, dtype=torch.long)
        probs = self.probs[image, crop].float()
        probs = probs / probs.sum(dim=1, keepdim=True)
        return SoftTargets(indices=self.indices[image, crop].long().to(device), probs=probs.to(device),
                           rest=self.rest[image, crop].float().to(device), temperature=self.temperature)

    def crops(self, images: torch.Tensor, image: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """Render crops ``crop[i]`` of ``images[image[i]]`` from the cached parameters (uint8)."""
        self.check_images(images)
        image, crop = torch.as_tensor(image, dtype=torch.long), torch.as_tensor(crop, dtype=torch.long)
        return render_crops(images, self.params[image, crop], index=image)

    def check_images(self, images: torch.Tensor) -> None:
        _check_images(images)
        if images.shape[0] != self.num_images or list(images.shape[-2:]) != list(self.meta["image_size"]):
            raise UsageError(f"the soft-label cache holds {self.num_images} images of size "
                             f"{tuple(self.meta['image_size'])}, got images of shape {tuple(images.shape)}")

    # --- files --------------------------------------------------------------------------------

    def _header(self) -> dict:
        return dict(format=FORMAT, num_classes=self.num_classes, temperature=self.temperature, meta=self.meta)

    def save(self, path: str | Path) -> Path:
        """Write the cache to a ``.pt`` or ``.npz`` file atomically (temp file in the same folder, then
        rename). Returns the path."""
        path = Path(path)
        kind = _file_kind(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                if kind == "pt":
                    torch.save(dict(header=self._header(), params=self.params, indices=self.indices,
                                    probs=self.probs, rest=self.rest), fh)
                else:
                    np.savez(fh, header=np.array(json.dumps(self._header())), params=self.params.numpy(),
                             indices=self.indices.numpy(), probs=self.probs.numpy(), rest=self.rest.numpy())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> SoftLabelCache:
        """Read a cache written by :meth:`save`."""
        path = Path(path)
        kind = _file_kind(path)
        if not path.is_file():
            raise UsageError(f"soft-label cache {path} not found")
        try:
            if kind == "pt":
                raw = torch.load(path, map_location="cpu", weights_only=True)
                header = raw["header"]
                tensors = {k: raw[k] for k in ("params", "indices", "probs", "rest")}
            else:
                with np.load(path, allow_pickle=False) as z:
                    header = json.loads(str(z["header"]))
                    tensors = {k: torch.from_numpy(z[k].copy()) for k in ("params", "indices", "probs", "rest")}
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
            raise UsageError(f"cannot read soft-label cache {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise UsageError(f"{path} is not a soft-label cache of format {FORMAT}")
        cache = cls(num_classes=int(header["num_classes"]), temperature=float(header["temperature"]),
                    meta=header["meta"], **tensors)
        cache.validate(str(path))
        return cache

    def validate(self, where: str = "soft-label cache") -> None:
        """Raise a UsageError when the shapes or dtypes do not fit together."""
        p, i, q, r = self.params, self.indices, self.probs, self.rest
        ok = (p.dim() == 3 and p.shape[2] == len(CROP_FIELDS) and p.dtype == torch.float32
              and i.dim() == 3 and i.shape[:2] == p.shape[:2] and i.dtype == torch.int16
              and q.shape == i.shape and q.dtype == torch.float16
              and r.shape == p.shape[:2] and r.dtype == torch.float16)
        if not ok:
            raise UsageError(f"{where}: inconsistent shapes or dtypes")
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= self.num_classes):
            raise UsageError(f"{where}: class indices outside 0..{self.num_classes - 1}")


def _file_kind(path: Path) -> str:
    if path.suffix not in (".pt", ".npz"):
        raise UsageError(f"soft-label cache files end in .pt or .npz, got {path.name}")
    return path.suffix[1:]


@torch.no_grad()
def build_soft_label_cache(teacher: torch.nn.Module, images: torch.Tensor, num_crops: int, top_k: int = 5,
                           seed: int = 0, scale: tuple[float, float] = (0.35, 1.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                           temperature: float = 1.0, batch_size: int = 256,
                           transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           progress: bool = False) -> SoftLabelCache:
    """Draw ``num_crops`` crops per image, run the teacher once per crop, cache its top-k soft labels.

    Args:
        teacher: the float model; evaluated in ``eval()`` mode (its mode is restored afterwards).
        images: uint8 ``(N, C, H, W)`` on the teacher's device.
        num_crops: crops per image (K).
        top_k: soft-label classes kept per crop (k <= number of classes, <= 32767).
        seed: seed of the crop parameters.
        scale, ratio, flip_prob: the crop distribution (:func:`sample_crop_params`).
        temperature: the teacher's softmax temperature ``T`` (the KD loss uses the same).
        batch_size: crops per teacher call.
        transform: uint8 crops -> teacher input (default: :func:`mnq_search.data.normalize_fmnist`).
        progress: a progress bar over the teacher calls.
    """
    _check_images(images)
    if not isinstance(top_k, int) or top_k <= 0:
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    if temperature <= 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    transform = transform or normalize_fmnist
    n, size = images.shape[0], (int(images.shape[-2]), int(images.shape[-1]))
    params = sample_crop_params(n, num_crops, seed, scale, ratio, flip_prob, size)
    flat = params.view(-1, len(CROP_FIELDS))
    m = flat.shape[0]
    idx_out = probs_out = rest_out = None
    num_classes = None
    was_training = teacher.training
    teacher.eval()
    try:
        from tqdm.auto import tqdm

        for lo in tqdm(range(0, m, batch_size), desc="teacher soft labels", disable=not progress, mininterval=2):
            sel = torch.arange(lo, min(lo + batch_size, m))
            crops = render_crops(images, flat[sel], index=sel // num_crops)
            logits = teacher(transform(crops)).float()
            if num_classes is None:
                num_classes = logits.shape[-1]
                if top_k > num_classes or num_classes > torch.iinfo(torch.int16).max + 1:
                    raise UsageError(f"top_k={top_k} with {num_classes} classes: need top_k <= classes <= 32768")
                idx_out = torch.empty(m, top_k, dtype=torch.int16)
                probs_out = torch.empty(m, top_k, dtype=torch.float16)
                rest_out = torch.empty(m, dtype=torch.float16)
            idx, probs, rest = _top_k(logits, top_k, temperature)
            idx_out[sel], probs_out[sel], rest_out[sel] = idx.cpu().to(torch.int16), probs.cpu().half(), rest.cpu().half()
    finally:
        teacher.train(was_training)
    meta = dict(seed=int(seed), scale=list(map(float, scale)), ratio=list(map(float, ratio)),
                flip_prob=float(flip_prob), image_size=list(size))
    return SoftLabelCache(params=params, indices=idx_out.view(n, num_crops, top_k),
                          probs=probs_out.view(n, num_crops, top_k), rest=rest_out.view(n, num_crops),
                          num_classes=int(num_classes), temperature=float(temperature), meta=meta)


def _top_k(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k indices, their probabilities renormalised, the mass outside them) of softmax(logits / T)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    top = logp.topk(k, dim=-1)
    probs = torch.softmax(top.values, dim=-1)  # = p_i / sum of the top-k p
    if k == logits.shape[-1]:
        rest = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    else:
        others = logp.scatter(-1, top.indices, float("-inf"))
        rest = torch.exp(torch.logsumexp(others, dim=-1))
    return top.indices, probs, rest


@dataclass
class CropBatch:
    """One batch of an epoch: uint8 crops, their soft targets, and which image and crop each is."""

    images: torch.Tensor
    targets: SoftTargets
    image: torch.Tensor
    crop: torch.Tensor


def epoch_plan(cache: SoftLabelCache, epoch: int, crops_per_image: int = 1, seed: int = 0,
               shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, crop index) of every sample of an epoch, seeded by (seed, epoch).

    Each image contributes ``crops_per_image`` distinct cached crops chosen at random; the samples
    are shuffled unless ``shuffle`` is False (then image-major).
    """
    if not 1 <= crops_per_image <= cache.num_crops:
        raise UsageError(f"crops per image must be in 1..{cache.num_crops}, got {crops_per_image}")
    if epoch < 0:
        raise UsageError(f"epoch must be non-negative, got {epoch}")
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    n = cache.num_images
    chosen = torch.rand(n, cache.num_crops, generator=g).argsort(dim=1)[:, :crops_per_image]
    image = torch.arange(n).repeat_interleave(crops_per_image)
    crop = chosen.reshape(-1)
    if shuffle:
        order = torch.randperm(image.numel(), generator=g)
        image, crop = image[order], crop[order]
    return image, crop


def epoch_batches(cache: SoftLabelCache, images: torch.Tensor, epoch: int, batch_size: int,
                  crops_per_image: int = 1, seed: int = 0, shuffle: bool = True) -> Iterator[CropBatch]:
    """The student's batches of an epoch: crops regenerated from the cached parameters (on the
    images' device) with their cached soft targets (see :func:`epoch_plan`; the last batch may be
    smaller)."""
    cache.check_images(images)
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    image, crop = epoch_plan(cache, epoch, crops_per_image, seed, shuffle)
    for lo in range(0, image.numel(), batch_size):
        i, c = image[lo:lo + batch_size], crop[lo:lo + batch_size]
        yield CropBatch(images=cache.crops(images, i, c), targets=cache.targets(i, c, images.device),
                        image=i, crop=c)


def kd_loss(student_logits: torch.Tensor, targets: SoftTargets, missing_mass: str = "bucket") -> torch.Tensor:
    """``T**2 * mean over the batch of KL(target || softmax(student_logits / T))`` on cached top-k targets.

    Args:
        student_logits: (B, C) logits of the student on the same crops.
        targets: the cached targets (their ``temperature`` is used for the student too).
        missing_mass: ``"bucket"`` (k classes + one bucket for the rest) or ``"renormalize"`` (both
            distributions restricted to the k classes); see the module docstring.
    """
    if missing_mass not in MISSING_MASS:
        raise UsageError(f"unknown missing-mass handling {missing_mass!r}; choose from: {', '.join(MISSING_MASS)}")
    if student_logits.dim() != 2 or student_logits.shape[0] != targets.indices.shape[0]:
        raise UsageError(f"student logits of shape {tuple(student_logits.shape)} do not match "
                         f"{targets.indices.shape[0]} soft targets")
    b, c = student_logits.shape
    k = targets.indices.shape[1]
    if k > c or int(targets.indices.max()) >= c:
        raise UsageError(f"soft targets name classes beyond the student's {c}")
    t = targets.temperature
    z = student_logits.float() / t
    idx = targets.indices.to(z.device)
    p = targets.probs.to(z.device)
    if missing_mass == "renormalize":
        log_q = torch.log_softmax(z.gather(1, idx), dim=1)
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1)
    else:
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        log_q = z.gather(1, idx) - lse
        rest = targets.rest.to(z.device).clamp(0.0, 1.0)
        tk = p * (1.0 - rest).unsqueeze(1)
        kl = (torch.xlogy(tk, tk) - tk * log_q).sum(dim=1)
        if k < c:
            log_q_rest = torch.logsumexp(z.scatter(1, idx, float("-inf")), dim=1) - lse.squeeze(1)
            kl = kl + torch.xlogy(rest, rest) - rest * log_q_rest
    return kl.mean() * t * t
