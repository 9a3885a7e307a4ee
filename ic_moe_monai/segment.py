"""Batch segmentation of a folder of studies with the bundle: ``python -m ic_moe_monai segment INPUT OUTPUT``.

Cases are found by :func:`ic_moe_monai.io.discover_cases` (image files and DICOM series, recursively). Each case
is loaded (DICOM series through ITK, in the series' own geometry; ITK is imported only for DICOM, NRRD and MHA),
preprocessed, segmented and inverted by the bundle runtime (:class:`~ic_moe_monai.predictor.BundleSegmenter`: the
bundle's own ``preprocessing``, ``inferer`` and weights, on the GPU when there is one), and written in the input's
geometry: a NIfTI labelmap and, on request, a DICOM SEG, label statistics and a preview image. Reading and writing
overlap with segmenting: the next case is loaded in a background thread, and the finished one is written by another.
Outputs are written under a temporary name and renamed, so an interrupted run never leaves a partial file; a rerun
skips finished cases unless ``overwrite``. A bad case is reported and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ic_moe_monai.io import Case, discover_cases
from ic_moe_monai.io.saving import BackgroundWriter
from ic_moe_monai.io.writers import (
    atomic_output,
    label_statistics,
    remove_partial_outputs,
    statistics_csv,
    write_dicom_seg,
    write_nifti_labels,
    write_preview,
    write_statistics,
)
from ic_moe_monai.predictor import BundleSegmenter, load_case

try:  # progress bars are a convenience: without tqdm the run is the same, silent
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements.txt
    tqdm = None

__all__ = ["FORMATS", "BundleSegmenter", "CaseResult", "SegmentReport", "load_case", "segment"]

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom_seg")


@dataclass
class CaseResult:
    """What happened to one case."""

    name: str
    source: str
    status: str  # "done", "skipped (exists)" or "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # load, inference, write
    slices: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class SegmentReport:
    """The run report written to ``report.json``."""

    input: str
    output: str
    settings: dict[str, Any]
    versions: dict[str, str]
    device: str = ""
    cases: list[CaseResult] = field(default_factory=list)
    not_segmented: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded; 1 when a case failed or an input was rejected (bad file, unusable series)."""
        failed = any(c.status == "failed" for c in self.cases) or any(s["failure"] for s in self.not_segmented)
        return 1 if failed else 0


