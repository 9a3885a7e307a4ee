"""Training batches of 2.5D slices sampled and augmented on the training device, in batches (DESIGN.md §5).

MONAI's fast-training recipe caches the deterministic part of the pipeline and moves the data to the GPU once;
here the whole random part runs there too, as a few batched tensor ops per step instead of per-sample transforms:

- :class:`SliceBank`: every cached volume (after the deterministic transforms: loading, orientation, intensity,
  in-plane resize, one replicated slice of padding at each end along z) as one bank of slices on the device, with
  each slice's foreground and background voxel counts.
- :class:`SliceAugmentation`: random affine (rotation, scaling, translation; bilinear image, nearest label, zero
  padding) and intensity scale, shift and Gaussian noise, each drawn per slice, as ``affine_grid`` /
  ``grid_sample`` and element-wise ops on the whole batch.
- :class:`DeviceSliceLoader`: the training data loader: ``len()`` steps per epoch, each a batch of
  ``volumes_per_batch × slices_per_volume`` slices drawn as ``RandCropByPosNegLabeld`` drew them, then augmented.
  No step reads a device value on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ic_moe_monai.errors import ConfigError

__all__ = ["DeviceSliceLoader", "SliceAugmentation", "SliceBank", "affine_warp"]


class SliceBank:
    """The training volumes as one bank of axial slices on the device.

    Volume ``v`` occupies slices ``start[v] … start[v] + depth[v] - 1`` of :attr:`images` ``(T, X, Y)`` (float32)
    and :attr:`labels` ``(T, X, Y)`` (uint8). Its first and last ``border`` slices are padding (the replicated edge
    slices): they are never a sampled slice, only a neighbour. :attr:`cum_foreground` / :attr:`cum_background`
    ``(T + 1,)`` are running totals of each sampled slice's foreground (label > 0) and background voxels (0 for
    padding), from which slices are drawn in proportion to their voxels.

    Args:
        images: per volume ``(1, X, Y, Z)`` (or ``(X, Y, Z)``), all of the same in-plane size.
        labels: per volume, the same shapes, integer class labels.
        device: where the bank lives.
        border: padding slices at each end of every volume.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
        border: int = 1,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"SliceBank: {len(images)} images but {len(labels)} labels.")
        slices, label_slices, depths = [], [], []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            image, label = _volume(image, f"image {i}"), _volume(label, f"label {i}")
            if image.shape != label.shape:
                raise ValueError(f"SliceBank: volume {i}: image {tuple(image.shape)} and label {tuple(label.shape)}.")
            if slices and image.shape[:2] != slices[0].shape[1:]:
                raise ValueError(
                    f"SliceBank: volume {i} is {tuple(image.shape[:2])} in-plane, volume 0 is "
                    f"{tuple(slices[0].shape[1:])}: resize every volume to the same in-plane size first."
                )
            if image.shape[2] <= 2 * border:
                raise ValueError(f"SliceBank: volume {i} has {image.shape[2]} slices, all of them border padding.")
            slices.append(image.permute(2, 0, 1).float())
            label_slices.append(label.permute(2, 0, 1).round().clamp(0, 255).to(torch.uint8))
            depths.append(image.shape[2])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.border = border
        # neighbour offsets, on the device once (a tensor made from a list per step would block on the copy)
        self._offsets = {
            c: torch.tensor(o).to(self.device) for c, o in (("neighbors", [-1, 0, 1]), ("repeat", [0] * 3))
        }
        self.num_volumes = len(depths)
        if not depths:
            self.images = torch.zeros(0, 0, 0, device=self.device)
            self.labels = torch.zeros(0, 0, 0, dtype=torch.uint8, device=self.device)
            self.start = self.depth = torch.zeros(0, dtype=torch.int64, device=self.device)
            self.cum_foreground = self.cum_background = torch.zeros(1, dtype=torch.int64, device=self.device)
            return
        labels_flat = torch.cat(label_slices)
        foreground = (labels_flat > 0).flatten(1).sum(dim=1)
        background = labels_flat[0].numel() - foreground
        depth = torch.tensor(depths)
        start = torch.cumsum(depth, 0) - depth
        sampled = torch.ones(len(labels_flat), dtype=torch.bool)
        for s, d in zip(start.tolist(), depths, strict=True):  # padding slices are never drawn
            sampled[s : s + border] = False
            sampled[s + d - border : s + d] = False
        self.images = torch.cat(slices).to(self.device)
        self.labels = labels_flat.to(self.device)
        self.start, self.depth = start.to(self.device), depth.to(self.device)
        self.cum_foreground = _running_total(foreground * sampled).to(self.device)
        self.cum_background = _running_total(background * sampled).to(self.device)

    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[dict[str, Any]],
        device: torch.device | str | None = None,
        border: int = 1,
        image_key: str = "image",
        label_key: str = "label",
    ) -> SliceBank:
        """The bank of a dataset of preprocessed volumes (e.g. MONAI's ``CacheDataset``), read item by item."""
        items = [dataset[i] for i in range(len(dataset))]
        return cls([d[image_key] for d in items], [d[label_key] for d in items], device, border)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])

    def sample_slices(
        self, volumes: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Bank indices of one slice per entry of ``volumes``, each drawn as ``RandCropByPosNegLabeld`` draws a crop
        centre: a uniformly drawn foreground voxel's slice where ``positive``, else a background voxel's (a volume
        without foreground, or without background, gives the other kind)."""
        start = self.start[volumes]
        fg_base, bg_base = self.cum_foreground[start], self.cum_background[start]
        end = start + self.depth[volumes]
        fg_total, bg_total = self.cum_foreground[end] - fg_base, self.cum_background[end] - bg_base
        use_fg = (positive & (fg_total > 0)) | (bg_total == 0)
        total = torch.where(use_fg, fg_total, bg_total)
        u = torch.rand(volumes.shape, generator=generator, device=self.device, dtype=torch.float64)
        offset = torch.minimum((u * total).long(), (total - 1).clamp_min(0))
        in_fg = torch.searchsorted(self.cum_foreground, fg_base + offset, right=True) - 1
        in_bg = torch.searchsorted(self.cum_background, bg_base + offset, right=True) - 1
        return torch.where(use_fg, in_fg, in_bg)

    def stacks(self, centres: torch.Tensor, volumes: torch.Tensor, context: str = "neighbors") -> torch.Tensor:
        """2.5D inputs ``(B, 3, X, Y)``: slices z-1, z, z+1 (``neighbors``) or z three times (``repeat``)."""
        offsets = self._offsets[context]
        first = self.start[volumes][:, None]
        last = first + self.depth[volumes][:, None] - 1
        index = torch.minimum(torch.maximum(centres[:, None] + offsets, first), last)
        return self.images[index]


def _volume(value: Any, name: str) -> torch.Tensor:
    volume = torch.as_tensor(value.as_tensor() if hasattr(value, "as_tensor") else value).detach().cpu()
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"SliceBank: {name} must be (1, X, Y, Z) or (X, Y, Z), got {tuple(volume.shape)}.")
    return volume


def _running_total(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts.long(), 0)])


class SliceAugmentation:
    """Random 2D augmentation of a batch of slices, drawn per slice, as batched tensor ops on the batch's device.

    The same draws as the per-sample MONAI transforms of the recipe, in their order: ``RandAffined`` (rotation
    ``U(±rotate_range)`` rad, scaling ``1 + U(±scale_range)`` and translation ``U(±translate_range)`` pixels on each
    axis, about the centre; image bilinear, label nearest, zeros outside), ``RandScaleIntensityd``
    (``× (1 + U(±intensity_scale))``), ``RandShiftIntensityd`` (``+ U(±intensity_shift)``) and
    ``RandGaussianNoised`` (standard deviation drawn from ``U(0, noise_std)``), each applied to a slice with its
    probability.

    Args:
        affine_prob, rotate_range, scale_range, translate_range: the random affine.
        intensity_scale_prob, intensity_scale: random intensity scaling.
        intensity_shift_prob, intensity_shift: random intensity shift.
        noise_prob, noise_std: random Gaussian noise.
    """

    def __init__(
        self,
        affine_prob: float = 0.5,
        rotate_range: float = 0.26,
        scale_range: float = 0.15,
        translate_range: float = 4.0,
        intensity_scale_prob: float = 0.5,
        intensity_scale: float = 0.1,
        intensity_shift_prob: float = 0.5,
        intensity_shift: float = 0.1,
        noise_prob: float = 0.2,
        noise_std: float = 0.02,
    ) -> None:
        self.affine_prob, self.rotate_range = affine_prob, rotate_range
        self.scale_range, self.translate_range = scale_range, translate_range
        self.intensity_scale_prob, self.intensity_scale = intensity_scale_prob, intensity_scale
        self.intensity_shift_prob, self.intensity_shift = intensity_shift_prob, intensity_shift
        self.noise_prob, self.noise_std = noise_prob, noise_std

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image (B, C, X, Y)`` float, ``label (B, 1, X, Y)`` integer → augmented image and label (int64)."""
        image, label = self.affine(image, label, generator)
        return self.intensity(image, generator), label

    def _uniform(self, shape: Sequence[int], low: float, high: float, like: torch.Tensor, generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype) * (high - low) + low

    def _chosen(self, prob: float, like: torch.Tensor, generator) -> torch.Tensor:
        return torch.rand(like.shape[0], generator=generator, device=like.device) < prob

    def affine(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random affine of each slice (identity where not drawn), image and label alike."""
        b = image.shape[0]
        angle = self._uniform((b,), -self.rotate_range, self.rotate_range, image, generator)
        scale = self._uniform((b, 2), 1 - self.scale_range, 1 + self.scale_range, image, generator)
        shift = self._uniform((b, 2), -self.translate_range, self.translate_range, image, generator)
        chosen = self._chosen(self.affine_prob, image, generator)
        angle = torch.where(chosen, angle, 0.0)
        scale = torch.where(chosen[:, None], scale, 1.0)
        shift = torch.where(chosen[:, None], shift, 0.0)
        return affine_warp(image, label, angle, scale, shift)

    def intensity(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random intensity scale, shift and Gaussian noise of each slice."""
        b = image.shape[0]
        per_slice = (b, *([1] * (image.ndim - 1)))
        factor = self._uniform(per_slice, -self.intensity_scale, self.intensity_scale, image, generator)
        offset = self._uniform(per_slice, -self.intensity_shift, self.intensity_shift, image, generator)
        std = self._uniform(per_slice, 0.0, self.noise_std, image, generator)
        factor = factor * self._chosen(self.intensity_scale_prob, image, generator).view(per_slice)
        offset = offset * self._chosen(self.intensity_shift_prob, image, generator).view(per_slice)
        std = std * self._chosen(self.noise_prob, image, generator).view(per_slice)
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        return image * (1 + factor) + offset + noise * std


def affine_warp(
    image: torch.Tensor, label: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp each slice of a batch by its own affine about the slice centre, as MONAI's ``Affine`` (and so
    ``RandAffined``) does: each output pixel p (relative to the centre) samples the input at
    ``R(angle) · (diag(scale) · p + shift)``.

    Args:
        image: ``(B, C, X, Y)`` float, resampled bilinearly; label: ``(B, 1, X, Y)``, nearest; zeros outside both.
        angle: ``(B,)`` rotation in radians; scale: ``(B, 2)`` and shift: ``(B, 2)`` in pixels, both as
            ``(column, row)`` (``affine_grid``'s x, y).

    Returns:
        The warped image and the warped label (int64).
    """
    b, _, height, width = image.shape
    # in affine_grid's normalised (x = column, y = row) coordinates: A_n = D⁻¹ · R · diag(scale) · D and
    # t_n = D⁻¹ · R · shift, with D = diag(width / 2, height / 2) the pixels per normalised unit (written out
    # with Python scalars: a tensor made from a list would be a blocking copy to the device)
    hx, hy = width / 2, height / 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    (sx, sy), (tx, ty) = scale.unbind(-1), shift.unbind(-1)
    row_x = torch.stack([cos * sx, -sin * sy * (hy / hx), (cos * tx - sin * ty) / hx], dim=-1)
    row_y = torch.stack([sin * sx * (hx / hy), cos * sy, (sin * tx + cos * ty) / hy], dim=-1)
    theta = torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 1, height, width], align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    label = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image, label.round().long()


class DeviceSliceLoader:
    """The training loader: batches of 2.5D slices sampled from a :class:`SliceBank` on the device and augmented
    there.

    Each step draws ``volumes_per_batch`` volumes (with replacement) and ``slices_per_volume`` slices of each, as
    ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 3), pos, neg)`` did: with probability ``pos / (pos + neg)`` the
    slice of a uniformly drawn foreground voxel, else a background voxel's. It yields
    ``{"image": (B, 3, X, Y) float32, "label": (B, 1, X, Y) int64}`` with ``B = volumes_per_batch ×
    slices_per_volume``. The bank is built once, when the loader is made (the volumes' deterministic transforms
    run then, as in a ``CacheDataset``).

    Random draws come from a generator on the device seeded with (``seed``, rank, epoch): reproducible, different
    on each rank of a distributed run, and different each epoch. The trainer calls :meth:`set_epoch` as each epoch
    starts (so a resumed run does not repeat its first epochs' draws); without it, each pass counts as an epoch.

    Args:
        dataset: the volumes after the deterministic transforms, items ``{"image": (1, X, Y, Z), "label": ...}``.
        device: the training device.
        volumes_per_batch: volumes per step.
        slices_per_volume: slices per volume and step.
        pos, neg: ratio of foreground to background slice draws.
        context: ``"neighbors"`` (slices z-1, z, z+1) or ``"repeat"`` (slice z three times).
        augmentation: called as ``augmentation(image, label, generator)``; e.g. :class:`SliceAugmentation`.
        steps_per_epoch: steps per epoch; default ``ceil(volumes / (volumes_per_batch × world size))``, about one
            pass over the volumes as before, but at least ``min_steps_per_epoch``.
        min_steps_per_epoch: floor of the default, so that a few volumes do not make epochs of one or two steps.
        border: padding slices at each end of the cached volumes (the ``BorderPadd`` of the transforms).
        seed: base seed.
        num_classes: foreground classes K of the network; a label map holding a larger value is refused when the
            loader is made (one line naming the file), rather than failing in the loss.
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        device: torch.device | str | None = None,
        volumes_per_batch: int = 4,
        slices_per_volume: int = 8,
        pos: float = 3.0,
        neg: float = 1.0,
        context: str = "neighbors",
        augmentation: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        steps_per_epoch: int | None = None,
        min_steps_per_epoch: int = 10,
        border: int = 1,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        num_classes: int | None = None,
    ) -> None:
        if context not in ("neighbors", "repeat"):
            raise ValueError(f"context must be 'neighbors' or 'repeat', got {context!r}.")
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"pos and neg must be non-negative, not both 0; got {pos} and {neg}.")
        if volumes_per_batch < 1 or slices_per_volume < 1:
            raise ValueError("volumes_per_batch and slices_per_volume must be at least 1.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.volumes_per_batch, self.slices_per_volume = volumes_per_batch, slices_per_volume
        self.pos_ratio = pos / (pos + neg)
        self.context = context
        self.augmentation = augmentation
        self.steps_per_epoch, self.min_steps_per_epoch = steps_per_epoch, min_steps_per_epoch
        self.seed = seed
        self.bank = SliceBank.from_dataset(dataset, self.device, border, image_key, label_key)
        if num_classes is not None:
            self._check_labels(dataset, int(num_classes), label_key)
        self._epoch: int | None = None
        self._passes = 0

    @property
    def batch_size(self) -> int:
        return self.volumes_per_batch * self.slices_per_volume

    def _check_labels(self, dataset: Sequence[dict[str, Any]], num_classes: int, label_key: str) -> None:
        """One look at the bank's largest label (a single host sync, when the loader is made)."""
        if self.bank.num_volumes == 0 or int(self.bank.labels.max()) <= num_classes:
            return
        largest = self.bank.labels.flatten(1).amax(dim=1)
        volume = int(torch.searchsorted(self.bank.start, torch.nonzero(largest > num_classes)[0, 0], right=True)) - 1
        items = getattr(dataset, "data", None)
        source = items[volume].get(label_key) if isinstance(items, Sequence) and volume < len(items) else None
        where = source if isinstance(source, str) else f"training volume {volume}"
        value = int(largest[largest > num_classes][0])
        raise ConfigError(f"label map {where} holds the value {value}, but the bundle has {num_classes} classes "
                          "(label_names): make a bundle for this dataset's labels with `python -m ic_moe_monai "
                          "init_bundle`.")  # fmt: skip

    def __len__(self) -> int:
        if self.bank.num_volumes == 0:
            return 0
        if self.steps_per_epoch:
            return int(self.steps_per_epoch)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return max(self.min_steps_per_epoch, math.ceil(self.bank.num_volumes / (self.volumes_per_batch * world)))

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pass's draws with this epoch number."""
        self._epoch = int(epoch)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The device generator of one epoch on this process's rank."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = np.random.SeedSequence([self.seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator(device=self.device).manual_seed(int(state) & (2**63 - 1))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self._epoch if self._epoch is not None else self._passes + 1
        self._passes += 1
        self._epoch = None
        generator = self.epoch_generator(epoch)
        for _ in range(len(self)):
            yield self.sample(generator)

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One training batch."""
        device, batch = self.device, self.batch_size
        volumes = torch.randint(self.bank.num_volumes, (self.volumes_per_batch,), generator=generator, device=device)
        volumes = volumes[:, None].expand(-1, self.slices_per_volume).reshape(-1)
        positive = torch.rand(batch, generator=generator, device=device) < self.pos_ratio
        centres = self.bank.sample_slices(volumes, positive, generator)
        image = self.bank.stacks(centres, volumes, self.context)
        label = self.bank.labels[centres][:, None]
        if self.augmentation is not None:
            image, label = self.augmentation(image, label, generator)
        return {"image": image, "label": label.long()}
