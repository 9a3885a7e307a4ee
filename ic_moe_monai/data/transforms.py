"""Transforms of the IC-MoE data pipeline that MONAI does not already provide.

- :class:`IntensityPresetd`: one switch for the modality's intensity normalisation to [0, 1]
  (CT: a window level/width; MR: robust percentiles), with MONAI's ``ScaleIntensityRange`` arithmetic on any device.
- :func:`percentile`: percentiles of a whole volume on its own device, bounded in time and memory for large ones.
- :class:`LabelToImageGridd`: each label resampled onto its image's voxel grid by their affines (nearest, 0 outside
  the label), so a label cropped to the annotated slices (as a DICOM SEG reads back) pairs with its image voxel by
  voxel.
- :class:`SliceNeighborsd`: a ``(C, X, Y, 3)`` crop of three consecutive axial slices (as
  ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 3))`` samples them) → the 2.5D network input ``(3, X, Y)``
  and the middle slice's label ``(1, X, Y)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from ic_moe_monai.errors import ConfigError

__all__ = [
    "CT_WINDOWS",
    "MODALITIES",
    "IntensityPresetd",
    "LabelToImageGridd",
    "SliceNeighborsd",
    "ct_window",
    "label_to_image_grid",
    "modality_name",
    "percentile",
]

# Common CT windows (level, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),
}
# Intensity presets: "ct" (a window in HU) and "mr" (percentiles; also for any non-quantitative modality).
MODALITIES = ("ct", "mr")


def modality_name(modality: str) -> str:
    """``"ct"`` or ``"mr"`` (``"mri"`` accepted) for a modality setting.

    Raises:
        ConfigError: any other value, in one line listing the choices.
    """
    name = str(modality).strip().lower()
    if name == "mri":
        name = "mr"
    if name not in MODALITIES:
        raise ConfigError(f"modality {modality!r} is not one of 'ct' (a CT window) or 'mr' (percentile "
                          "normalisation, for MR and other non-quantitative images).")  # fmt: skip
    return name


def ct_window(window: str | Sequence[float]) -> tuple[float, float]:
    """A CT window as ``(level, width)`` in HU: the name of one of :data:`CT_WINDOWS` or ``[level, width]``.

    Raises:
        ConfigError: an unknown name or a value that is not two numbers with a positive width, in one line.
    """
    if isinstance(window, str):
        key = window.strip().lower()
        if key not in CT_WINDOWS:
            names = ", ".join(CT_WINDOWS)
            raise ConfigError(f"ct_window {window!r} is not a known window ({names}); or give [level, width] in HU.")
        return CT_WINDOWS[key]
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"ct_window {window!r}: give a window name or [level, width] in HU.") from err
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise ConfigError(f"ct_window {window!r}: level and width must be finite numbers, the width positive.")
    return level, width


def percentile(x: torch.Tensor, q: Sequence[float], max_samples: int = 2**23) -> torch.Tensor:
    """The percentiles ``q`` (0–100) of all values of ``x``, interpolated linearly as ``numpy.percentile`` does,
    as a float32 tensor on ``x``'s device.

    Up to ``max_samples`` values the result is exact and equals MONAI's ``percentile`` (``torch.quantile`` up to
    1M values, NumPy's partition above, on the CPU). A larger volume is subsampled with a stride coprime to each of
    its dimensions, so that every slice, row and column contributes: at 2²³ samples the estimate's rank error is
    about 3e-5, far below what a [0, 1] normalisation can show. Why not MONAI's: above 1M values it copies the
    tensor to NumPy, which takes a CUDA volume to the host; ``torch.quantile`` refuses more than 16M values on
    some versions and sorts all of them; and both cost seconds on a 512 × 512 × 300 volume. The values are read in
    memory order, so a Fortran-ordered volume (as NIfTI stores it) is not copied first.
    """
    flat, sizes = _memory_order_values(x)
    if flat.numel() > max_samples:
        step = -(-flat.numel() // max_samples)
        while any(math.gcd(step, s) != 1 for s in sizes if s > 1):
            step += 1
        flat = flat[::step]
    flat = flat.float()  # torch.quantile needs floats; int16 CT / MR values are exact in float32
    if flat.device.type == "cpu" and flat.numel() > 1_000_000:  # NumPy's O(n) partition beats a full sort
        values = np.percentile(flat.numpy(), np.asarray(q, dtype=np.float64))
        return torch.as_tensor(values, dtype=torch.float32)
    return torch.quantile(flat, torch.as_tensor(q, dtype=torch.float32, device=flat.device) / 100.0)


def _memory_order_values(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All values of ``x`` as a 1-D view in memory order (a copy only when ``x`` is not dense), and the sizes of its
    dimensions in that order."""
    x = x.as_tensor() if isinstance(x, MetaTensor) else x
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    in_memory_order = x.permute(order)
    sizes = list(in_memory_order.shape)
    if in_memory_order.is_contiguous():
        return in_memory_order.view(-1), sizes
    return in_memory_order.reshape(-1), sizes


