"""Label postprocessing: keep the largest connected component of each label (nnU-Net's postprocessing).

nnU-Net (Isensee et al., Nature Methods 2021) removes all but the largest connected component of a class when that
raises cross-validation Dice. MONAI's ``KeepLargestConnectedComponentd`` needs scikit-image (or cuCIM on a GPU);
:class:`KeepLargestComponentd` does the same with SciPy, per label, inside each label's bounding box, on the CPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from ic_moe_monai.errors import config_flag

__all__ = ["KeepLargestComponentd", "keep_largest_component"]


def keep_largest_component(
    labels: torch.Tensor | np.ndarray, applied_labels: Sequence[int] | None = None, connectivity: int = 3
) -> torch.Tensor | np.ndarray:
    """Set every voxel of a label outside its largest connected component to 0 (background).

    Args:
        labels: a labelmap ``(1, X, Y, Z)`` (channel first) or ``(X, Y, Z)`` of integer values.
        applied_labels: the label values to clean (default: every value present but 0).
        connectivity: 1 (faces), 2 (faces and edges) or 3 (faces, edges and corners) in 3D.

    Returns:
        a labelmap of the same type, shape, device and metadata.
    """
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    cleaned = array.copy()
    volume = cleaned[0] if cleaned.ndim == 4 else cleaned
    values = applied_labels if applied_labels is not None else _present_values(volume)
    structure = ndimage.generate_binary_structure(volume.ndim, connectivity)
    for value in values:
        mask = volume == value
        box = _bounding_box(mask)
        if box is None:
            continue
        components, count = ndimage.label(mask[box], structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region = volume[box]
        region[(components != sizes.argmax()) & mask[box]] = 0
    if not isinstance(labels, torch.Tensor):
        return cleaned
    result = labels.clone()
    result.copy_(torch.from_numpy(cleaned))
    return result


def _present_values(volume: np.ndarray) -> list[int]:
    if volume.dtype.kind in "ub" and volume.dtype.itemsize == 1:
        counts = np.bincount(volume.ravel(), minlength=1)  # one pass, far faster than np.unique on large volumes
        return [int(v) for v in np.nonzero(counts)[0] if v != 0]
    return [v.item() for v in np.unique(volume) if v != 0]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding ``mask``'s voxels, or None when it has none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


class KeepLargestComponentd(MapTransform):
    """Dictionary transform of :func:`keep_largest_component`.

    Args:
        keys: labelmap keys (``(1, X, Y, Z)`` label values, not one-hot).
        applied_labels: label values to clean (default: every value present but 0).
        connectivity: 1, 2 or 3 (3D neighbourhood, as SciPy's ``generate_binary_structure``).
        enabled: False (or "false", "no", "0") passes the data through: a bundle option switched from the command line.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        applied_labels: Sequence[int] | None = None,
        connectivity: int = 3,
        enabled: bool | str = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}.")
        self.applied_labels = None if applied_labels is None else [int(v) for v in applied_labels]
        self.connectivity = connectivity
        self.enabled = config_flag(enabled, "enabled")  # "false" from a command line is off

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            d[key] = keep_largest_component(d[key], self.applied_labels, self.connectivity)
        return d
