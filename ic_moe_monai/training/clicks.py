"""Simulated clicks and boxes for training the mask decoder to follow SAM point and box prompts.

Without prompts in training, a decoder learns to ignore them and clicks at inference change nothing. Following the
click simulation of interactive segmentation work (SAM's iterative point sampling; DeepEdit / DeepGrow in MONAI),
:class:`ClickPromptBatch` gives a share of the training batches point prompts: per slice, one class is chosen, the
first click goes into the interior of the network's current error for that class (foreground where it missed,
background where it over-segmented), and up to ``max_clicks - 1`` further clicks land inside the class or in a band
just outside it. The target stays the full labelmap, so the clicked and the automatic path learn the same task.

Two implementations of the same rules: :func:`simulate_clicks` (NumPy / SciPy, per slice, clicks drawn in
proportion to the exact Euclidean distance to the region's edge) and :func:`device_clicks` (batched tensor ops on
the batch's device, without a host sync, so that a training step with clicks can run as a CUDA graph; clicks drawn
in proportion to the chessboard distance to the edge, capped at ``max_depth`` pixels). :class:`ClickPromptBatch`
uses the second. :func:`device_boxes` draws SAM box prompts (one class per slice, its bounding box with jittered
sides, as MedSAM trains its box prompts), for both devices.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ic_moe_monai.amp import autocast
from ic_moe_monai.errors import config_flag
from ic_moe_monai.inference.inferers import _logits, channel_argmax
from ic_moe_monai.training.engines import GraphedFunction

__all__ = ["ClickPromptBatch", "device_boxes", "device_clicks", "simulate_clicks"]

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


def _interior_depth(region: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Chessboard distance of each pixel of ``region (B, H, W)`` to the region's edge, capped at ``max_depth``
    (0 outside; beyond the image border counts as inside, as for SciPy's distance transform)."""
    current = region.float()[:, None]
    depth = current.clone()
    for _ in range(max_depth - 1):
        current = -F.max_pool2d(-current, 3, stride=1, padding=1)  # erosion by a 3 × 3 square
        depth = depth + current
    return depth[:, 0]


def _dilate(region: torch.Tensor, iterations: int) -> torch.Tensor:
    """Binary dilation by the 4-neighbour cross, ``iterations`` times (SciPy's ``binary_dilation`` default)."""
    current = region.float()[:, None]
    for _ in range(iterations):
        current = torch.maximum(
            F.max_pool2d(current, (3, 1), stride=1, padding=(1, 0)),
            F.max_pool2d(current, (1, 3), stride=1, padding=(0, 1)),
        )
    return current[:, 0] > 0


def _draw_pixels(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One pixel index per slice of ``weights (B, N)``, with probability ∝ weight (exponential race: the largest
    ``log(u) / w`` wins; zero weights never do)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device).clamp_min(1e-12)
    return (u.log() / weights).argmax(dim=1)


