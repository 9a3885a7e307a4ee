"""MONAI Label tasks of the IC-MoE app (needs ``monailabel``; see ``requirements-monailabel.txt``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ic_moe_monai.io.writers import write_nifti_labels
from ic_moe_monai.label.interactive import InteractiveSegmenter

__all__ = ["InteractiveInferTask"]

logger = logging.getLogger(__name__)


class InteractiveInferTask(InferTask):
    """The automatic IC-MoE mask, refined by MONAI Label's ``foreground`` / ``background`` clicks.

    Request keys: ``image`` (a file path, resolved by the app from the image id), ``foreground`` and ``background``
    (lists of ``[x, y, z]`` voxel indices of the image as stored), optional ``label`` (name or value the clicks
    refine; default the first label). Answers a NIfTI labelmap in the image's geometry.

    Args:
        bundle: the bundle folder.
        device: where the network runs.
        max_images: images whose slice embeddings stay cached.
    """

    def __init__(self, bundle: str | Path, device: str = "cpu", max_images: int = 4) -> None:
        self.segmenter = InteractiveSegmenter(bundle, device=device, max_images=max_images)
        names = {name: value for value, name in self.segmenter.label_names.items() if value != 0}
        super().__init__(
            type=InferType.DEEPGROW,
            labels=names,
            dimension=3,
            description="IC-MoE automatic segmentation refined by clicks (SAM point prompts on the clicked slices)",
            config={"label": list(names)},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        labels, info = self.segmenter(
            request["image"], request.get("foreground"), request.get("background"), request.get("label")
        )
        with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
            path = f.name
        write_nifti_labels(np.asarray(labels[0], dtype=np.uint8), np.asarray(labels.affine, dtype=np.float64), path)
        logger.info("interactive: %s", info)
        return path, info
