"""Test-time averaging: several checkpoints and mirrored inputs, one prediction.

nnU-Net (Isensee et al., Nature Methods 2021) averages the softmax of the five cross-validation models, each applied
to the input and its mirror images, and reports that both add accuracy at inference time only.
:class:`AveragedPrediction` does the same for any 2D / 2.5D segmentation network: the mirrored copies go through each
network as one batch, the softmax outputs are flipped back and averaged, and the log of the average is returned, so
``argmax`` (and ``softmax``) of the output are those of the averaged prediction and MONAI inferers, postprocessing
and the bundle's ``SliceContextInferer`` use it as they use the network itself.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["AveragedPrediction", "average_predictions", "load_network_copy", "mirror_flips"]


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the in-plane ``mirror_axes`` (0: H, 1: W) as ``flip`` dims of a ``(B, C, H, W)`` input,
    the identity first: two axes give ``[(), (2,), (3,), (2, 3)]``."""
    if any(a not in (0, 1) for a in mirror_axes):
        raise ValueError(f"mirror_axes are in-plane axes 0 (H) and 1 (W), got {list(mirror_axes)}.")
    axes = sorted({2 + int(a) for a in mirror_axes})
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def average_predictions(
    networks: Sequence[Callable[[torch.Tensor], Any]], x: torch.Tensor, flips: Sequence[tuple[int, ...]]
) -> torch.Tensor:
    """Log of the class probabilities of ``networks`` averaged over the ``flips`` of ``x`` ``(B, C, H, W)``.

    The flipped copies go through each network as one batch; their softmax is flipped back before averaging.
    """
    views = torch.cat([x.flip(dims) if dims else x for dims in flips]) if len(flips) > 1 else x
    total = None
    for network in networks:
        logits = network(views)
        logits = logits["logits"] if isinstance(logits, dict) else logits
        for dims, p in zip(flips, torch.softmax(logits.float(), dim=1).split(x.shape[0]), strict=True):
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
    return torch.log((total / (len(networks) * len(flips))).clamp_min(1e-12))


class AveragedPrediction(nn.Module):
    """Average the class probabilities of one or more networks over in-plane mirror images of the input.

    Args:
        networks: a network or several with the same output classes (e.g. the five folds' models), in eval mode when
            this module is.
        mirror_axes: spatial axes of the ``(B, C, H, W)`` input to mirror (0: H, 1: W); every combination of them
            is used (two axes: 4 passes per network, as nnU-Net does for 2D models). Empty: no mirroring.

    With one network and no mirroring the network's own output is returned unchanged.
    """

    def __init__(self, networks: nn.Module | Sequence[nn.Module], mirror_axes: Sequence[int] = ()) -> None:
        super().__init__()
        members = [networks] if isinstance(networks, nn.Module) else list(networks)
        if not members:
            raise ValueError("AveragedPrediction needs at least one network.")
        self.flips = mirror_flips(mirror_axes)
        self.networks = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → log of the averaged class probabilities ``(B, K+1, H, W)`` (float32)."""
        if len(self.networks) == 1 and len(self.flips) == 1:
            return self.networks[0](x)
        return average_predictions(list(self.networks), x, self.flips)


def load_network_copy(network: nn.Module, ckpt_path: str | Path, device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``network`` (same architecture) holding the weights of ``ckpt_path``, in eval mode.

    For ensembles in bundle configs: ``[load_network_copy(@network_def, p, @device) for p in @ensemble_ckpts]``.

    Raises:
        ValueError: naming the file, when it is missing, not a weights-only checkpoint, or does not fit the network.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"ensemble checkpoint {path}: no such file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for files that are not checkpoints
        raise ValueError(f"ensemble checkpoint {path}: not a readable weights-only checkpoint ({err}).") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    member = copy.deepcopy(network)
    try:
        member.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"ensemble checkpoint {path}: does not fit the network ({first}).") from err
    return member.to(device if device is not None else next(member.parameters()).device).eval()
