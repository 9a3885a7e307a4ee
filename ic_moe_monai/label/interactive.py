"""Click- and box-driven refinement of the automatic segmentation with SAM prompts, with cached image embeddings.

:class:`InteractiveSegmenter` is the engine behind the interactive MONAI Label model; it needs no MONAI Label and
is tested on its own. The first request on an image runs the automatic segmentation slice by slice and keeps
every slice's image embedding; a click then runs only SAM's prompt encoder and mask decoder on its slice, and a box
(two opposite corners; one slice or several) re-decodes each of its slices with the box as SAM's box prompt, the
label kept to the box on those slices.

The cost of a request is linear in its clicks: their number is capped (``max_clicks``), clicks on the same voxel
count once, each slice's decoder sees at most ``max_prompts`` of them (the latest; SAM's attention over prompt
tokens is quadratic), and the reach of the clicks is one distance transform per slice. Images are checked from
their header (size limit, dimensions, voxel type) before they are read.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from scipy.ndimage import distance_transform_edt

from ic_moe_monai.inference.inferers import channel_argmax
from ic_moe_monai.inference.postprocessing import keep_largest_component
from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
from ic_moe_monai.io import Case
from ic_moe_monai.io.guards import ImageError, check_image_file

__all__ = ["MAX_CLICKS", "MAX_PROMPTS", "ClickError", "InteractiveSegmenter", "parse_box", "parse_clicks"]

MAX_CLICKS = 256  # clicks per request (foreground and background together)
MAX_PROMPTS = 32  # clicks of one slice given to SAM's decoder (the latest of each kind)


class ClickError(ValueError):
    """Malformed clicks or label in a request; the message says which and why."""


@dataclass
class _CachedImage:
    data: dict[str, Any]  # the bundle's preprocessing output: "image" (1, X, Y, Z) in the network's orientation
    original_affine: np.ndarray  # the loaded image's affine, in which clicks are given
    original_shape: tuple[int, int, int]
    inputs: torch.Tensor  # (Z, C, S, S) preprocessed network inputs, for the detail branch
    embeddings: torch.Tensor  # (Z, D, h, w) image embeddings
    auto: torch.Tensor  # (X, Y, Z) uint8 automatic labels in the preprocessed grid
    quality: dict[str, Any] | None = None  # the automatic answer's CaseQuality.as_dict() (a calibrated bundle)


def parse_clicks(clicks: Any, shape: Sequence[int], name: str) -> np.ndarray:
    """Validate a click list ``[[x, y, z], ...]`` (voxel indices of the image as loaded) → ``(N, 3)`` floats.

    Coordinates may be fractional (a point within a voxel, from -0.5 to the size - 0.5 along each axis).

    Raises:
        ClickError: when it is not a list of three finite numbers each, or a click lies outside the image.
    """
    if clicks is None:
        return np.zeros((0, 3))
    if isinstance(clicks, (str, bytes)) or not isinstance(clicks, Sequence):
        raise ClickError(f"{name} must be a list of [x, y, z] voxel indices, got {clicks!r:.80}.")
    parsed = []
    for click in clicks:
        values = _three_numbers(click)
        if values is None:
            raise ClickError(f"{name}: each click must be [x, y, z] (three numbers), got {click!r:.80}.")
        if not all(-0.5 <= v < s - 0.5 for v, s in zip(values, shape, strict=True)):
            raise ClickError(f"{name}: click {click!r:.80} lies outside the image of shape {tuple(shape)}.")
        parsed.append(values)
    return np.asarray(parsed, dtype=np.float64).reshape(-1, 3)


def parse_box(box: Any, shape: Sequence[int], name: str = "box") -> np.ndarray | None:
    """Validate a box ``[[x0, y0, z0], [x1, y1, z1]]`` (two opposite corners, voxel indices of the image as loaded;
    ``z0 == z1`` for a box drawn on one slice) → ``(2, 3)`` floats, or ``None`` for no box.

    Raises:
        ClickError: when it is not two corners of three finite numbers, or a corner lies outside the image.
    """
    if box is None or (isinstance(box, Sequence) and not isinstance(box, (str, bytes)) and len(box) == 0):
        return None
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 2:
        raise ClickError(f"{name} must be two corners [[x0, y0, z0], [x1, y1, z1]], got {box!r:.80}.")
    return parse_clicks(box, shape, name)


def _three_numbers(click: Any) -> list[float] | None:
    if isinstance(click, (str, bytes)) or not isinstance(click, Sequence) or len(click) != 3:
        return None
    values = []
    for v in click:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            number = float(v)  # a huge JSON integer overflows here, not in numpy
        except OverflowError:
            return None
        if not np.isfinite(number):
            return None
        values.append(number)
    return values


class InteractiveSegmenter:
    """Automatic segmentation refined by foreground / background clicks, one bundle, several images cached.

    Args:
        bundle: the bundle folder; its network must be an :class:`~ic_moe_monai.networks.ICMoE` and its inferer a
            :class:`~ic_moe_monai.inference.inferers.SliceContextInferer` in ``resize`` mode.
        configs: config files merged after ``inference.json``.
        device: where the network runs.
        max_images: images whose embeddings stay cached (least recently used ones are dropped).
        click_radius: the refinement reaches this far from a click, in voxels of the slice (default: 15 % of the
            slice's larger side, at least 5); the mask is left as it is beyond.
        max_clicks: clicks per request, foreground and background together (more are refused).
        max_prompts: clicks of one slice given to SAM's decoder as prompts (the latest of each kind); every click
            still holds at its own voxel and widens the reach.
        max_image_bytes: size limit of an image as float32, checked from its header before it is read (default
            :func:`~ic_moe_monai.io.guards.max_image_bytes`).
    """

    def __init__(
        self,
        bundle: str | Path,
        configs: Sequence[str] = (),
        device: torch.device | str = "cpu",
        max_images: int = 4,
        click_radius: float | None = None,
        max_clicks: int = MAX_CLICKS,
        max_prompts: int = MAX_PROMPTS,
        max_image_bytes: int | str | None = None,
    ) -> None:
        self.segmenter = BundleSegmenter(bundle, list(configs), torch.device(device), batch_size=16)
        self.network = self.segmenter.network
        self.inferer = self.segmenter.inferer
        if not hasattr(self.network, "image_features") or getattr(self.inferer, "mode", None) != "resize":
            raise ValueError(f"bundle {bundle}: interactive use needs an ICMoE network and a resize-mode inferer.")
        self.label_names = self.segmenter.label_names
        self.max_images = max_images
        self.click_radius = click_radius
        self.max_clicks, self.max_prompts, self.max_image_bytes = int(max_clicks), int(max_prompts), max_image_bytes
        self._cache: OrderedDict[tuple[str, float], _CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._weights_mtime = os.path.getmtime(self.segmenter.ckpt_path)

    # ------------------------------------------------------------------------------------------------ API
    def __call__(
        self,
        image_path: str | Path,
        foreground: Any = None,
        background: Any = None,
        label: int | str | None = None,
        box: Any = None,
    ) -> tuple[MetaTensor, dict[str, Any]]:
        """Labels ``(1, X, Y, Z)`` (uint8) in the image's own geometry, and facts about the answer.

        Args:
            image_path: a NIfTI / NRRD / MHA file.
            foreground: clicks ``[[x, y, z], ...]`` in voxel indices of the image as loaded, on the object.
            background: clicks off the object.
            label: the label the clicks and the box are about (value or name; default the first label).
            box: two opposite corners ``[[x0, y0, z0], [x1, y1, z1]]`` in voxel indices of the image as loaded,
                around the label on the slices from ``z0`` to ``z1`` (one slice where they are equal): those slices
                are decoded with the box as prompt and keep the label inside it only.
        """
        start = time.perf_counter()
        value = self._label_value(label)
        self.check_click_count(foreground, background)
        with self._lock:
            self._reload_if_retrained()
            cached, hit = self._cached(Path(image_path))
            fg = parse_clicks(foreground, cached.original_shape, "foreground")
            bg = parse_clicks(background, cached.original_shape, "background")
            corners = parse_box(box, cached.original_shape)
            labels, slices = self._refine(cached, fg, bg, value, corners)
            data = dict(cached.data)
            data["pred"] = MetaTensor(
                labels[None], meta=dict(data["image"].meta), applied_operations=list(data["image"].applied_operations)
            )
            result = self._keep_largest(self.segmenter.inverter(data)["pred"], value if slices else None)
        info = {"label_names": {name: v for v, name in self.label_names.items()}, "label": value,
                "refined_slices": slices, "embedding_cache": "hit" if hit else "miss", "quality": cached.quality,
                "seconds": round(time.perf_counter() - start, 4)}  # fmt: skip
        return result, info

    def _keep_largest(self, labels: MetaTensor, clicked: int | None) -> MetaTensor:
        """The bundle's component cleaning (``keep_largest_component``) in the image's own geometry, as its
        postprocessing does; a label the user clicked on keeps every piece (a click may add one on purpose)."""
        if not self.segmenter.keep_largest_component:
            return labels
        values = [v for v in self.label_names if v != 0 and v != clicked]
        return keep_largest_component(labels, applied_labels=values)

    def check_click_count(self, foreground: Any, background: Any) -> None:
        """Refuse more than ``max_clicks`` clicks in one request, before anything is read or parsed.

        Raises:
            ClickError: naming the count and the limit.
        """
        count = sum(len(c) for c in (foreground, background) if isinstance(c, Sequence) and not isinstance(c, str))
        if count > self.max_clicks:
            raise ClickError(f"{count} clicks in one request; at most {self.max_clicks} are taken.")

    # ------------------------------------------------------------------------------------------------ cache
    def _reload_if_retrained(self) -> None:
        """New weights (a training run replaced the checkpoint) make every cached embedding stale."""
        mtime = os.path.getmtime(self.segmenter.ckpt_path)
        if mtime != self._weights_mtime:
            self.segmenter.load_weights()
            self._cache.clear()
            self._weights_mtime = mtime

    def _cached(self, path: Path) -> tuple[_CachedImage, bool]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file.")
        key = (str(path.resolve()), os.path.getmtime(path))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], True
        check_image_file(path, self.max_image_bytes)  # before any voxel is read
        try:
            image = load_case(Case(name=path.name, kind="image", path=path))
        except ImageError:
            raise
        except ValueError as err:  # the loader's one-line reasons (unreadable, truncated, NaN voxels, ...)
            raise ImageError(str(err)) from err
        entry = self._embed(image)
        self._cache[key] = entry
        while len(self._cache) > self.max_images:
            self._cache.popitem(last=False)
        return entry, False

    @torch.inference_mode()
    def _embed(self, image: MetaTensor) -> _CachedImage:
        """The bundle's automatic segmentation through its own inferer, keeping each slice's embedding on the way."""
        data = self.segmenter.preprocess(image)
        inputs, embeddings = [], []

        views = len(self.inferer.flips)  # with test-time mirroring a batch holds each slice's mirror images too

        def recording_network(x: torch.Tensor) -> torch.Tensor:  # the inferer's slice batches arrive in order
            embedding, net_input = self.network.image_features(x)
            keep = x.shape[0] // views  # the unmirrored slices come first
            inputs.append(net_input[:keep])
            embeddings.append(embedding[:keep])
            return self.network.predict_from_embedding(embedding, net_input)

        labels = self.inferer(data["image"][None].to(self.segmenter.device), recording_network)  # (1, 1, X, Y, Z)
        quality = self.segmenter.assess_last(data["image"])
        if self.segmenter.keep_largest_component:  # clicks refine the cleaned answer the bundle itself gives
            labels = keep_largest_component(labels[0])[None]
        return _CachedImage(quality=None if quality is None else quality.as_dict(),
                            data=data, original_affine=np.asarray(image.affine, dtype=np.float64),
                            original_shape=tuple(image.shape), inputs=torch.cat(inputs),
                            embeddings=torch.cat(embeddings), auto=labels[0, 0].cpu())  # fmt: skip

    @staticmethod
    def _to_slice(logits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(shape):
            return logits
        return F.interpolate(logits.float(), size=tuple(shape), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------------------------------------ clicks
    def _label_value(self, label: int | str | None) -> int:
        names = {name.lower(): v for v, name in self.label_names.items() if v != 0}
        if label is None or label == "":
            return min(names.values())
        if isinstance(label, str) and label.lower() in names:
            return names[label.lower()]
        if isinstance(label, (int, str)) and str(label).isdigit() and int(label) in names.values():
            return int(label)
        raise ClickError(f"label {label!r} is not one of the model's labels {sorted(names)}.")

    @torch.inference_mode()
    def _refine(
        self, cached: _CachedImage, fg: np.ndarray, bg: np.ndarray, value: int, box: np.ndarray | None = None
    ) -> tuple[torch.Tensor, list]:
        """The automatic labels, re-decoded with the box on its slices, then with the clicks as prompts on each
        clicked slice near the clicks (with the box too where the slice is one of the box's)."""
        labels = cached.auto.clone()
        if len(fg) + len(bg) == 0 and box is None:
            return labels, []
        shape = labels.shape
        box_grid = None if box is None else self._to_grid(cached, box)
        box_slices = [] if box_grid is None else list(range(int(box_grid[:, 2].min()), int(box_grid[:, 2].max()) + 1))
        for z in box_slices:
            footprint = np.zeros(shape[:2], dtype=bool)
            lo, hi = box_grid[:, :2].min(axis=0), box_grid[:, :2].max(axis=0)
            footprint[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1] = True
            prompted = self._prompted(cached, z, np.zeros((0, 2), np.int64), np.zeros(0, bool), box_grid)
            plane = labels[..., z]
            plane[plane == value] = 0  # on the box's slices the label lies inside the box
            plane[torch.from_numpy(footprint) & (prompted == value)] = value
        if len(fg) + len(bg) == 0:
            return labels, box_slices
        points = self._to_grid(cached, np.concatenate([fg, bg]))
        is_fg = np.array([True] * len(fg) + [False] * len(bg))
        radius = self.click_radius or max(5.0, 0.15 * max(shape[0], shape[1]))
        slices = sorted({int(z) for z in points[:, 2]})
        for z in slices:
            on_slice = points[:, 2] == z
            pts, positive = _latest_unique(points[on_slice, :2], is_fg[on_slice])
            prompt_pts, prompt_positive = _latest_of_each(pts, positive, self.max_prompts)
            with_box = box_grid if z in box_slices else None
            prompted = self._prompted(cached, z, prompt_pts, prompt_positive, with_box)  # (X, Y) labels
            seeds = np.ones(shape[:2], dtype=bool)
            seeds[pts[:, 0], pts[:, 1]] = False
            near = torch.from_numpy(distance_transform_edt(seeds) <= radius)  # one pass, whatever the clicks
            plane = labels[..., z]
            plane[near & (plane == value)] = 0
            plane[near & (prompted == value)] = value
            rows, cols = torch.from_numpy(pts[:, 0]), torch.from_numpy(pts[:, 1])
            held = plane[rows, cols]  # a click always holds at its voxel
            plane[rows, cols] = torch.where(torch.from_numpy(positive), value, torch.where(held == value, 0, held)).to(
                plane.dtype
            )
        return labels, sorted(set(slices) | set(box_slices))

    @staticmethod
    def _to_grid(cached: _CachedImage, voxels: np.ndarray) -> np.ndarray:
        """Voxel indices ``(N, 3)`` of the image as loaded → integer indices in the preprocessed grid."""
        grid = np.linalg.inv(np.asarray(cached.data["image"].affine, dtype=np.float64)) @ cached.original_affine
        # each point to its voxel in the image's own grid first: -0.5 on an axis the network's grid mirrors would
        # otherwise round to one past the last index there
        voxels = np.clip(np.rint(voxels), 0, np.asarray(cached.original_shape) - 1)
        points = voxels @ grid[:3, :3].T + grid[:3, 3]
        return np.clip(np.rint(points).astype(np.int64), 0, np.asarray(cached.auto.shape) - 1)

    def _prompted(
        self, cached: _CachedImage, z: int, pts: np.ndarray, positive: np.ndarray, box: np.ndarray | None = None
    ) -> torch.Tensor:
        """Labels of slice ``z`` decoded with the clicks as SAM point prompts and the box (two corners in the
        preprocessed grid) as its box prompt (cached embedding, decoder only)."""
        shape = cached.auto.shape[:2]
        scale = np.array([self.inferer.img_size / shape[1], self.inferer.img_size / shape[0]])
        device = self.segmenter.device
        points = point_labels = boxes = None
        if len(pts):
            xy = (pts[:, ::-1] + 0.5) * scale - 0.5  # SAM points are (x = column, y = row) in input pixels
            points = torch.as_tensor(xy, dtype=torch.float32, device=device)[None]
            point_labels = torch.as_tensor(positive.astype(np.int64), device=device)[None]
        if box is not None:  # the box's outer edges, as (x0, y0, x1, y1) pixel positions of the network's input
            lo, hi = box[:, :2].min(axis=0)[::-1], box[:, :2].max(axis=0)[::-1]
            corners = np.concatenate([lo * scale, (hi + 1) * scale - 1])
            boxes = torch.as_tensor(corners, dtype=torch.float32, device=device)[None]
        logits = self.network.predict_from_embedding(
            cached.embeddings[z : z + 1],
            cached.inputs[z : z + 1],
            points=points,
            point_labels=point_labels,
            boxes=boxes,
        )
        return channel_argmax(self._to_slice(logits, shape))[0, 0].cpu()


def _latest_unique(points: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (voxel, kind) once, keeping the order of their last occurrence."""
    keys = np.concatenate([points, positive[:, None].astype(np.int64)], axis=1)[::-1]
    _, first = np.unique(keys, axis=0, return_index=True)
    keep = np.sort(len(keys) - 1 - first)
    return points[keep], positive[keep]


def _latest_of_each(points: np.ndarray, positive: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` clicks: the latest of each kind, half the limit each (a kind with fewer leaves the rest to
    the other)."""
    if len(points) <= limit:
        return points, positive
    fg, bg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_bg = min(len(bg), max(limit // 2, limit - len(fg)))
    keep = np.sort(np.concatenate([fg[len(fg) - (limit - n_bg) :], bg[len(bg) - n_bg :]]))
    return points[keep], positive[keep]