def _scale_to_unit(image: torch.Tensor, a_min: torch.Tensor | float, a_max: torch.Tensor | float) -> torch.Tensor:
    """MONAI's ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)``, same arithmetic and result, on one float32
    copy of ``image`` with its memory layout kept: MONAI's makes the tensor C-contiguous (a transposing copy of a
    NIfTI volume, about a second for 512 × 512 × 300 on a CPU) and allocates a new tensor per operation."""
    out = image.to(torch.float32, copy=True)  # keeps the strides (and the meta of a MetaTensor)
    values = out.as_tensor() if isinstance(out, MetaTensor) else out  # in-place arithmetic without meta overhead
    width = a_max - a_min
    if bool(width == 0):
        warnings.warn("Divide by zero (a_min == a_max)", Warning, stacklevel=3)
        values.sub_(a_min)
        return out
    values.sub_(a_min).div_(width).clamp_(0.0, 1.0)
    return out


class IntensityPresetd(MapTransform):
    """Normalise image intensities to [0, 1] by modality.

    The result equals MONAI's ``ScaleIntensityRanged`` (CT) and ``ScaleIntensityRangePercentilesd`` (MR) with
    ``b_min=0, b_max=1, clip=True`` (float32), computed on the image's own device without leaving it, and with
    its memory layout kept (see :func:`percentile` for volumes beyond ``max_samples`` voxels).

    Args:
        keys: image keys.
        modality: ``"ct"`` (window) or ``"mr"`` (percentiles; also for any non-quantitative modality); anything
            else raises a :class:`~ic_moe_monai.errors.ConfigError`.
        window: CT ``(level, width)`` in HU, or the name of one of :data:`CT_WINDOWS` (see :func:`ct_window`).
        percentiles: MR lower and upper percentiles mapped to 0 and 1.
        max_samples: MR percentiles are exact up to this many voxels, estimated from a subsample beyond.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "mr",
        window: Sequence[float] | str = "abdomen",
        percentiles: Sequence[float] = (0.5, 99.5),
        max_samples: int = 2**23,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = modality_name(modality)
        if self.modality == "ct":
            level, width = ct_window(window)
            self.window = (level - width / 2, level + width / 2)
        else:
            self.percentiles = tuple(float(p) for p in percentiles)
        self.max_samples = max_samples

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, torch.Tensor):
                image = convert_to_tensor(image, track_meta=get_track_meta())
            elif get_track_meta() and not isinstance(image, MetaTensor):
                image = MetaTensor(image)
            if self.modality == "ct":
                d[key] = _scale_to_unit(image, *self.window)
            else:
                lower, upper = percentile(image, self.percentiles, self.max_samples).to(image.device)
                d[key] = _scale_to_unit(image, lower, upper)
        return d


class SliceNeighborsd(MapTransform):
    """Three consecutive slices ``(1, X, Y, 3)`` → the 2.5D sample of the middle one.

    Args:
        keys: image keys: become ``(3, X, Y)``, the slices z-1, z, z+1 as channels (``context="neighbors"``),
            or the middle slice three times (``context="repeat"``, SAMed-compatible).
        label_keys: label keys: become the middle slice ``(1, X, Y)``.
        context: ``"neighbors"`` or ``"repeat"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        context: str = "neighbors",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if context not in ("neighbors", "repeat"):
            raise ValueError(f"context must be 'neighbors' or 'repeat', got {context!r}.")
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        self.context = context

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            self._check(key, image)
            stack = image[0].movedim(-1, 0)  # (3, X, Y)
            d[key] = stack[1:2].repeat(3, 1, 1) if self.context == "repeat" else stack
        for key in self.label_keys:
            if key in d:
                self._check(key, d[key])
                d[key] = d[key][..., 1]  # (1, X, Y)
        return d

    @staticmethod
    def _check(key: Hashable, value: torch.Tensor) -> None:
        if value.ndim != 4 or value.shape[0] != 1 or value.shape[-1] != 3:
            raise ValueError(f"SliceNeighborsd: '{key}' must be (1, X, Y, 3), got {tuple(value.shape)}.")


