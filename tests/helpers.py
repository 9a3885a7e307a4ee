"""Deterministic stand-in networks and small data builders for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"


class ThresholdNet(nn.Module):
    """Classifies each pixel by the middle channel's intensity: < 1/3 → 0, < 2/3 → 1, else 2.

    Pixel-wise and size-agnostic, so the expected labelmap of any volume is known exactly.
    """

    def __init__(self, num_classes: int = 2, **_: object) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(1 / 6, 5 / 6, num_classes + 1).view(1, -1, 1, 1))
        self.scale = nn.Parameter(torch.tensor(100.0))  # one parameter, so checkpoints and optimisers work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x[:, 1:2] - self.centres).abs() * self.scale


def make_msd_folder(hippocampus_dir: Path, target: Path, count: int) -> Path:
    """An MSD-style task folder with the first ``count`` real hippocampus cases."""
    manifest = json.loads((hippocampus_dir / "dataset.json").read_text())
    entries = manifest["training"][:count]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for key in ("image", "label"):
            shutil.copy(hippocampus_dir / entry[key], target / entry[key])
    manifest["training"] = entries
    manifest["numTraining"] = count
    (target / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return target
