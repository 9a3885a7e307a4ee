"""Batch segmentation of a folder of studies with the bundle: ``python -m ic_moe_monai segment INPUT OUTPUT``.

Cases are found by :func:`ic_moe_monai.io.discover_cases` (image files and DICOM series, recursively). Each case
is loaded (DICOM series through ITK, in the series' own geometry), preprocessed, segmented and inverted with the
bundle's own ``preprocessing``, ``inferer`` and weights, and written as a NIfTI labelmap with the input's shape
and affine. Outputs are written under a temporary name and renamed, so an interrupted run never leaves a partial
file; a rerun skips finished cases unless ``overwrite``. A bad case is reported and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import itk
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import ITKReader, MetaTensor, NibabelWriter
from monai.transforms import Compose, Invertd, LoadImage

from ic_moe_monai.io import Case, discover_cases

__all__ = ["CaseResult", "SegmentReport", "segment"]

logger = logging.getLogger(__name__)


@dataclass
class CaseResult:
    name: str
    source: str
    status: str  # "done", "skipped (exists)", "failed"
    output: str | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SegmentReport:
    input: str
    output: str
    settings: dict[str, Any]
    versions: dict[str, str]
    cases: list[CaseResult] = field(default_factory=list)
    not_segmented: list[dict[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded; 1 when a case failed or an input was rejected (bad file, unusable series)."""
        failed = any(c.status == "failed" for c in self.cases) or any(s["failure"] for s in self.not_segmented)
        return 1 if failed else 0


class BundleSegmenter:
    """The bundle's network, preprocessing (less its loader), inferer and checkpoint, ready for one case at a time."""

    def __init__(self, bundle: str | Path, configs: list[str] | None, device: torch.device, batch_size: int) -> None:
        bundle = Path(bundle)
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / "inference.json"), *(configs or [])])
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{device}')"
        parser["inference_batch_size"] = batch_size
        self.device = device
        self.network = parser.get_parsed_content("network")
        ckpt = Path(parser.get_parsed_content("ckpt_path"))
        if not ckpt.is_file():
            raise FileNotFoundError(f"bundle {bundle}: no trained weights at {ckpt}.")
        self.network.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        self.network.eval()
        transforms = parser.get_parsed_content("preprocessing").transforms
        self.preprocessing = Compose([t for t in transforms if type(t).__name__ != "LoadImaged"])
        self.inferer = parser.get_parsed_content("inferer")
        self.inverter = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)

    def __call__(self, image: MetaTensor) -> MetaTensor:
        data = self.preprocessing({"image": image})
        with torch.inference_mode():
            logits = self.inferer(data["image"][None].to(self.device), self.network)
        labels = logits[0].argmax(dim=0, keepdim=True).to(torch.uint8).cpu()
        data["pred"] = MetaTensor(
            labels, meta=dict(data["image"].meta), applied_operations=list(data["image"].applied_operations)
        )
        return self.inverter(data)["pred"]


def load_case(case: Case) -> MetaTensor:
    """The case's image as a MetaTensor ``(X, Y, Z)`` with its affine (RAS), as ``LoadImage`` gives it."""
    try:
        if case.kind == "dicom":
            image = itk.imread([str(f) for f in case.files])
            array, meta = ITKReader().get_data(image)
            meta["original_channel_dim"] = "no_channel"
            meta["filename_or_obj"] = str(case.path)
            tensor = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32)), meta=meta)
        else:
            tensor = LoadImage(image_only=True)(str(case.path))
    except Exception as err:  # readers raise many types for corrupt or truncated files
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{case.path}: cannot read the image ({detail[:200]})") from err
    if tensor.ndim != 3:
        raise ValueError(f"{case.path}: a {tensor.ndim}D image; a 3D volume is needed.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{case.path}: the image holds NaN or infinite values.")
    return tensor


def _write_atomic(labels: MetaTensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial.nii.gz")
    writer = NibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(labels, channel_dim=0)
    writer.set_metadata(labels.meta, resample=False)
    writer.write(str(tmp), verbose=False)
    os.replace(tmp, path)


def segment(
    input: str,
    output: str,
    bundle: str = "bundle",
    config: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    batch_size: int = 32,
    quiet: bool = False,
) -> SegmentReport:
    """Segment every case under INPUT (NIfTI / NRRD / MHA files, DICOM series, or a tree mixing them) into OUTPUT.

    Args:
        input: a file, a DICOM series folder, or a folder tree.
        output: the folder for ``<case>.nii.gz`` labelmaps and ``report.json``.
        bundle: the MONAI bundle folder (``configs/inference.json`` and ``models/model.pt``).
        config: extra config files merged after ``inference.json``, comma-separated (e.g. a profile).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda:N``.
        overwrite: segment cases whose output exists (otherwise they are skipped, so a rerun resumes).
        batch_size: slices per network call.
        quiet: log warnings only.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    torch_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [c for c in (config or "").split(",") if c]
    settings = {"bundle": str(bundle), "config": configs, "device": str(torch_device), "overwrite": overwrite,
                "batch_size": batch_size}  # fmt: skip
    versions = {"python": platform.python_version(), "torch": torch.__version__, "itk": itk.Version.GetITKVersion()}
    report = SegmentReport(input=str(input), output=str(out_dir), settings=settings, versions=versions)
    cases, skipped = discover_cases(input)
    report.not_segmented = [{"path": str(s.path), "reason": s.reason, "failure": s.failure} for s in skipped]
    for s in skipped:
        logger.warning("not segmented: %s: %s", s.path, s.reason)
    segmenter = BundleSegmenter(bundle, configs, torch_device, batch_size) if cases else None
    for case in cases:
        target = out_dir / f"{case.name}.nii.gz"
        result = CaseResult(name=case.name, source=str(case.path), status="done", output=str(target))
        if target.exists() and not overwrite:
            result.status = "skipped (exists)"
            report.cases.append(result)
            continue
        start = time.monotonic()
        try:
            _write_atomic(segmenter(load_case(case)), target)
        except Exception as err:  # one bad case must not stop the batch
            result.status, result.output = "failed", None
            result.error = f"{type(err).__name__}: {err}".splitlines()[0]
            logger.warning("failed: %s: %s", case.path, result.error)
            logger.debug("%s", traceback.format_exc())
        result.seconds = round(time.monotonic() - start, 3)
        logger.info("%s: %s (%.1f s)", case.name, result.status, result.seconds)
        report.cases.append(result)
    tmp = out_dir / ".report.json.partial"
    tmp.write_text(json.dumps(asdict(report) | {"exit_code": report.exit_code}, indent=2) + "\n")
    os.replace(tmp, out_dir / "report.json")
    return report