def label_to_image_grid(label: torch.Tensor, image: torch.Tensor, atol: float = 1e-3) -> torch.Tensor:
    """``label`` ``(C, ...)`` on the voxel grid of ``image`` ``(C', ...)``, located by their affines: each image voxel
    takes the label value at the same point in space (nearest neighbour), 0 where the label has no voxel.

    A label on the image's own grid comes back as it is. A label whose grid is the image's up to whole-voxel
    shifts, flips and axis permutations (a crop to the annotated slices, another orientation) is copied voxel for
    voxel, exactly and without interpolation; any other grid is resampled with MONAI's ``ResampleToMatch``
    (nearest, zeros outside). The result keeps the label's data type and carries the image's affine.

    Args:
        label: a channel-first label, a MetaTensor with its affine.
        image: its channel-first image, a MetaTensor with its affine.
        atol: tolerance, in label voxels, for a grid to count as the same or a shifted one.

    Raises:
        ValueError: naming both files, when the label holds foreground and none of it lies in the image.
    """
    if not isinstance(label, MetaTensor) or not isinstance(image, MetaTensor):
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(f"label of shape {tuple(label.shape)} and image of shape {tuple(image.shape)} without "
                             "affines: the label cannot be placed on the image's grid.")  # fmt: skip
        return label
    image_affine = np.asarray(image.affine, dtype=np.float64)
    label_affine = np.asarray(label.affine, dtype=np.float64)
    shape = tuple(int(s) for s in image.shape[1:])
    # image voxel index -> label voxel index
    mapping = np.linalg.solve(label_affine, image_affine)
    if tuple(label.shape[1:]) == shape and np.allclose(mapping, np.eye(4), atol=atol):
        return label
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    permutation = np.abs(linear).argmax(axis=0)  # the label axis each image axis runs along
    signs = np.sign(linear[permutation, range(3)])
    exact = np.zeros((3, 3))
    exact[permutation, range(3)] = signs
    if len(set(permutation)) == 3 and np.allclose(linear, exact, atol=atol) and np.allclose(offset, offset.round(),
                                                                                             atol=atol):  # fmt: skip
        out = _shifted_copy(label, shape, permutation, signs, offset[permutation].round().astype(int))
    else:
        from monai.transforms import ResampleToMatch

        out = ResampleToMatch(mode="nearest", padding_mode="zeros", dtype=torch.float32)(label, image)
        out = out.to(label.dtype)
    result = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(label.meta))
    result.affine = image.affine.clone()
    result.meta["spatial_shape"] = np.asarray(shape)
    if bool(label.any()) and not bool(result.any()):
        raise ValueError(f"label {label.meta.get('filename_or_obj', '')}: none of its foreground lies in the image "
                         f"{image.meta.get('filename_or_obj', '')}: they do not overlap in space.")  # fmt: skip
    return result


def _shifted_copy(
    label: torch.Tensor, shape: tuple[int, ...], permutation: np.ndarray, signs: np.ndarray, offset: np.ndarray
) -> torch.Tensor:
    """The label on a grid where image index ``i`` along axis ``a`` is label index ``signs[a] * i + offset[a]``
    along axis ``permutation[a]``; zeros where that falls outside the label."""
    source = label.as_tensor() if isinstance(label, MetaTensor) else label
    source = source.permute(0, *(int(p) + 1 for p in permutation))  # label axes in the image's axis order
    flip = [a + 1 for a in range(3) if signs[a] < 0]
    sizes = source.shape[1:]
    # along a flipped axis, image index i reads label index offset - i, i.e. flipped index (size - 1 - offset) + i
    start = [int(offset[a]) if signs[a] > 0 else int(sizes[a] - 1 - offset[a]) for a in range(3)]
    if flip:
        source = source.flip(flip)
    out = torch.zeros((source.shape[0], *shape), dtype=source.dtype, device=source.device)
    target, taken = [slice(None)], [slice(None)]
    for a in range(3):
        low, high = max(0, -start[a]), min(shape[a], sizes[a] - start[a])
        if high <= low:
            return out
        target.append(slice(low, high))
        taken.append(slice(low + start[a], high + start[a]))
    out[tuple(target)] = source[tuple(taken)]
    return out


class LabelToImageGridd(MapTransform):
    """Put each label on its image's voxel grid by their geometry (:func:`label_to_image_grid`): nearest
    neighbour, 0 outside the label.

    Meant right after loading (and ``EnsureChannelFirstd``), before anything else touches the pair: labels stored
    apart from their images (a DICOM SEG read back from a PACS covers only the annotated slices; a label exported
    in another orientation) then pair with the image voxel by voxel, as every later transform assumes.

    Args:
        keys: label keys.
        image_key: the key of the image whose grid the labels take.
        atol: tolerance, in label voxels, for a grid to count as the image's (or one shifted by whole voxels).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection = "label", image_key: str = "image", atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_to_image_grid(d[key], d[self.image_key], self.atol)
        return d