def segment(
    input: str,
    output: str,
    bundle: str | Path | BundleSegmenter = "bundle",
    config: str | Sequence[str] | None = None,
    device: str = "auto",
    formats: str | Sequence[str] = "nifti",
    statistics: bool = False,
    preview: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    num_workers: int = 1,
    num_parts: int | None = None,
    part_id: int | None = None,
    quiet: bool = False,
) -> SegmentReport:
    """Segment every case under INPUT (NIfTI / NRRD / MHA files, DICOM series, or a tree mixing them) into OUTPUT.

    Per case ``<name>.nii.gz`` (labelmap in the input's geometry), with ``dicom_seg`` ``<name>_seg.dcm`` (DICOM
    input only), with ``statistics`` ``<name>_statistics.json/.csv`` (volume in mL and mean intensity per label,
    and all cases in ``statistics.csv``), with ``preview`` ``<name>_preview.png``; and ``report.json``.

    Args:
        input: a file, a DICOM series folder, or a folder tree.
        output: the output folder.
        bundle: the MONAI bundle folder (``configs/inference.json`` and ``models/model.pt``), or (from Python) a
            :class:`~ic_moe_monai.predictor.BundleSegmenter` already built, reused as it is (then ``config`` and
            ``batch_size`` must be left out and ``device`` be ``auto`` or the segmenter's).
        config: extra config files merged after ``inference.json``, comma-separated (e.g. a profile).
        device: ``auto`` (CUDA if available; under torchrun the local rank's GPU), ``cpu`` or ``cuda:N``. On a GPU
            the volume is preprocessed, segmented and inverted there; only the labelmap comes back.
        formats: comma-separated outputs: ``nifti`` and/or ``dicom_seg``.
        statistics: write per-label volume (mL) and mean intensity, JSON and CSV.
        preview: write a PNG with axial, coronal and sagittal overlays.
        overwrite: segment cases whose outputs exist (otherwise they are skipped, so a rerun resumes).
        batch_size: slices per network call (default: the bundle's, larger on a GPU).
        num_workers: cases loaded ahead in background threads while one is segmented (0: load in turn); on a GPU
            each loaded case is already there, so GPU memory holds up to ``num_workers`` more volumes.
        num_parts: split the cases into this many parts (default: torchrun's WORLD_SIZE, else 1).
        part_id: the part this process segments, 0 ≤ part_id < num_parts (default: torchrun's RANK, else 0).
        quiet: no progress bars; log warnings only.

    Raises:
        ValueError, FileNotFoundError: for usage errors (bad option values, missing input or bundle).
    """
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
    wanted = _parse_formats(formats)
    configs = _as_list(config)
    num_parts, part_id = _parse_parts(num_parts, part_id)
    if (batch_size is not None and int(batch_size) < 1) or int(num_workers) < 0:
        raise ValueError(f"batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size} and {num_workers}.")
    if isinstance(bundle, BundleSegmenter):
        torch_device = _reused_segmenter_device(bundle, configs, batch_size, device)
    else:
        torch_device = _resolve_device(device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_partial_outputs(out_dir):
        logger.info("removed %s, left by an interrupted run", stale.name)

    bundle_name = str(bundle.bundle) if isinstance(bundle, BundleSegmenter) else str(bundle)
    settings = {"bundle": bundle_name, "config": configs, "formats": wanted, "statistics": statistics,
                "preview": preview, "overwrite": overwrite, "batch_size": batch_size, "num_workers": num_workers,
                "num_parts": num_parts, "part_id": part_id}  # fmt: skip
    report = SegmentReport(input=str(input), output=str(out_dir), settings=settings, versions=_versions(),
                           device=_device_name(torch_device))  # fmt: skip
    all_cases, skipped = discover_cases(input, exclude=[out_dir])  # outputs inside the input are not inputs
    cases = all_cases[part_id::num_parts]
    report.not_segmented = [{"path": str(s.path), "reason": s.reason, "failure": s.failure} for s in skipped]
    if not all_cases and not skipped:
        report.not_segmented.append({"path": str(input), "reason": "no image files or DICOM series found",
                                     "failure": True})  # fmt: skip
    for s in report.not_segmented:
        (logger.warning if s["failure"] else logger.info)("not segmented: %s: %s", s["path"], s["reason"])

    todo: list[tuple[Case, CaseResult]] = []
    for case in cases:
        result = CaseResult(name=case.name, source=str(case.path), status="done")
        result.outputs = _output_paths(out_dir, case, wanted, statistics, preview, result.notes)
        if not overwrite and all(Path(p).exists() for p in result.outputs.values()):
            result.status = "skipped (exists)"
        else:
            todo.append((case, result))
        report.cases.append(result)
    if todo:
        if isinstance(bundle, BundleSegmenter):
            segmenter = bundle
        else:
            segmenter = BundleSegmenter(bundle, configs, torch_device, None if batch_size is None else int(batch_size))
        settings["batch_size"] = segmenter.batch_size
        _run_cases(segmenter, todo, int(num_workers), quiet)
    _write_run_files(report, out_dir, num_parts, part_id, statistics, time.monotonic() - started)
    done = sum(c.status == "done" for c in report.cases)
    failed = sum(c.status == "failed" for c in report.cases)
    logger.info("%d segmented, %d already done, %d failed, %d inputs not segmented (%.1f s)", done,
                len(report.cases) - done - failed, failed, len(report.not_segmented), report.seconds)  # fmt: skip
    return report


def _run_cases(segmenter: BundleSegmenter, todo: list[tuple[Case, CaseResult]], num_workers: int, quiet: bool) -> None:
    """Segment the cases in order while up to ``num_workers`` next cases load in background threads and the
    finished ones are written by another."""
    progress_cases = _progress_bar(quiet, total=len(todo), desc="cases", unit="case", position=0)
    progress_slices = _progress_bar(quiet, desc="slices", unit="slice", position=1, leave=False)

    def on_batch(done: int, total: int) -> None:
        if progress_slices.total != total:
            progress_slices.reset(total=total)
        progress_slices.n = done
        progress_slices.refresh()

    redirect = logging_redirect_tqdm() if tqdm is not None and not quiet else nullcontext()
    # one case waits to be written at most: labelmaps (and the image, for statistics) do not pile up
    with redirect, _CaseLoader(segmenter, todo, num_workers) as loaded, BackgroundWriter(max_pending=1) as writer:
        for (case, result), pending in zip(todo, loaded, strict=True):
            progress_cases.set_postfix_str(case.name)
            try:
                image, data, result.seconds["load"] = pending.result()
                result.slices = int(data["image"].shape[-1])
                start = time.monotonic()
                labels = segmenter.predict(data, progress=None if quiet else on_batch)
                result.seconds["inference"] = round(time.monotonic() - start, 3)
                del data
                needs_image = "statistics_json" in result.outputs or "preview" in result.outputs
                writer.submit(_finish_case, case, result, image if needs_image else None, labels, segmenter,
                              progress_cases)  # fmt: skip
            except Exception as err:  # one bad case must not stop the batch
                _fail(result, err)
                progress_cases.update(1)
    progress_slices.close()
    progress_cases.close()


def _finish_case(
    case: Case, result: CaseResult, image: MetaTensor | None, labels: MetaTensor, seg: BundleSegmenter, progress: Any
) -> None:
    """Write one case's outputs (in the writing thread) and record how it went."""
    try:
        start = time.monotonic()
        _write_outputs(case, result, image, labels, seg)
        result.seconds["write"] = round(time.monotonic() - start, 3)
        logger.info("%s: done (%s)", case.name, ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    except Exception as err:  # one bad case must not stop the batch
        _fail(result, err)
    progress.update(1)


def _fail(result: CaseResult, err: Exception) -> None:
    result.status = "failed"
    result.error = _one_line(err)
    for path in result.outputs.values():  # no half set of outputs: a rerun redoes the case
        Path(path).unlink(missing_ok=True)
    result.outputs = {}
    logger.warning("failed: %s", result.error)
    logger.debug("%s", traceback.format_exc())


class _NoBar:
    """What the loop asks of a tqdm bar, doing nothing (``quiet``, or tqdm not installed)."""

    total = None
    n = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _progress_bar(quiet: bool, **kwargs: Any) -> Any:
    return tqdm(**kwargs) if tqdm is not None and not quiet else _NoBar()


class _CaseLoader:
    """Futures of ``(image, preprocessed data, seconds)`` for the cases in order, ``ahead`` of them in flight."""

    def __init__(self, segmenter: BundleSegmenter, todo: list[tuple[Case, CaseResult]], ahead: int) -> None:
        self.segmenter, self.cases, self.ahead = segmenter, [c for c, _ in todo], ahead
        self.pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="load") if ahead else None

    def _load(self, case: Case) -> tuple[MetaTensor, dict[str, Any], float]:
        start = time.monotonic()
        image = load_case(case)
        data = self.segmenter.preprocess(image)
        return image, data, round(time.monotonic() - start, 3)

    def _submit(self, case: Case) -> Future:
        if self.pool is not None:
            return self.pool.submit(self._load, case)
        future: Future = Future()
        try:
            future.set_result(self._load(case))
        except Exception as err:  # handed to the consumer through the future, as a pool would
            future.set_exception(err)
        return future

    def __enter__(self) -> Iterator[Future]:
        return self._futures()

    def _futures(self) -> Iterator[Future]:
        pending = iter(self.cases)
        queue: deque[Future] = deque()
        for _ in self.cases:
            while len(queue) <= self.ahead and (case := next(pending, None)) is not None:
                queue.append(self._submit(case))  # the current case and up to `ahead` after it
            yield queue.popleft()

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _output_paths(
    out_dir: Path, case: Case, formats: list[str], statistics: bool, preview: bool, notes: list[str]
) -> dict[str, str]:
    paths = {}
    if "nifti" in formats:
        paths["nifti"] = out_dir / f"{case.name}.nii.gz"
    if "dicom_seg" in formats:
        if case.dicom_seg_problem is None:
            paths["dicom_seg"] = out_dir / f"{case.name}_seg.dcm"
        else:
            notes.append(f"no DICOM SEG: {case.dicom_seg_problem}")
    if statistics:
        paths["statistics_json"] = out_dir / f"{case.name}_statistics.json"
        paths["statistics_csv"] = out_dir / f"{case.name}_statistics.csv"
    if preview:
        paths["preview"] = out_dir / f"{case.name}_preview.png"
    return {k: str(v) for k, v in paths.items()}


def _write_outputs(
    case: Case, result: CaseResult, image: MetaTensor | None, labels: MetaTensor, seg: BundleSegmenter
) -> None:
    """All requested outputs of one case; the NIfTI labelmap last, as the mark of a finished case."""
    label_array = np.asarray(labels[0], dtype=np.uint8)  # keeps the labelmap's memory order (NIfTI's, x fastest)
    affine = np.asarray(labels.affine, dtype=np.float64)
    outputs = result.outputs
    with _writing("the DICOM SEG", case):
        if "dicom_seg" in outputs:
            write_dicom_seg(label_array, affine, case.files, seg.label_names, outputs["dicom_seg"], seg.version)
    with _writing("the statistics", case):
        if "statistics_json" in outputs:
            stats = label_statistics(label_array, np.asarray(image), affine, seg.label_names)
            write_statistics(case.name, stats, outputs["statistics_json"], outputs["statistics_csv"])
    with _writing("the preview", case):
        if "preview" in outputs:
            write_preview(np.asarray(image), label_array, affine, outputs["preview"], seg.label_names)
    with _writing("the labelmap", case):
        if "nifti" in outputs:
            write_nifti_labels(label_array, affine, outputs["nifti"])


@contextmanager
def _writing(what: str, case: Case) -> Iterator[None]:
    """Name the case and the output in a writer's error."""
    try:
        yield
    except Exception as err:
        raise RuntimeError(f"{case.path}: writing {what} failed ({_one_line(err)})") from err


def _write_run_files(
    report: SegmentReport, out_dir: Path, num_parts: int, part_id: int, statistics: bool, seconds: float
) -> None:
    """``report.json`` (``report_part<K>.json`` for one of several parts) and, with statistics, ``statistics.csv``."""
    report.seconds = round(seconds, 3)
    suffix = f"_part{part_id}" if num_parts > 1 else ""
    if statistics:
        rows = []
        for case in report.cases:
            path = case.outputs.get("statistics_json")
            if case.status != "failed" and path and Path(path).exists():
                rows.append((case.name, json.loads(Path(path).read_text())))
        with atomic_output(out_dir / f"statistics{suffix}.csv") as tmp:
            tmp.write_text(statistics_csv(rows))
    with atomic_output(out_dir / f"report{suffix}.json") as tmp:
        tmp.write_text(json.dumps(asdict(report) | {"exit_code": report.exit_code}, indent=2) + "\n")


def _parse_formats(formats: str | Sequence[str]) -> list[str]:
    wanted = [f.strip().lower() for f in _as_list(formats)]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise ValueError(f"formats must be a comma-separated subset of {', '.join(FORMATS)}, got {formats!r}.")
    return list(dict.fromkeys(wanted))


def _parse_parts(num_parts: int | None, part_id: int | None) -> tuple[int, int]:
    """``num_parts``/``part_id`` as given, else torchrun's ``WORLD_SIZE``/``RANK``, else one part."""
    if num_parts is None and part_id is None:
        num_parts, part_id = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    num_parts = 1 if num_parts is None else int(num_parts)
    part_id = 0 if part_id is None else int(part_id)
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts ≥ 1 and 0 ≤ part_id < num_parts, got {num_parts} and {part_id}.")
    return num_parts, part_id


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu or cuda:N, got {device!r}.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine.")
    return resolved


def _reused_segmenter_device(
    segmenter: BundleSegmenter, configs: list[str], batch_size: int | None, device: str
) -> torch.device:
    """The device of a segmenter passed in place of a bundle folder, after checking nothing asks to rebuild it."""
    if configs or batch_size is not None:
        raise ValueError("config and batch_size cannot change a BundleSegmenter that is already built.")
    if device != "auto" and torch.device(device) != segmenter.device:
        raise ValueError(f"device {device!r}: the BundleSegmenter given runs on {segmenter.device}.")
    return segmenter.device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import monai

    import ic_moe_monai

    versions = {"ic_moe_monai": ic_moe_monai.__version__, "python": platform.python_version(),
                "torch": torch.__version__, "monai": monai.__version__}  # fmt: skip
    try:  # without importing ITK: it is needed only for DICOM series, NRRD and MHA
        versions["itk"] = package_metadata.version("itk")
    except package_metadata.PackageNotFoundError:
        versions["itk"] = "not installed"
    return versions


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
