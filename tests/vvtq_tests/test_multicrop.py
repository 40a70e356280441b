"""Multi-crop KD with cached teacher soft labels (``mnq_search.vvtq._multicrop``; VVTQ, Huang et al.
2023, after FKD): deterministic crops, cache fidelity, KD loss, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnq_search.data import normalize_fmnist
from mnq_search.errors import UsageError
from mnq_search.vvtq import (SoftLabelCache, SoftTargets, build_soft_label_cache, epoch_batches, epoch_plan,
                             kd_loss, render_crops, sample_crop_params)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 (n, 1, 28, 28) images: a bright random blob on black, like Fashion-MNIST items."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    c = 8 + 12 * torch.rand(n, 2, generator=g)
    r = 4 + 6 * torch.rand(n, 1, 1, generator=g)
    d2 = (yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2
    img = 255 * torch.exp(-d2 / (2 * r**2)) * (0.5 + 0.5 * torch.rand(n, 28, 28, generator=g))
    return img.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


def _model(seed: int, gain: float = 8.0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with torch.no_grad():
        m[-1].weight.mul_(gain)
    return m.eval()


def test_crop_parameters_are_deterministic_and_in_range():
    a = sample_crop_params(50, 4, 7, scale=(0.3, 1.0), ratio=(0.75, 4 / 3))
    assert a.shape == (50, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, sample_crop_params(50, 4, 7, scale=(0.3, 1.0), ratio=(0.75, 4 / 3)))
    assert torch.equal(a, sample_crop_params(50, 4, torch.Generator().manual_seed(7), scale=(0.3, 1.0), ratio=(0.75, 4 / 3)))
    assert not torch.equal(a, sample_crop_params(50, 4, 8, scale=(0.3, 1.0), ratio=(0.75, 4 / 3)))
    top, left, h, w, flip = a.reshape(-1, 5).unbind(1)
    eps = 1e-5
    assert torch.all(top >= 0) and torch.all(left >= 0) and torch.all(top + h <= 1 + eps) and torch.all(left + w <= 1 + eps)
    assert torch.all((h * w >= 0.3 - eps) & (h * w <= 1 + eps))
    assert torch.all((w / h >= 0.75 - eps) & (w / h <= 4 / 3 + eps))
    assert set(flip.tolist()) == {0.0, 1.0}
    with pytest.raises(UsageError):
        sample_crop_params(2, 2, 0, scale=(0.0, 1.0))


def test_render_identity_flip_and_resize():
    imgs = _images(3)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(3, 1)
    assert torch.equal(render_crops(imgs, full), imgs)  # the whole image, no flip: unchanged
    full[:, 4] = 1.0
    assert torch.equal(render_crops(imgs, full), torch.flip(imgs, dims=[-1]))
    # the top-left 14 x 14 quarter upsampled x2 = bilinear interpolate of the cut-out quarter with
    # half-pixel centres, except the last row and column: they sample at source coordinate 13.25, which
    # render_crops interpolates with the source pixel 14 just outside the crop (crop-then-resize
    # clamps to pixel 13 instead)
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]]).repeat(3, 1)
    ref = F.interpolate(imgs[:, :, :14, :14].float(), size=(28, 28), mode="bilinear", align_corners=False)
    diff = (render_crops(imgs, quarter).int() - torch.floor(ref + 0.5).int()).abs()
    # (bilinear weights 1/4, 3/4 make x.5 ties common: float error may round them either way)
    assert int(diff[..., :27, :27].max()) <= 1 and float((diff[..., :27, :27] > 0).float().mean()) < 0.05
    wider = F.interpolate(imgs[:, :, :15, :15].float(), size=(30, 30), mode="bilinear", align_corners=False)
    assert int((render_crops(imgs, quarter).int() - torch.floor(wider[..., :28, :28] + 0.5).int()).abs().max()) <= 1
    # crop m of image index[m]; crops of one image twice give the same pixels
    p = sample_crop_params(1, 2, 3).view(2, 5)
    two = render_crops(imgs, p, index=torch.tensor([1, 1]))
    assert torch.equal(two, render_crops(imgs, p, index=torch.tensor([1, 1])))
    assert two.shape == (2, 1, 28, 28) and two.dtype == torch.uint8


def _topk(logits, k, t):
    p = torch.softmax(logits / t, dim=1)
    top = p.topk(k, dim=1)
    return top.indices, top.values / top.values.sum(1, keepdim=True), 1 - top.values.sum(1)


def test_cache_reproduces_the_teacher_on_regenerated_crops():
    imgs, teacher = _images(4), _model(1)
    cache = build_soft_label_cache(teacher, imgs, num_crops=3, top_k=4, seed=5, temperature=2.0, batch_size=5)
    assert cache.indices.shape == (4, 3, 4) and cache.indices.dtype == torch.int16
    assert cache.probs.dtype == torch.float16 and cache.rest.shape == (4, 3) and cache.num_classes == 10
    image, crop = torch.arange(4).repeat_interleave(3), torch.arange(3).repeat(4)
    with torch.no_grad():
        logits = teacher(normalize_fmnist(cache.crops(imgs, image, crop)))
    idx, probs, rest = _topk(logits, 4, 2.0)
    tg = cache.targets(image, crop)
    assert torch.equal(tg.indices, idx)
    assert torch.allclose(tg.probs, probs, rtol=2**-10, atol=0)  # float16 storage: 11-bit mantissa
    assert torch.allclose(tg.rest, rest, rtol=2**-10, atol=1e-6)
    assert float(rest.min()) > 1e-3  # the truncation drops real mass in this test
    # the same seed gives the same cache; another seed other crops
    again = build_soft_label_cache(teacher, imgs, num_crops=3, top_k=4, seed=5, temperature=2.0)
    assert torch.equal(again.params, cache.params) and torch.equal(again.probs, cache.probs)
    assert not torch.equal(build_soft_label_cache(teacher, imgs, 3, 4, seed=6).params, cache.params)


def test_kd_loss_zero_for_the_teacher_and_positive_otherwise():
    imgs, teacher, other = _images(4), _model(1), _model(2)
    cache = build_soft_label_cache(teacher, imgs, num_crops=3, top_k=4, seed=5, temperature=2.0)
    batches = list(epoch_batches(cache, imgs, epoch=0, batch_size=5, crops_per_image=2))
    assert [b.images.shape[0] for b in batches] == [5, 3]
    for b in batches:
        with torch.no_grad():
            t_logits = teacher(normalize_fmnist(b.images))
            o_logits = other(normalize_fmnist(b.images))
        for mode in ("bucket", "renormalize"):
            assert abs(kd_loss(t_logits, b.targets, mode).item()) < 1e-5  # float16 storage and float32 sums only
            assert kd_loss(o_logits, b.targets, mode).item() > 0.05
        # a student equal to the teacher on the top-k classes but with more mass elsewhere:
        # "renormalize" does not see it, "bucket" does
        boosted = t_logits.clone()
        rest = torch.ones_like(boosted, dtype=torch.bool).scatter_(1, b.targets.indices, False)
        boosted[rest] += 2.0
        assert abs(kd_loss(boosted, b.targets, "renormalize").item()) < 1e-5
        assert kd_loss(boosted, b.targets, "bucket").item() > 0.05
    z = o_logits.clone().requires_grad_(True)
    kd_loss(z, batches[-1].targets).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_kd_loss_with_all_classes_kept_is_the_full_kl():
    logits_t = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    logits_s = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    idx, probs, _ = _topk(logits_t, 5, 1.5)
    tg = SoftTargets(indices=idx, probs=probs, rest=torch.zeros(6), temperature=1.5)
    ref = F.kl_div(F.log_softmax(logits_s / 1.5, 1), F.log_softmax(logits_t / 1.5, 1), reduction="batchmean",
                   log_target=True) * 1.5**2
    assert kd_loss(logits_s, tg).item() == pytest.approx(ref.item(), rel=1e-5)


def test_epoch_plan_is_seeded_and_covers_every_image():
    cache = build_soft_label_cache(_model(1), _images(5), num_crops=4, top_k=3, seed=0)
    i0, c0 = epoch_plan(cache, epoch=3, crops_per_image=2, seed=1)
    i1, c1 = epoch_plan(cache, epoch=3, crops_per_image=2, seed=1)
    assert torch.equal(i0, i1) and torch.equal(c0, c1)
    i2, c2 = epoch_plan(cache, epoch=4, crops_per_image=2, seed=1)
    assert not (torch.equal(i0, i2) and torch.equal(c0, c2))
    assert torch.bincount(i0).tolist() == [2] * 5
    for n in range(5):
        assert len(set(c0[i0 == n].tolist())) == 2  # distinct crops of one image
    with pytest.raises(UsageError):
        epoch_plan(cache, 0, crops_per_image=5)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    imgs = _images(3)
    cache = build_soft_label_cache(_model(1), imgs, num_crops=2, top_k=3, seed=4, temperature=1.5)
    path = cache.save(tmp_path / "sub" / f"labels{suffix}")
    assert sorted(p.name for p in path.parent.iterdir()) == [f"labels{suffix}"]  # no temp file left
    back = SoftLabelCache.load(path)
    for name in ("params", "indices", "probs", "rest"):
        assert torch.equal(getattr(back, name), getattr(cache, name)) and getattr(back, name).dtype == getattr(cache, name).dtype
    assert (back.num_classes, back.temperature, back.meta) == (cache.num_classes, cache.temperature, cache.meta)
    assert torch.equal(back.crops(imgs, torch.tensor([2]), torch.tensor([1])),
                       cache.crops(imgs, torch.tensor([2]), torch.tensor([1])))
    path.write_bytes(b"not a cache")
    with pytest.raises(UsageError, match="cannot read"):
        SoftLabelCache.load(path)
    with pytest.raises(UsageError, match=r"\.pt or \.npz"):
        cache.save(tmp_path / "labels.json")
    with pytest.raises(UsageError, match="not found"):
        SoftLabelCache.load(tmp_path / f"missing{suffix}")
    with pytest.raises(UsageError, match="holds 3 images"):
        list(epoch_batches(back, _images(2), 0, 4))
