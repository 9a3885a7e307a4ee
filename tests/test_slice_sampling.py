"""Slices sampled and augmented on the device: the draws follow RandCropByPosNegLabeld's, stacks hold the true
neighbours, labels follow their images through the affine (which matches MONAI's Affine), draws are reproducible
per seed, epoch and rank, and no step reads a device value on the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Affine

from ic_moe_monai.training import slice_sampling
from ic_moe_monai.training.slice_sampling import DeviceSliceLoader, SliceAugmentation, SliceBank, affine_warp
from tests.sync_check import HostSyncError, NoHostSync

SIZE = 16


class NoHostSyncOrData(NoHostSync):
    """Also raise where a tensor is made from Python data (``torch.tensor([...])``): made for a CUDA device, that is a
    blocking copy from the host, once per step."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            raise HostSyncError("a tensor made from host data (a blocking copy to the device)")
        return super().__torch_dispatch__(func, types, args, kwargs)


def _volume(depth: int, foreground: dict[int, int], value_of=lambda z: float(z)) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded volume ``(1, SIZE, SIZE, depth + 2)``: slice z holds the value ``value_of(z)`` and ``foreground[z]``
    voxels of class 1 (or 2 for odd z); the first and last slices replicate their neighbours, as BorderPadd does."""
    image = torch.zeros(1, SIZE, SIZE, depth)
    label = torch.zeros(1, SIZE, SIZE, depth)
    for z in range(depth):
        image[..., z] = value_of(z)
        label.view(-1, depth)[: foreground.get(z, 0), z] = 1 + z % 2
    pad = lambda t: torch.cat([t[..., :1], t, t[..., -1:]], dim=-1)  # noqa: E731
    return pad(image), pad(label)


def _bank(*volumes) -> SliceBank:
    return SliceBank([v[0] for v in volumes], [v[1] for v in volumes])


def test_slices_are_drawn_like_rand_crop_by_pos_neg_label():
    """pos=3, neg=1: 3 in 4 draws are a foreground voxel's slice (so in proportion to its foreground voxels), the
    others a background voxel's; a volume without foreground gives background draws; padding is never drawn."""
    bank = _bank(_volume(10, {3: 64, 6: 192}), _volume(5, {}))
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    positive = torch.rand(n, generator=generator) < 0.75
    centres = bank.sample_slices(torch.zeros(n, dtype=torch.long), positive, generator)
    z = centres - 1  # volume 0 starts at 0, with one padding slice
    assert ((z >= 0) & (z < 10)).all()
    drawn_fg = positive  # volume 0 has foreground, so every positive draw lands on a foreground slice
    assert set(z[drawn_fg].tolist()) == {3, 6}
    share_6 = (z[drawn_fg] == 6).float().mean().item()
    assert share_6 == pytest.approx(192 / 256, abs=0.01)
    background = SIZE * SIZE - torch.tensor([64 if i == 3 else 192 if i == 6 else 0 for i in range(10)])
    counts = torch.bincount(z[~drawn_fg], minlength=10).float()
    torch.testing.assert_close(counts / counts.sum(), background / background.sum(), atol=0.01, rtol=0)

    centres = bank.sample_slices(
        torch.ones(n // 10, dtype=torch.long), torch.ones(n // 10, dtype=torch.bool), generator
    )
    z = centres - int(bank.start[1]) - 1
    assert ((z >= 0) & (z < 5)).all()  # no foreground: background draws over every real slice
    assert len(z.unique()) == 5


def test_loader_pos_neg_ratio_and_true_neighbours():
    """Slices z-1, z, z+1 of the same volume (the replicated edge at the ends), the label of slice z."""
    volumes = [_volume(6, {0: 20, 5: 40}, lambda z, v=v: 10.0 * v + z) for v in range(3)]
    loader = DeviceSliceLoader([{"image": i, "label": label} for i, label in volumes], volumes_per_batch=3,
                               slices_per_volume=200, pos=3, neg=1)  # fmt: skip
    batch = loader.sample(torch.Generator().manual_seed(1))
    image, label = batch["image"], batch["label"]
    assert image.shape == (600, 3, SIZE, SIZE) and label.shape == (600, 1, SIZE, SIZE) and label.dtype == torch.int64
    middle = image[:, 1, 0, 0]
    volume, z = (middle // 10).long(), (middle % 10).round().long()
    torch.testing.assert_close(image[:, 0, 0, 0], 10.0 * volume + (z - 1).clamp_min(0))
    torch.testing.assert_close(image[:, 2, 0, 0], 10.0 * volume + (z + 1).clamp_max(5))
    has_foreground = (label > 0).flatten(1).any(1)
    # 3 in 4 draws are foreground voxels' slices, and a background voxel lies on slice 0 or 5 with p = 452 / 1476
    assert has_foreground.float().mean().item() == pytest.approx(0.75 + 0.25 * 452 / 1476, abs=0.05)
    assert set(z[has_foreground].tolist()) <= {0, 5}
    # every slice's label is its own: class 1 + z % 2 on the foreground slices
    assert (label[has_foreground].amax(dim=(1, 2, 3)) == 1 + z[has_foreground] % 2).all()
    # repeat context: the slice three times
    loader.context = "repeat"
    rep = loader.sample(torch.Generator().manual_seed(1))["image"]
    assert torch.equal(rep[:, 0], rep[:, 1]) and torch.equal(rep[:, 2], rep[:, 1])


# ------------------------------------------------------------------------------------------------ augmentation
def test_affine_matches_monai_affine():
    """Same geometry as MONAI's Affine (which RandAffined used): rotation, per-axis scale and shift about the centre."""
    torch.manual_seed(0)
    image = torch.rand(1, 1, 24, 20)
    image = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1)  # smooth, so bilinear differences stay small
    for angle, (s0, s1), (t0, t1) in ((0.2, (1.1, 0.9), (2.0, -3.0)), (-0.26, (0.85, 1.15), (-4.0, 1.5))):
        reference = Affine(rotate_params=angle, scale_params=(s0, s1), translate_params=(t0, t1), mode="bilinear",
                           padding_mode="zeros", image_only=True)(image[0])  # fmt: skip
        # MONAI's (row, column) order and rotation sense, in affine_grid's (column, row) order
        warped, _ = affine_warp(image, torch.zeros(1, 1, 24, 20), torch.tensor([-angle]), torch.tensor([[s1, s0]]),
                                torch.tensor([[t1, t0]]))  # fmt: skip
        torch.testing.assert_close(warped[0], torch.as_tensor(reference).float(), atol=1e-4, rtol=0)


def test_labels_follow_their_images_and_stay_classes():
    label = torch.zeros(64, 1, 32, 32, dtype=torch.long)
    label[:, :, 8:20, 6:26] = 1
    label[:, :, 20:26, 6:26] = 2
    image = label.float().expand(-1, 3, -1, -1).contiguous()
    augment = SliceAugmentation(affine_prob=1.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0)
    warped, warped_label = augment(image, label, torch.Generator().manual_seed(0))
    assert warped_label.dtype == torch.int64 and set(warped_label.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(warped_label, label)  # the labels moved ...
    plateau = (warped[:, 1:2] - warped[:, 1:2].round()).abs() < 1e-4  # ... with their images: wherever the
    assert plateau.float().mean() > 0.8  # bilinear image is a plateau, the nearest label has its value
    assert torch.equal(warped_label[plateau], warped[:, 1:2][plateau].round().long())


def test_intensity_draws_in_their_ranges_and_probabilities():
    image = torch.full((4000, 1, 2, 2), 0.5)
    label = torch.zeros(4000, 1, 2, 2, dtype=torch.long)
    scale_only = SliceAugmentation(affine_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0)
    out, _ = scale_only(image, label, torch.Generator().manual_seed(0))
    changed = (out[:, 0, 0, 0] - 0.5).abs() > 1e-7
    assert changed.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert out.min() >= 0.45 - 1e-6 and out.max() <= 0.55 + 1e-6
    shift_only = SliceAugmentation(affine_prob=0.0, intensity_scale_prob=0.0, noise_prob=0.0)
    out, _ = shift_only(image, label, torch.Generator().manual_seed(0))
    assert out.min() >= 0.4 - 1e-6 and out.max() <= 0.6 + 1e-6
    noise_only = SliceAugmentation(affine_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0)
    out, _ = noise_only(image, label, torch.Generator().manual_seed(0))
    noisy = (out - 0.5).flatten(1).abs().amax(1) > 0
    assert noisy.float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert (out - 0.5).std().item() < 0.02


# ------------------------------------------------------------------------------------------------ the loader
def _loader(volumes: int = 5, **kwargs) -> DeviceSliceLoader:
    data = []
    for v in range(volumes):
        image, label = _volume(8, {2: 30, 4: 50}, lambda z, v=v: v + z / 10)
        data.append({"image": image, "label": label})
    return DeviceSliceLoader(data, volumes_per_batch=2, slices_per_volume=3, augmentation=SliceAugmentation(), **kwargs)


def test_draws_are_reproducible_per_seed_and_differ_per_epoch():
    a, b = _loader(seed=7), _loader(seed=7)
    first = [batch["image"] for batch in a]
    assert all(torch.equal(x, y["image"]) for x, y in zip(first, b, strict=True))
    second = [batch["image"] for batch in a]  # the next pass is the next epoch
    assert not any(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    b.set_epoch(1)  # what the trainer does as epoch 1 starts: the same draws as the first pass
    assert all(torch.equal(x, y["image"]) for x, y in zip(first, b, strict=True))
    assert not torch.equal(next(iter(_loader(seed=8)))["image"], first[0])


def test_each_rank_draws_its_own_batches(monkeypatch):
    monkeypatch.setattr(slice_sampling.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(slice_sampling.dist, "get_world_size", lambda: 2)
    batches = {}
    for rank in (0, 1, 1):
        monkeypatch.setattr(slice_sampling.dist, "get_rank", lambda rank=rank: rank)
        loader = _loader(volumes=40, seed=3)
        assert len(loader) == 10  # 40 volumes / (2 per batch × 2 ranks)
        images = torch.stack([batch["image"] for batch in loader])
        assert rank not in batches or torch.equal(batches[rank], images)
        batches[rank] = images
    assert not torch.equal(batches[0], batches[1])


def test_steps_per_epoch():
    assert len(_loader(volumes=4)) == 10  # a few volumes: the floor, not 2-step epochs
    assert len(_loader(volumes=139, steps_per_epoch=None, min_steps_per_epoch=10)) == 70
    assert len(_loader(volumes=4, steps_per_epoch=25)) == 25
    assert len(DeviceSliceLoader([])) == 0


def test_a_label_beyond_the_bundles_classes_is_refused_naming_the_file():
    from monai.data import Dataset

    from ic_moe_monai.errors import ConfigError

    items = []
    for top in (2, 5, 1):
        image, label = _volume(8, {2: 30, 4: 50})
        items.append({"image": image, "label": label * top})  # foreground 1 scaled: largest label value `top`
    files = [{"image": f"img{v}.nii.gz", "label": f"labelsTr/case{v}.nii.gz"} for v in range(3)]

    class Cached(Dataset):  # a CacheDataset: the items after the transforms, the file names in .data
        def __getitem__(self, index):
            return items[index]

    DeviceSliceLoader(Cached(files), num_classes=5)  # values up to 5 fit 5 classes
    with pytest.raises(ConfigError, match=r"labelsTr/case1\.nii\.gz holds the value 5, but the bundle has 2 classes"):
        DeviceSliceLoader(Cached(files), num_classes=2)


def test_a_step_never_reads_the_device_on_the_host():
    loader = _loader()
    generator = loader.epoch_generator(1)
    with NoHostSyncOrData() as mode:
        batch = loader.sample(generator)
    assert mode.ops > 20 and batch["image"].shape == (6, 3, SIZE, SIZE)


def test_bank_checks_its_volumes():
    image, label = _volume(4, {})
    with pytest.raises(ValueError, match="in-plane"):
        SliceBank([image, torch.zeros(1, 8, 8, 6)], [label, torch.zeros(1, 8, 8, 6)])
    with pytest.raises(ValueError, match="all of them border padding"):
        SliceBank([torch.zeros(1, 4, 4, 2)], [torch.zeros(1, 4, 4, 2)])
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        SliceBank([torch.zeros(2, 4, 4, 6)], [torch.zeros(2, 4, 4, 6)])
    bank = SliceBank([image], [label])
    assert bank.images.shape == (6, SIZE, SIZE) and bank.labels.dtype == torch.uint8
    assert np.array_equal(bank.cum_foreground.numpy(), np.zeros(7))
