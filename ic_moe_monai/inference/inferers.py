"""Volume inference with a 2D / 2.5D network: :class:`SliceContextInferer`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference

from ic_moe_monai.amp import autocast, resolve_amp_dtype
from ic_moe_monai.errors import config_flag
from ic_moe_monai.inference.quality import QualitySignals
from ic_moe_monai.networks.ensemble import average_predictions, mirror_flips

__all__ = ["SliceContextInferer", "channel_argmax", "neighbor_stack", "uncertainty_map"]

Progress = Callable[[int, int], None]


def neighbor_stack(volume: torch.Tensor, indices: torch.Tensor, context: str = "neighbors") -> torch.Tensor:
    """2.5D inputs of the slices ``indices`` of ``volume`` ``(X, Y, Z)`` → ``(len(indices), 3, X, Y)`` (contiguous).

    ``neighbors``: slices z-1, z, z+1, the border slice repeated at either end (as edge padding does in
    training); ``repeat``: slice z three times.
    """
    last = volume.shape[-1] - 1
    if context == "repeat":
        offsets = (0, 0, 0)
    elif context == "neighbors":
        offsets = (-1, 0, 1)
    else:
        raise ValueError(f"context must be 'neighbors' or 'repeat', got {context!r}.")
    slices = volume.movedim(-1, 0)  # (Z, X, Y): a view; for a NIfTI-ordered volume each slice is contiguous
    return torch.stack([slices[(indices + o).clamp(0, last)] for o in offsets], dim=1)


class SliceContextInferer(Inferer):
    """Segment a 3D volume slice by slice with a 2.5D network, in batches of slices.

    Each slice becomes a 3-channel input (itself and its neighbours, or itself repeated), is brought to the
    network's ``img_size`` in-plane (``mode="resize"``: bilinear resize there and back; ``mode="sliding_window"``:
    MONAI's sliding window over the native in-plane grid), and its logits (or labels) are written back into the
    volume. As in MONAI's ``SlidingWindowInferer``, the slice batches are made where the input lies, run on
    ``sw_device`` and stitched on ``device``; with everything on one GPU the whole chain (stacking, resizing, network,
    argmax, stitching) stays there, and memory beyond the input is the output plus one batch's work.

    Args:
        img_size: the network's square input size.
        batch_size: slices per network call.
        context: ``"neighbors"`` (2.5D) or ``"repeat"`` (the slice three times).
        mode: ``"resize"`` or ``"sliding_window"``.
        overlap: sliding-window overlap.
        sw_device: where the slice batches go through the network (default: the input's device).
        device: where the stitched output is kept and returned (default: the input's device).
        amp: autocast the network on CUDA (a no-op on other devices).
        amp_dtype: the autocast dtype: ``"auto"`` (bfloat16 where supported, else float16), ``"bfloat16"``,
            ``"float16"`` (see :func:`ic_moe_monai.amp.resolve_amp_dtype`).
        slice_axis: spatial axis along which slices are taken (2 = the last, axial after RAS orientation).
        progress: default callable ``(done, total)`` called after each batch; a call's own ``progress`` wins.
        argmax: return the label of each voxel ``(B, 1, X, Y, Z)`` (uint8) instead of the logits; the argmax is
            taken per batch of slices (upsampled in bounded chunks), so the volume's logits are never held at once.
        chunk_bytes: with ``argmax``, full-resolution float32 logits are made for at most this many bytes at a time.
        mirror_axes: test-time augmentation: in-plane axes (0, 1) of each slice to mirror; the softmax of every
            mirrored copy is flipped back and averaged (nnU-Net's mirroring), and the output is the log of the
            average. Empty: the network's own logits.
        quality: collect each volume's quality signals while segmenting it (one softmax per slice batch, see
            :class:`~ic_moe_monai.inference.quality.QualitySignals`); a call leaves them in :attr:`last_signals`, one
            dict per volume.
    """

    def __init__(
        self,
        img_size: int,
        batch_size: int = 16,
        context: str = "neighbors",
        mode: str = "resize",
        overlap: float = 0.25,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        amp: bool = False,
        amp_dtype: str | torch.dtype = "auto",
        slice_axis: int = 2,
        progress: Progress | None = None,
        argmax: bool = False,
        chunk_bytes: int = 2**28,
        mirror_axes: Sequence[int] = (),
        quality: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("resize", "sliding_window"):
            raise ValueError(f"mode must be 'resize' or 'sliding_window', got {mode!r}.")
        if context not in ("neighbors", "repeat"):
            raise ValueError(f"context must be 'neighbors' or 'repeat', got {context!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        resolve_amp_dtype(amp_dtype)  # an unknown name fails here, not at the first CUDA call
        self.img_size = img_size
        self.batch_size = int(batch_size)
        self.context = context
        self.mode = mode
        self.overlap = overlap
        self.sw_device = sw_device
        self.device = device
        self.amp = config_flag(amp, "amp")  # "false" from a command line is off
        self.amp_dtype = amp_dtype
        self.slice_axis = slice_axis
        self.progress = progress
        self.argmax = argmax
        self.chunk_bytes = chunk_bytes
        self.flips = mirror_flips(mirror_axes)
        self.quality = config_flag(quality, "quality")
        self.last_signals: list[dict] = []
        self.last_uncertainty: list[torch.Tensor] = []

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Callable[..., Any],
        *args: Any,
        progress: Progress | None = None,
        mirror: bool = True,
        uncertainty: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """inputs ``(B, 1, X, Y, Z)`` → logits ``(B, K+1, X, Y, Z)`` (float32), or labels ``(B, 1, X, Y, Z)`` (uint8)
        with ``argmax``, on ``device``.

        Args:
            inputs: the volumes, on any device.
            network: the 2D network; ``args`` and ``kwargs`` are passed to it, as MONAI's inferers do.
            progress: called with ``(slices done, slices in the volume)`` after each batch.
            mirror: False skips the test-time mirroring of ``mirror_axes`` for this call (e.g. when the network
                records what it sees).
            uncertainty: with ``argmax``, also leave each volume's :func:`uncertainty_map` ``(1, X, Y, Z)`` (uint8,
                at the input's size) in :attr:`last_uncertainty`, computed batch by batch from the logits.
        """
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"SliceContextInferer expects a (B, 1, X, Y, Z) volume, got {tuple(inputs.shape)}.")
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        device = torch.device(self.device) if self.device is not None else inputs.device
        # plain tensors from here on: MetaTensor bookkeeping on every slice op costs time and is not needed
        volumes = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        volumes = volumes.movedim(2 + self.slice_axis, -1)  # slices last (a view)
        report = progress if progress is not None else self.progress
        run = _Run(network, args, kwargs, sw_device, device, report, self.flips if mirror else [()])
        run.uncertainty = bool(uncertainty and self.argmax)
        self.last_signals, self.last_uncertainty = [], []
        outputs = [self._volume(v[0], run) for v in volumes]
        output = outputs[0][None] if len(outputs) == 1 else torch.stack(outputs, dim=0)  # no copy for one volume
        return output.movedim(-1, 2 + self.slice_axis)

    def _volume(self, volume: torch.Tensor, run: _Run) -> torch.Tensor:
        depth = volume.shape[-1]
        result: torch.Tensor | None = None
        unsure: torch.Tensor | None = None
        run.signals = QualitySignals() if self.quality else None
        for start in range(0, depth, self.batch_size):
            run.first_slice = start
            indices = torch.arange(start, min(start + self.batch_size, depth), device=volume.device)
            stack = neighbor_stack(volume, indices, self.context).to(run.sw_device, non_blocking=True)
            out = self._predict(stack.float(), run)  # (b, K+1, X, Y) float32 logits, or (b, 1, X, Y) uint8 labels
            out = out.to(run.device)  # blocking: a non-blocking copy to the host could be read before it lands
            if result is None:
                result = _slice_major(out.shape[1], volume.shape, out.dtype, run.device)
            result[..., start : start + len(indices)] = out.permute(1, 2, 3, 0)
            if run.uncertainty:
                if unsure is None:
                    unsure = _slice_major(1, volume.shape, torch.uint8, run.device)
                unsure[..., start : start + len(indices)] = run.unsure.to(run.device).permute(1, 2, 3, 0)
            if run.progress is not None:
                run.progress(start + len(indices), depth)
        if run.signals is not None:
            self.last_signals.append(run.signals.result())
        if unsure is not None:
            self.last_uncertainty.append(unsure.movedim(-1, 1 + self.slice_axis))
        return result

    def _predict(self, stack: torch.Tensor, run: _Run) -> torch.Tensor:
        """Logits ``(b, K+1, X, Y)`` of a slice batch at its own size, or labels ``(b, 1, X, Y)`` with ``argmax``."""
        size = (self.img_size, self.img_size)
        with autocast(stack.device, self.amp, self.amp_dtype):
            if self.mode == "sliding_window":
                logits = sliding_window_inference(
                    stack,
                    roi_size=size,
                    sw_batch_size=stack.shape[0],
                    predictor=run.predict,
                    overlap=self.overlap,
                    mode="gaussian",
                )
                run.record(stack, logits, tuple(stack.shape[-2:]))
                return self._labels(logits, run) if self.argmax else logits.float()
            native = tuple(stack.shape[-2:])
            if native != size:
                stack = F.interpolate(stack, size=size, mode="bilinear", align_corners=False)
            logits = run.predict(stack)
            run.record(stack, logits, native)
        if native == size:
            return self._labels(logits, run) if self.argmax else logits.float()
        if not self.argmax:
            return _resize(logits, native)
        # full-resolution logits for a bounded number of slices at a time: batch size does not set the peak memory
        per_slice = logits.shape[1] * native[0] * native[1] * 4
        step = max(1, self.chunk_bytes // per_slice)
        labels, unsure = [], []
        for part in logits.split(step):
            labels.append(self._labels(_resize(part, native), run))
            if run.uncertainty:
                unsure.append(run.unsure)
        if run.uncertainty:
            run.unsure = torch.cat(unsure)
        return torch.cat(labels)

    @staticmethod
    def _labels(logits: torch.Tensor, run: _Run) -> torch.Tensor:
        """The labels of full-resolution ``logits``; with ``run.uncertainty``, their :func:`uncertainty_map` into
        ``run.unsure``."""
        if run.uncertainty:
            run.unsure = uncertainty_map(logits)
        return channel_argmax(logits)


class _Run:
    """What one inferer call needs below ``__call__``: the network, its extra arguments and the devices."""

    def __init__(self, network: Callable, args: tuple, kwargs: dict, sw_device: torch.device, device: torch.device,
                 progress: Progress | None, flips: list[tuple[int, ...]]) -> None:  # fmt: skip
        self.network, self.args, self.kwargs, self.progress = network, args, kwargs, progress
        self.sw_device, self.device, self.flips = sw_device, device, flips
        self.signals: QualitySignals | None = None
        self.first_slice = 0
        self.uncertainty = False  # also make the uncertainty map of each batch (into ``unsure``)
        self.unsure: torch.Tensor | None = None

    def record(self, stack: torch.Tensor, logits: torch.Tensor, native: tuple[int, ...]) -> None:
        """Add a batch to the volume's quality signals, when they are collected."""
        if self.signals is not None:
            self.signals.add(stack, logits, native, self.first_slice)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits for a slice batch, or the log of its mirror-averaged probabilities."""
        if len(self.flips) == 1:
            return _logits(self.network(x, *self.args, **self.kwargs))
        return average_predictions([lambda v: self.network(v, *self.args, **self.kwargs)], x, self.flips)


def _slice_major(channels: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty ``(channels, X, Y, Z)`` tensor whose slices are contiguous and x-fastest, as NIfTI stores them: each
    batch is written as one block, and the labelmap is written to a file (or to the host) without a transpose."""
    x, y, z = shape
    return torch.empty((z, channels, y, x), dtype=dtype, device=device).permute(1, 3, 2, 0)


def _resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def uncertainty_map(logits: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Where the network is unsure: ``(B, C, ...)`` logits (or log-probabilities) → ``(B, 1, ...)`` uint8,
    ``255 × (1 - max softmax) / (1 - 1/C)``: 0 where one class has all the probability, 255 where all have the same.
    Computed ``chunk`` items of the batch at a time, so that no float copy of all the logits is made."""
    scale = 255.0 * logits.shape[1] / max(logits.shape[1] - 1, 1)
    out = torch.empty((logits.shape[0], 1, *logits.shape[2:]), dtype=torch.uint8, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        top = torch.softmax(logits[start : start + chunk].float(), dim=1).amax(dim=1, keepdim=True)
        out[start : start + chunk] = ((1.0 - top) * scale).round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=1, keepdim=True)`` as uint8, by a running maximum over the few channels: several times
    faster on CPU than ``argmax`` along a strided axis. Ties go to the lower channel, as with ``argmax``."""
    best = logits[:, :1].clone()
    labels = torch.zeros_like(best, dtype=torch.uint8)
    for channel in range(1, logits.shape[1]):
        candidate = logits[:, channel : channel + 1]
        better = candidate > best
        labels.masked_fill_(better, channel)
        best = torch.maximum(best, candidate)
    return labels


def _logits(output: Any) -> torch.Tensor:
    return output["logits"] if isinstance(output, dict) else output
