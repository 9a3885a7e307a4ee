"""MONAI Label tasks of the IC-MoE app (needs ``monailabel``; see ``requirements-monailabel.txt``).

``InteractiveInferTask`` serves the click engine; ``AutomaticInferTask`` is MONAI Label's own bundle task, reporting
the 3D volumes it takes and returns, and turning a failure to load the image into an :class:`ImageError`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.inference.predictor import _quality_calibration
from ic_moe_monai.inference.quality import QualityCalibration
from ic_moe_monai.inference.quality_signals import geometry_signals
from ic_moe_monai.io.guards import ImageError, _one_line
from ic_moe_monai.io.writers import write_nifti_labels
from ic_moe_monai.label.interactive import MAX_CLICKS, InteractiveSegmenter

__all__ = ["AutomaticInferTask", "InteractiveInferTask"]

logger = logging.getLogger(__name__)


class InteractiveInferTask(InferTask):
    """The automatic IC-MoE mask, refined by MONAI Label's ``foreground`` / ``background`` clicks and a box.

    Request keys: ``image`` (a file path, resolved by the app from the image id), ``foreground`` and ``background``
    (lists of ``[x, y, z]`` voxel indices of the image as stored), optional ``box`` (two opposite corners
    ``[[x0, y0, z0], [x1, y1, z1]]`` around the label, on one slice or several) and ``label`` (name or value the
    clicks and the box refine; default the first label). Answers a NIfTI labelmap in the image's geometry.

    Args:
        bundle: the bundle folder.
        device: where the network runs.
        max_images: images whose slice embeddings stay cached.
        max_clicks: clicks per request.
        max_image_bytes: size limit of an image as float32, checked from its header before it is read.
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "cpu",
        max_images: int = 4,
        max_clicks: int = MAX_CLICKS,
        max_image_bytes: int | None = None,
    ) -> None:
        self.segmenter = InteractiveSegmenter(
            bundle, device=device, max_images=max_images, max_clicks=max_clicks, max_image_bytes=max_image_bytes
        )
        names = {name: value for value, name in self.segmenter.label_names.items() if value != 0}
        super().__init__(
            type=InferType.DEEPGROW,
            labels=names,
            dimension=3,
            description="IC-MoE automatic segmentation refined by clicks and a box (SAM prompts on their slices)",
            config={"label": list(names)},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        labels, info = self.segmenter(
            request["image"],
            request.get("foreground"),
            request.get("background"),
            request.get("label"),
            request.get("box"),
        )
        with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
            path = f.name
        write_nifti_labels(np.asarray(labels[0], dtype=np.uint8), np.asarray(labels.affine, dtype=np.float64), path)
        logger.info("interactive: %s", info)
        return path, info


class AutomaticInferTask(BundleInferTask):
    """MONAI Label's bundle task on the bundle's ``inference.json``, as the stock app serves it, except that:

    - ``/info`` reports dimension 3: the task takes and returns volumes (MONAI Label reads 2 off the network's
      64 × 64 slice input);
    - an image the pre-transforms cannot load (corrupt, truncated, an unsupported layout) raises an
      :class:`ImageError` with one line, which the app answers with 422;
    - with a quality calibration in the bundle (``models/quality.json``, fitted by ``run evaluating`` for these
      weights), the answer's params carry the case's ``quality`` (:meth:`CaseQuality.as_dict
      <ic_moe_monai.inference.quality.CaseQuality.as_dict>`), as ``segment``'s report does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dimension = 3
        self._calibration = self._read_calibration() if getattr(self, "valid", False) else None
        self._inferer_used: Any = None
        self._one_at_a_time = threading.Lock()  # the inferer's signals are of the last volume it segmented

    def _read_calibration(self) -> QualityCalibration | None:
        bundle = Path(self.bundle_path)
        return _quality_calibration(bundle, self.bundle_config, bundle / "models" / "model.pt")

    def inferer(self, data: Any = None) -> Any:
        inferer = super().inferer(data)
        if self._calibration is not None and isinstance(inferer, SliceContextInferer):
            inferer.quality = True
        self._inferer_used = inferer
        return inferer

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        with self._one_at_a_time:
            data = super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
            signals = getattr(self._inferer_used, "last_signals", None) if self._calibration is not None else None
            if signals:
                image = data[self.input_key]
                measured = geometry_signals(signals[0], image.affine, image.shape[1:], self._inferer_used.slice_axis)
                data["result"] = {**(data.get("result") or {}), "quality": self._calibration.assess(measured).as_dict()}
        return data

    def run_pre_transforms(self, data: dict[str, Any], transforms: Any) -> dict[str, Any]:
        try:
            return super().run_pre_transforms(data, transforms)
        except Exception as err:  # loaders raise many types; MONAI wraps them in "applying transform ..."
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ImageError(f"cannot read the image ({_one_line(cause)}).") from err
