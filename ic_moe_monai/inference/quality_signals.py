"""What the quality score is computed from: the network's own outputs collected while a volume is segmented
(:class:`QualitySignals`) and the volume's geometry (:func:`geometry_signals`). :mod:`ic_moe_monai.inference.quality`
turns them into the score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["HISTOGRAM_BINS", "QualitySignals", "geometry_signals"]


HISTOGRAM_BINS = 16


class QualitySignals:
    """Accumulates a volume's quality signals from its slice batches (see the module docstring).

    Call :meth:`add` with every batch of network inputs and logits, then :meth:`result`. All sums stay on the
    batches' device until :meth:`result` reads them once.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.sums = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add(self, image: torch.Tensor, logits: torch.Tensor, native: Sequence[int], first_slice: int) -> None:
        """One batch of slices.

        Args:
            image: the network's input ``(b, C, h, w)`` in [0, 1]; its middle channel is the slice itself.
            logits: the network's logits ``(b, K+1, h, w)`` for it.
            native: the slices' own in-plane size ``(X, Y)``: sums are scaled to native voxels.
            first_slice: index of the batch's first slice along the slice axis.
        """
        b, channels, h, w = logits.shape
        scale = float(native[0] * native[1]) / float(h * w)  # native voxels per network pixel
        probs = torch.softmax(logits.float(), dim=1)
        top2 = probs.topk(2, dim=1).values if channels > 1 else torch.cat([probs, torch.zeros_like(probs)], 1)
        labels = probs.argmax(dim=1)  # (b, h, w)
        onehot = torch.nn.functional.one_hot(labels, channels).movedim(-1, 1).to(probs.dtype)[:, 1:]  # (b, K, h, w)
        fg = probs[:, 1:]
        self._add("pred", onehot.sum(dim=(0, 2, 3)) * scale)
        self._add("soft", fg.sum(dim=(0, 2, 3)) * scale)
        self._add("inter", (fg * onehot).sum(dim=(0, 2, 3)) * scale)
        self._add("margin", ((top2[:, 0] - top2[:, 1])[:, None] * onehot).sum(dim=(0, 2, 3)) * scale)
        self._add("band", ((fg > 0.2) & (fg < 0.8)).sum(dim=(0, 2, 3)).to(probs.dtype) * scale)
        # centroids in native voxel indices (x, y in-plane, z the slice), sums of index × voxel
        xs = (torch.arange(h, device=probs.device, dtype=probs.dtype) + 0.5) * (native[0] / h) - 0.5
        ys = (torch.arange(w, device=probs.device, dtype=probs.dtype) + 0.5) * (native[1] / w) - 0.5
        zs = torch.arange(first_slice, first_slice + b, device=probs.device, dtype=probs.dtype)
        self._add("sum_x", (onehot * xs[None, None, :, None]).sum(dim=(0, 2, 3)) * scale)
        self._add("sum_y", (onehot * ys[None, None, None, :]).sum(dim=(0, 2, 3)) * scale)
        self._add("sum_z", (onehot * zs[:, None, None, None]).sum(dim=(0, 2, 3)) * scale)
        centre = image[:, image.shape[1] // 2].float()
        self._add("histogram", torch.histc(centre.clamp(0, 1), bins=HISTOGRAM_BINS, min=0.0, max=1.0))
        self._add("pixels", torch.tensor(float(centre.numel()), device=centre.device))
        self._add("intensity", centre.sum())
        self._add("intensity_sq", (centre * centre).sum())
        self._add(
            "abs_diff",
            (centre[:, 1:] - centre[:, :-1]).abs().sum() + (centre[:, :, 1:] - centre[:, :, :-1]).abs().sum(),
        )
        self._add("diff_count", torch.tensor(float(b * ((h - 1) * w + h * (w - 1))), device=centre.device))

    def result(self) -> dict[str, Any]:
        """The volume's signals: per label (index 1 … K, as lists) ``self_dice``, ``margin``, ``voxels`` and
        ``centroid_voxel``; for the image ``histogram`` (shares), ``roughness``."""
        if not self.sums:
            raise ValueError("no slices were added.")
        s = {k: v.cpu().numpy() for k, v in self.sums.items()}
        pred, soft, inter = s["pred"], s["soft"], s["inter"]
        denominator = soft + pred
        # nothing predicted and nothing expected: the model is sure the label is absent
        self_dice = np.where(denominator > 1e-6, 2 * inter / np.maximum(denominator, 1e-12), 1.0)
        margin = np.where(pred > 0, s["margin"] / np.maximum(pred, 1e-12), 0.0)
        band = s["band"] / np.maximum(pred, 1.0)
        centroid = np.stack([s["sum_x"], s["sum_y"], s["sum_z"]], axis=1) / np.maximum(pred, 1e-12)[:, None]
        pixels = float(s["pixels"])
        mean = float(s["intensity"]) / pixels
        std = math.sqrt(max(float(s["intensity_sq"]) / pixels - mean * mean, 0.0))
        roughness = float(s["abs_diff"]) / max(float(s["diff_count"]), 1.0) / max(std, 1e-6)
        return {
            "self_dice": self_dice.tolist(),
            "margin": margin.tolist(),
            "band": band.tolist(),
            "voxels": pred.tolist(),
            "centroid_voxel": [c.tolist() if p > 0 else None for c, p in zip(centroid, pred, strict=True)],
            "histogram": (s["histogram"] / max(s["histogram"].sum(), 1.0)).tolist(),
            "roughness": roughness,
        }


def geometry_signals(signals: Mapping[str, Any], affine: Any, shape: Sequence[int], slice_axis: int = 2) -> dict:
    """Add the geometry to a volume's :meth:`QualitySignals.result`: ``extent_mm`` per axis of the image as the
    network saw it (RAS after the bundle's orientation), each label's ``volume_ml`` and ``centroid_mm``.

    Args:
        signals: :meth:`QualitySignals.result` of the volume.
        affine: the preprocessed image's 4 × 4 voxel-to-world affine.
        shape: its spatial shape ``(X, Y, Z)``.
        slice_axis: the axis the slices were taken along (the signals' ``z``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    in_plane = [a for a in range(3) if a != slice_axis]
    centroids = []
    for c in signals["centroid_voxel"]:
        if c is None:
            centroids.append(None)
            continue
        index = np.zeros(3)
        index[in_plane[0]], index[in_plane[1]], index[slice_axis] = c
        centroids.append((affine[:3, :3] @ index + affine[:3, 3]).tolist())
    return dict(signals) | {
        "extent_mm": (spacing * np.asarray(shape, dtype=np.float64)).tolist(),
        "volume_ml": [v * voxel_ml for v in signals["voxels"]],
        "centroid_mm": centroids,
    }
