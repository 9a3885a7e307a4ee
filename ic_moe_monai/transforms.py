"""Transforms of the IC-MoE data pipeline that MONAI does not already provide.

- :class:`IntensityPresetd`: one switch for the modality's intensity normalisation to [0, 1]
  (CT: a window level/width; MR: robust percentiles), built from MONAI's own intensity transforms.
- :class:`SliceNeighborsd`: a ``(C, X, Y, 3)`` crop of three consecutive axial slices (as
  ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 3))`` samples them) → the 2.5D network input ``(3, X, Y)``
  and the middle slice's label ``(1, X, Y)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["CT_WINDOWS", "IntensityPresetd", "SliceNeighborsd"]

# Common CT windows (level, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),
}


class IntensityPresetd(MapTransform):
    """Normalise image intensities to [0, 1] by modality.

    Args:
        keys: image keys.
        modality: ``"ct"`` (window) or ``"mr"`` (percentiles; also for any non-quantitative modality).
        window: CT ``(level, width)`` in HU, or the name of one of :data:`CT_WINDOWS`.
        percentiles: MR lower and upper percentiles mapped to 0 and 1.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "mr",
        window: Sequence[float] | str = "abdomen",
        percentiles: Sequence[float] = (0.5, 99.5),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modality = modality.lower()
        if modality == "ct":
            level, width = CT_WINDOWS[window] if isinstance(window, str) else window
            self.scaler = ScaleIntensityRanged(
                keys,
                a_min=level - width / 2,
                a_max=level + width / 2,
                b_min=0.0,
                b_max=1.0,
                clip=True,
                allow_missing_keys=allow_missing_keys,
            )
        elif modality in ("mr", "mri"):
            lower, upper = percentiles
            self.scaler = ScaleIntensityRangePercentilesd(
                keys,
                lower=lower,
                upper=upper,
                b_min=0.0,
                b_max=1.0,
                clip=True,
                allow_missing_keys=allow_missing_keys,
            )
        else:
            raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
        self.modality = modality

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        return self.scaler(data)


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