def device_clicks(
    label: torch.Tensor,
    pred: torch.Tensor | None = None,
    num_classes: int = 1,
    max_clicks: int = 3,
    band: int = 3,
    max_depth: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM point prompts for a batch of slices, by the rules of :func:`simulate_clicks`, as batched tensor ops.

    Nothing is read on the host and every shape is fixed, so it runs inside a CUDA graph. Slot 0 holds the first
    click (on the larger error of the chosen class, else inside it; a background click anywhere on a slice with
    nothing to segment), slots 1 … ``max_clicks - 1`` the further clicks; unused slots are padding (label -1).
    Clicks land in proportion to the chessboard distance to the edge of their region, capped at ``max_depth``.

    Args:
        label: ``(B, 1, H, W)`` or ``(B, H, W)`` ground-truth labels.
        pred: optional current prediction, same shape.
        num_classes: foreground classes K (labels 1 … K).
        max_clicks: clicks per slice.
        band: width in pixels of the band outside the object where background clicks land.
        max_depth: cap of the distance weights.
        generator: random generator on the labels' device (default: the global one, which CUDA graphs can capture).

    Returns:
        ``points (B, max_clicks, 2)`` as (x = column, y = row) and ``point_labels (B, max_clicks)`` (1 foreground,
        0 background, -1 padding), on the labels' device.
    """
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be at least 1, got {max_clicks}.")
    gt = label.reshape(label.shape[0], *label.shape[-2:]).long()
    b, height, width = gt.shape
    device = gt.device
    classes = torch.arange(1, num_classes + 1, device=device)
    present = (gt.flatten(1)[:, :, None] == classes).any(dim=1)  # (B, K)
    if pred is not None:
        pred = pred.reshape(gt.shape).long()
        present = present | (pred.flatten(1)[:, :, None] == classes).any(dim=1)
    scores = torch.rand(b, num_classes, generator=generator, device=device).masked_fill(~present, -1.0)
    target = scores.argmax(dim=1) + 1  # a present class, uniformly
    anything = present.any(dim=1)
    inside = gt == target[:, None, None]

    def any_pixel(region: torch.Tensor) -> torch.Tensor:
        return region.flatten(1).any(dim=1)

    # first click: the larger error of the chosen class (foreground where missed, background where over-segmented)
    if pred is not None:
        missed = inside & (pred != target[:, None, None])
        extra = (pred == target[:, None, None]) & ~inside
        larger_missed = missed.flatten(1).sum(1) >= extra.flatten(1).sum(1)
        region = torch.where(larger_missed[:, None, None], missed, extra)
        first_positive = larger_missed.long()
        on_error = any_pixel(region)
        region = torch.where(on_error[:, None, None], region, inside)  # no error: a click inside the class
        first_positive = torch.where(on_error, first_positive, 1)
    else:
        region, first_positive = inside, torch.ones(b, dtype=torch.long, device=device)
    regions, positives, valid = [region], [first_positive], [any_pixel(region)]

    # further clicks: each inside the class or in a band just outside it, up to max_clicks in all
    near = _dilate(inside, band) & ~inside
    further = torch.randint(0, max_clicks, (b,), generator=generator, device=device)
    for slot in range(1, max_clicks):
        positive = torch.rand(b, generator=generator, device=device) < 0.5
        region = torch.where(positive[:, None, None], inside, near)
        regions.append(region)
        positives.append(positive.long())
        valid.append(any_pixel(region) & (further >= slot))

    regions_t = torch.stack(regions, dim=1).flatten(0, 1)  # (B * max_clicks, H, W)
    weights = _interior_depth(regions_t, max_depth).flatten(1)
    pixel = _draw_pixels(weights, generator).view(b, max_clicks)
    labels = torch.where(torch.stack(valid, dim=1), torch.stack(positives, dim=1), PAD)
    # a slice with nothing to segment, or no click at all: one background click on a random pixel
    fallback = ~anything | (labels[:, 0] == PAD)
    anywhere = torch.randint(0, height * width, (b,), generator=generator, device=device)
    pixel[:, 0] = torch.where(fallback, anywhere, pixel[:, 0])
    labels[:, 0] = torch.where(fallback, 0, labels[:, 0])
    labels[:, 1:] = labels[:, 1:].masked_fill(~anything[:, None], PAD)
    points = torch.stack([pixel % width, pixel // width], dim=-1).float()
    return points.masked_fill((labels == PAD)[..., None], 0.0), labels


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first ``True`` along the last axis of ``mask (B, N)`` (0 where none)."""
    return mask.long().argmax(dim=1)


def device_boxes(
    label: torch.Tensor,
    num_classes: int,
    jitter: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SAM box prompts for a batch of slices: per slice a class present in it (uniformly), its bounding box with each
    side moved by up to ``jitter`` times the box's size (a user's box is never tight), as batched tensor ops.

    A slice with nothing to segment gets the whole slice as its box: a box that says nothing, for which the network
    is to give its automatic answer.

    Args:
        label: ``(B, 1, H, W)`` or ``(B, H, W)`` ground-truth labels.
        num_classes: foreground classes K (labels 1 … K).
        jitter: the largest shift of a side, as a share of the box's width (x) or height (y).
        generator: random generator on the labels' device.

    Returns:
        ``boxes (B, 4)`` as ``x0, y0, x1, y1`` in input pixels (float, within the slice), on the labels' device.
    """
    gt = label.reshape(label.shape[0], *label.shape[-2:]).long()
    b, height, width = gt.shape
    device = gt.device
    classes = torch.arange(1, num_classes + 1, device=device)
    present = (gt.flatten(1)[:, :, None] == classes).any(dim=1)  # (B, K)
    scores = torch.rand(b, num_classes, generator=generator, device=device).masked_fill(~present, -1.0)
    inside = gt == (scores.argmax(dim=1) + 1)[:, None, None]
    rows, cols = inside.any(dim=2), inside.any(dim=1)  # (B, H), (B, W)
    y0, y1 = _first_true(rows), height - 1 - _first_true(rows.flip(1))
    x0, x1 = _first_true(cols), width - 1 - _first_true(cols.flip(1))
    tight = torch.stack([x0, y0, x1, y1], dim=1).float()
    size = torch.stack([x1 - x0 + 1, y1 - y0 + 1], dim=1).float().repeat(1, 2)  # (w, h, w, h)
    shift = (torch.rand(b, 4, generator=generator, device=device) * 2 - 1) * jitter * size
    limit = torch.tensor([width - 1, height - 1] * 2, device=device, dtype=torch.float32)
    boxes = torch.minimum((tight + shift).clamp_min(0.0), limit)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    whole = torch.tensor([0.0, 0.0, width - 1.0, height - 1.0], device=device)
    return torch.where(present.any(dim=1)[:, None], boxes, whole)


class ClickPromptBatch:
    """``prepare_batch`` for MONAI's ``SupervisedTrainer`` that adds simulated SAM point prompts to some batches.

    With probability ``prob`` a batch gets prompts (the others stay prompt-free, so the automatic mode keeps being
    trained): a share ``box_prob`` of those a ``boxes`` keyword argument for the network (:func:`device_boxes`, the
    prompt LiteMedSAM was trained on), the rest ``points`` / ``point_labels``. When ``network`` is given, its prediction
    on the batch (one extra forward without gradients) places the first click of each slice on its error. On CUDA
    the clicks are made on the device by :func:`device_clicks`, without a host sync, and with ``cuda_graph`` the forward
    and the clicks run as one CUDA graph (:class:`~ic_moe_monai.training.engines.GraphedFunction`): a clicked batch
    costs the host two graph launches (this one and the trainer's step). On the CPU, :func:`simulate_clicks` (exact
    distance transform, faster there).

    The batch-level draw uses its own generator seeded with ``seed``, so every rank of a distributed run makes the
    same choice at each iteration and runs the same number of forwards. Click positions use ``seed`` plus the rank
    on the CPU, and torch's global generator on CUDA (the one a CUDA graph can capture).

    Args:
        network: the network being trained (plain or DistributedDataParallel); ``None`` for clicks from labels only.
        prob: share of batches that get clicks.
        max_clicks: clicks per slice at most.
        box_prob: share of the prompted batches that get a box per slice instead of clicks.
        box_jitter: the largest shift of a box side, as a share of the box's size.
        band: width in pixels of the band outside the object where background clicks land.
        amp: run the error-finding forward under autocast on CUDA (as the trainer does with ``amp``).
        amp_dtype: its dtype (``"auto"``: bfloat16 where supported; see :mod:`ic_moe_monai.amp`).
        seed: seed of the batch-level draw.
        num_classes: foreground classes K; default: from the network's output (or, without a network, from the
            labels, which reads them on the host).
        max_depth: cap of the distance weights of :func:`device_clicks`.
        cuda_graph: run the error-finding forward and the clicks as a CUDA graph on CUDA.
        image_key, label_key: keys of the batch dictionary.
        forward_keys: further keys of the batch handed to the network as keyword arguments of the same name, in
            every batch (e.g. ``["trunk"]`` for the cached encoder trunk of
            :class:`~ic_moe_monai.training.trunk_cache.TrunkCacheLoader`).
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        prob: float = 0.5,
        max_clicks: int = 3,
        box_prob: float = 0.0,
        box_jitter: float = 0.1,
        band: int = 3,
        amp: bool = False,
        amp_dtype: str | torch.dtype | None = "auto",
        seed: int = 0,
        num_classes: int | None = None,
        max_depth: int = 16,
        cuda_graph: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        forward_keys: Sequence[str] = (),
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}.")
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be at least 1, got {max_clicks}.")
        if not 0.0 <= box_prob <= 1.0:
            raise ValueError(f"box_prob must lie in [0, 1], got {box_prob}.")
        self.network = network
        self.box_prob, self.box_jitter = float(box_prob), float(box_jitter)
        self.prob = prob
        self.max_clicks = max_clicks
        self.band = band
        self.amp = config_flag(amp, "amp")
        self.amp_dtype = amp_dtype
        self.num_classes = num_classes
        self.max_depth = max_depth
        self.image_key, self.label_key = image_key, label_key
        self.forward_keys = tuple(forward_keys or ())
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._draw = random.Random(seed)
        self._rng = np.random.default_rng(seed + (torch.distributed.get_rank() if distributed else 0))
        # not under DistributedDataParallel: its forward may talk to the other ranks, which a graph must not record
        ddp = isinstance(network, torch.nn.parallel.DistributedDataParallel)
        graphed = config_flag(cuda_graph, "cuda_graph") and not ddp
        self._prompts = GraphedFunction(self._click_prompts, enabled=graphed, name="click prompts")

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple:
        """``(image, label)``, or ``(image, label, (), {"points": ..., "point_labels": ...})`` for a clicked batch,
        ``(image, label, (), {"boxes": ...})`` for a boxed one (plus the ``forward_keys`` in the keyword arguments of
        every batch)."""

        def to(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        image, label = to(self.image_key), to(self.label_key)
        if label.dtype != torch.long and not label.is_floating_point():
            label = label.long()
        extra = {key: to(key) for key in self.forward_keys}
        if self._draw.random() >= self.prob:
            return (image, label, (), extra) if extra else (image, label)
        if self.box_prob and self._draw.random() < self.box_prob:
            num_classes = self.num_classes or self._classes(label)
            return image, label, (), {**extra, "boxes": device_boxes(label, num_classes, self.box_jitter)}
        points, point_labels = self._prompts(image, label, *extra.values())
        return image, label, (), {**extra, "points": points, "point_labels": point_labels}

    def _click_prompts(
        self, image: torch.Tensor, label: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred, num_classes = None, self.num_classes
        if self.network is not None:
            logits = self._logits(image, dict(zip(self.forward_keys, extra, strict=True)))
            pred, num_classes = channel_argmax(logits), num_classes or logits.shape[1] - 1
        if not image.is_cuda:  # on the CPU, SciPy's exact distance transform per slice is the faster of the two
            return simulate_clicks(label, pred, self.max_clicks, self.band, self._rng)
        if num_classes is None:
            num_classes = int(label.max())
        return device_clicks(label, pred, num_classes, self.max_clicks, self.band, self.max_depth)

    def _classes(self, label: torch.Tensor) -> int:
        """Foreground classes K from the network's output size, else from the labels (a host read)."""
        out = getattr(getattr(self.network, "module", self.network), "num_classes", None)
        return int(out) if out else max(int(label.max()), 1)

    @torch.no_grad()
    def _logits(self, image: torch.Tensor, extra: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with autocast(image.device, self.amp, self.amp_dtype):
            return _logits(self.network(image, **extra))
