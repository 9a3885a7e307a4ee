"""Volume inference with a 2D / 2.5D network: :class:`SliceContextInferer`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference

__all__ = ["SliceContextInferer", "channel_argmax", "neighbor_stack"]


def neighbor_stack(volume: torch.Tensor, indices: torch.Tensor, context: str = "neighbors") -> torch.Tensor:
    """2.5D inputs of the slices ``indices`` of ``volume`` ``(X, Y, Z)`` → ``(len(indices), 3, X, Y)``.

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
    channels = [volume[..., (indices + o).clamp(0, last)] for o in offsets]  # each (X, Y, b)
    return torch.stack(channels, dim=0).permute(3, 0, 1, 2)


class SliceContextInferer(Inferer):
    """Segment a 3D volume slice by slice with a 2.5D network, in batches of slices.

    Each slice becomes a 3-channel input (itself and its neighbours, or itself repeated), is brought to the
    network's ``img_size`` in-plane (``mode="resize"``: bilinear resize there and back; ``mode="sliding_window"``:
    MONAI's sliding window over the native in-plane grid), and its logits are written back into the volume.
    The volume and the result stay on ``sw_device``; only the slice batch moves to ``device``.

    Args:
        img_size: the network's square input size.
        batch_size: slices per network call.
        context: ``"neighbors"`` (2.5D) or ``"repeat"`` (the slice three times).
        mode: ``"resize"`` or ``"sliding_window"``.
        overlap: sliding-window overlap.
        device: where the network runs (default: the input's device).
        sw_device: where the volume and the output live (default: the input's device).
        amp: autocast the network to float16 on CUDA.
        slice_axis: spatial axis along which slices are taken (2 = the last, axial after RAS orientation).
        progress: optional callable ``(done, total)`` called after each batch.
        argmax: return the label of each voxel ``(B, 1, X, Y, Z)`` (uint8) instead of the logits; the argmax is
            taken per batch of slices, so the volume's logits are never held at once (memory for large CT).
    """

    def __init__(
        self,
        img_size: int,
        batch_size: int = 16,
        context: str = "neighbors",
        mode: str = "resize",
        overlap: float = 0.25,
        device: torch.device | str | None = None,
        sw_device: torch.device | str | None = None,
        amp: bool = False,
        slice_axis: int = 2,
        progress: Callable[[int, int], None] | None = None,
        argmax: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("resize", "sliding_window"):
            raise ValueError(f"mode must be 'resize' or 'sliding_window', got {mode!r}.")
        if context not in ("neighbors", "repeat"):
            raise ValueError(f"context must be 'neighbors' or 'repeat', got {context!r}.")
        self.img_size = img_size
        self.batch_size = batch_size
        self.context = context
        self.mode = mode
        self.overlap = overlap
        self.device = device
        self.sw_device = sw_device
        self.amp = amp
        self.slice_axis = slice_axis
        self.progress = progress
        self.argmax = argmax

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """inputs ``(B, 1, X, Y, Z)`` → logits ``(B, K+1, X, Y, Z)`` (float32, on ``sw_device``), or labels
        ``(B, 1, X, Y, Z)`` (uint8) with ``argmax``."""
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"SliceContextInferer expects a (B, 1, X, Y, Z) volume, got {tuple(inputs.shape)}.")
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        device = torch.device(self.device) if self.device is not None else inputs.device
        # plain tensors from here on: MetaTensor bookkeeping on every slice op costs time and is not needed
        volumes = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        volumes = volumes.to(sw_device).movedim(2 + self.slice_axis, -1)  # slices last
        outputs = [self._volume(v[0], network, device, sw_device) for v in volumes]
        return torch.stack(outputs, dim=0).movedim(-1, 2 + self.slice_axis)

    def _volume(
        self, volume: torch.Tensor, network: Callable, device: torch.device, sw_device: torch.device
    ) -> torch.Tensor:
        depth = volume.shape[-1]
        result: torch.Tensor | None = None
        for start in range(0, depth, self.batch_size):
            indices = torch.arange(start, min(start + self.batch_size, depth), device=volume.device)
            stack = neighbor_stack(volume, indices, self.context).to(device=device, dtype=torch.float32)
            logits = self._predict(stack, network)  # (b, K+1, X, Y)
            if self.argmax:
                logits = channel_argmax(logits)
            logits = logits.to(sw_device, logits.dtype if self.argmax else torch.float32)
            if result is None:
                result = torch.empty((logits.shape[1], *volume.shape), dtype=logits.dtype, device=sw_device)
            result[..., start : start + len(indices)] = logits.permute(1, 2, 3, 0)
            if self.progress is not None:
                self.progress(start + len(indices), depth)
        return result

    def _predict(self, stack: torch.Tensor, network: Callable) -> torch.Tensor:
        autocast = (
            torch.autocast("cuda", dtype=torch.float16) if self.amp and stack.device.type == "cuda" else nullcontext()
        )
        size = (self.img_size, self.img_size)
        with autocast:
            if self.mode == "sliding_window":
                logits = sliding_window_inference(
                    stack,
                    roi_size=size,
                    sw_batch_size=stack.shape[0],
                    predictor=lambda x: _logits(network(x)),
                    overlap=self.overlap,
                    mode="gaussian",
                )
            elif tuple(stack.shape[-2:]) == size:
                logits = _logits(network(stack))
            else:
                resized = F.interpolate(stack, size=size, mode="bilinear", align_corners=False)
                logits = F.interpolate(
                    _logits(network(resized)).float(), size=stack.shape[-2:], mode="bilinear", align_corners=False
                )
        return logits


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
