"""Simulated clicks for training the mask decoder to follow SAM point prompts.

Without prompts in training, a decoder learns to ignore them and clicks at inference change nothing. Following the
click simulation of interactive segmentation work (SAM's iterative point sampling; DeepEdit / DeepGrow in MONAI),
:class:`ClickPromptBatch` gives a share of the training batches point prompts: per slice, one class is chosen, the
first click goes into the interior of the network's current error for that class (foreground where it missed,
background where it over-segmented), and up to ``max_clicks - 1`` further clicks land inside the class or in a band
just outside it. The target stays the full labelmap, so the clicked and the automatic path learn the same task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ic_moe_monai.amp import autocast
from ic_moe_monai.inferers import _logits, channel_argmax

__all__ = ["ClickPromptBatch", "simulate_clicks"]

PAD = -1  # SAM's label for "no point"


def _sample_interior(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A pixel of ``region`` drawn with probability ∝ its distance to the region's edge (favours the interior)."""
    if not region.any():
        return None
    weights = ndimage.distance_transform_edt(region).ravel()
    index = rng.choice(weights.size, p=weights / weights.sum())
    return divmod(int(index), region.shape[1])


def _click_anywhere(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int, int]:
    """A background click on a random pixel: for a slice with nothing to segment."""
    return int(rng.integers(shape[0])), int(rng.integers(shape[1])), 0


def _slice_clicks(
    gt: np.ndarray, pred: np.ndarray | None, max_clicks: int, band: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """Clicks ``(row, col, is_foreground)`` for one slice, about one class chosen among those present."""
    present = set(np.unique(gt).tolist()) | (set(np.unique(pred).tolist()) if pred is not None else set())
    present.discard(0)
    if not present:  # nothing to segment: a background click anywhere says so
        return [_click_anywhere(gt.shape, rng)]
    target = int(rng.choice(sorted(present)))
    inside = gt == target
    clicks = []
    if pred is not None:
        missed, extra = inside & (pred != target), (pred == target) & ~inside
        # the larger error is corrected first, as a user would
        region, positive = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
        point = _sample_interior(region, rng)
        if point is not None:
            clicks.append((*point, positive))
    if not clicks:
        point = _sample_interior(inside, rng)
        if point is not None:
            clicks.append((*point, 1))
    near = ndimage.binary_dilation(inside, iterations=band) & ~inside
    for _ in range(int(rng.integers(0, max_clicks))):
        if len(clicks) >= max_clicks:
            break
        positive = int(rng.random() < 0.5)
        point = _sample_interior(inside if positive else near, rng)
        if point is not None:
            clicks.append((*point, positive))
    return clicks or [_click_anywhere(gt.shape, rng)]


def simulate_clicks(
    label: torch.Tensor,
    pred: torch.Tensor | None = None,
    max_clicks: int = 3,
    band: int = 3,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM point prompts for a batch of slices.

    Args:
        label: ``(B, 1, H, W)`` or ``(B, H, W)`` ground-truth labels.
        pred: optional current prediction, same shape; the first click of each slice corrects its largest error.
        max_clicks: clicks per slice at most (the batch is padded to this many).
        band: width in pixels of the band outside the object where background clicks land.
        rng: random generator.

    Returns:
        ``points (B, max_clicks, 2)`` as (x = column, y = row) in input pixels, and ``point_labels (B, max_clicks)``
        with 1 foreground, 0 background, -1 padding.
    """
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be at least 1, got {max_clicks}.")
    rng = rng or np.random.default_rng()
    gts = label.reshape(label.shape[0], *label.shape[-2:]).detach().cpu().numpy()
    preds = None if pred is None else pred.reshape(gts.shape).detach().cpu().numpy()
    points = torch.zeros(len(gts), max_clicks, 2)
    labels = torch.full((len(gts), max_clicks), PAD, dtype=torch.int64)
    for i, gt in enumerate(gts):
        for j, (row, col, positive) in enumerate(_slice_clicks(gt, None if preds is None else preds[i], max_clicks,
                                                               band, rng)):  # fmt: skip
            points[i, j] = torch.tensor([col, row], dtype=torch.float32)
            labels[i, j] = positive
    return points.to(label.device), labels.to(label.device)


class ClickPromptBatch:
    """``prepare_batch`` for MONAI's ``SupervisedTrainer`` that adds simulated SAM point prompts to some batches.

    With probability ``prob`` a batch gets ``points`` / ``point_labels`` keyword arguments for the network (the
    others stay prompt-free, so the automatic mode keeps being trained). When ``network`` is given, its prediction
    on the batch (one extra forward without gradients) places the first click of each slice on its error.

    The batch-level draw uses its own generator seeded with ``seed``, so every rank of a distributed run makes the
    same choice at each iteration and runs the same number of forwards.

    Args:
        network: the network being trained (plain or DistributedDataParallel); ``None`` for clicks from labels only.
        prob: share of batches that get clicks.
        max_clicks: clicks per slice at most.
        band: width in pixels of the band outside the object where background clicks land.
        amp: run the error-finding forward under autocast on CUDA (as the trainer does with ``amp``).
        amp_dtype: its dtype (``"auto"``: bfloat16 where supported; see :mod:`ic_moe_monai.amp`).
        seed: seed of the batch-level draw; click positions use ``seed`` plus the process rank.
        image_key, label_key: keys of the batch dictionary.
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        prob: float = 0.5,
        max_clicks: int = 3,
        band: int = 3,
        amp: bool = False,
        amp_dtype: str | torch.dtype | None = "auto",
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}.")
        self.network = network
        self.prob = prob
        self.max_clicks = max_clicks
        self.band = band
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.image_key, self.label_key = image_key, label_key
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        self._draw = random.Random(seed)
        self._rng = np.random.default_rng(seed + rank)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple:
        """``(image, label)``, or ``(image, label, (), {"points": ..., "point_labels": ...})`` for a clicked batch."""
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self._draw.random() >= self.prob:
            return image, label
        pred = None if self.network is None else self._predict(image)
        points, point_labels = simulate_clicks(label, pred, self.max_clicks, self.band, self._rng)
        return image, label, (), {"points": points, "point_labels": point_labels}

    @torch.no_grad()
    def _predict(self, image: torch.Tensor) -> torch.Tensor:
        with autocast(image.device, self.amp, self.amp_dtype):
            return channel_argmax(_logits(self.network(image)))
