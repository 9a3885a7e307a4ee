"""Batch segmentation of a folder of studies with the bundle: ``python -m ic_moe_monai segment INPUT OUTPUT``.

Cases are found by :func:`ic_moe_monai.io.discover_cases` (image files and DICOM series, recursively). Each case
is loaded after its header passed the size and shape guard (DICOM series by pydicom, in ITK's geometry; ITK is
imported only for NRRD and MHA), preprocessed, segmented and inverted by the bundle runtime
(:class:`~ic_moe_monai.inference.predictor.BundleSegmenter`: the bundle's own ``preprocessing``, ``inferer`` and
weights, on
the GPU when there is one), and written in the input's geometry: a NIfTI labelmap and, on request, a DICOM SEG,
label statistics and a preview image. Reading and writing overlap with segmenting: the next case is loaded in a
background thread, and the finished one is written by another.

What protects the data:

- Before the model is loaded, the run is refused (:class:`UsageError`, exit code 2) when an option is wrong, the
  output folder cannot be created or written, the output folder is the input folder, or an output would replace
  an input file (same file, also through symbolic or hard links).
- Outputs are written under a temporary name carrying the run id and renamed, so an interrupted run never leaves a
  partial file; start-up removes only leftovers of runs that are no longer alive on this host.
- Each case is locked while a run loads, segments and writes it: a concurrent run (or another part) skips it as
  ``skipped (another run is writing it)``. A rerun skips finished cases unless ``overwrite``. The run that holds
  the output folder's report lock writes ``report.json``; a run started while another one is writing into the same
  folder writes ``report_<run id>.json`` instead, so no report replaces another.
- A bad case is reported in one line naming the file and the problem, its outputs are removed, and the run goes on;
  an output that cannot be written fails its case only, and a report that cannot be written is said on stderr.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
from ic_moe_monai.io import Case, Skipped, discover_cases
from ic_moe_monai.io.dicomweb import (
    DicomwebClient,
    DicomwebError,
    DicomwebSource,
    find_series,
    is_dicomweb_url,
    redact,
    retrieve_series,
    stored_receipt,
)
from ic_moe_monai.io.guards import MAX_BYTES_ENV, ImageError, max_image_bytes
from ic_moe_monai.io.saving import BackgroundWriter
from ic_moe_monai.io.writers import (
    NAME_MAX,
    PARTIAL_MARK,
    atomic_output,
    exclusive_lock,
    label_statistics,
    remove_partial_outputs,
    run_id,
    statistics_csv,
    write_dicom_seg,
    write_nifti_labels,
    write_preview,
    write_statistics,
)

try:  # progress bars are a convenience: without tqdm the run is the same, silent
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements.txt
    tqdm = None

__all__ = ["FORMATS", "SKIPPED_BUSY", "SKIPPED_EXISTS", "SKIPPED_NOTHING", "BundleSegmenter", "CaseResult",
           "SegmentReport", "UsageError", "load_case", "segment"]  # fmt: skip

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom_seg")
SKIPPED_EXISTS = "skipped (exists)"
SKIPPED_BUSY = "skipped (another run is writing it)"
SKIPPED_NOTHING = "skipped (nothing to write)"  # e.g. only a DICOM SEG asked for, of a NIfTI input
CASE_LOCK = ".case~{}.lock"  # hidden, so discovery never takes it for an input
RUN_FILES = (("report", ".json"), ("statistics", ".csv"), ("quality", ".csv"))
REPORT_LOCK = ".{}.lock"  # of the report's name: held by the run that writes it


class UsageError(ValueError):
    """A wrong option, or an output folder that cannot be used, found before any case is segmented (exit code 2)."""


@dataclass
class CaseResult:
    """What happened to one case."""

    name: str
    source: str
    status: str  # "done", "failed", SKIPPED_EXISTS, SKIPPED_BUSY or SKIPPED_NOTHING
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # load, inference, write
    slices: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None  # CaseQuality.as_dict(): score, labels, flagged, reasons


@dataclass
class SegmentReport:
    """The run report written to ``report.json``."""

    input: str
    output: str
    settings: dict[str, Any]
    versions: dict[str, str]
    device: str = ""
    run_id: str = ""
    cases: list[CaseResult] = field(default_factory=list)
    not_segmented: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of the run itself, e.g. a run file that could not be written
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded; 1 when a case failed, an input was rejected (bad file, unusable series) or
        a run file could not be written. Cases skipped because they exist or another run writes them are no
        failures."""
        failed = any(c.status == "failed" for c in self.cases) or any(s["failure"] for s in self.not_segmented)
        return 1 if failed or self.errors else 0


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
    max_image_size: int | str | None = None,
    push: bool = False,
    tta: bool | None = None,
    keep_largest_component: bool | None = None,
    qc_threshold: float | None = None,
    quiet: bool = False,
) -> SegmentReport:
    """Segment every case under INPUT (NIfTI / NRRD / MHA files, DICOM series, or a tree mixing them; or the series
    a DICOMweb URL names) into OUTPUT.

    Per case ``<name>.nii.gz`` (labelmap in the input's geometry), with ``dicom_seg`` ``<name>_seg.dcm`` (DICOM
    input only), with ``statistics`` ``<name>_statistics.json/.csv`` (volume in mL and mean intensity per label,
    and all cases in ``statistics.csv``), with ``preview`` ``<name>_preview.png``; and ``report.json``. OUTPUT may
    lie inside INPUT (it is then not searched for inputs) or hold it, but it may not be INPUT itself, and no output
    may replace an input file.

    Args:
        input: a file, a DICOM series folder, or a folder tree; or a DICOMweb URL: ``<root>/studies/<uid>``,
            ``<root>/studies/<uid>/series/<uid>`` or a QIDO-RS query ``<root>/series?Modality=MR&...`` (see
            :mod:`ic_moe_monai.io.dicomweb`; credentials from ``IC_MOE_DICOMWEB_USER`` / ``_PASSWORD`` or
            ``IC_MOE_DICOMWEB_TOKEN``). The series are retrieved into a temporary folder, removed at the end.
        output: the output folder (created if needed).
        bundle: the MONAI bundle folder (``configs/inference.json`` and ``models/model.pt``), or (from Python) a
            ``BundleSegmenter`` already built, reused as it is (then ``config`` and ``batch_size`` must be left out
            and ``device`` be ``auto`` or the segmenter's).
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
        max_image_size: the largest image accepted, as float32 bytes or with a unit (``4G``, ``512M``); a larger
            one is refused from its header, before any voxel is read (default ``$IC_MOE_MAX_IMAGE_BYTES``, else
            1/8 of the memory, at most 4 GiB).
        push: store each case's DICOM SEG back on the DICOMweb server of the input (STOW-RS); implies
            ``dicom_seg``. A case whose SEG cannot be made or stored fails; a stored one gets ``<name>_seg_stored.json``
            (what the server answered), so a rerun does not store it again.
        tta: mirror test-time augmentation on or off (default: the bundle's ``tta_mirror``): each slice and its
            mirror images (the bundle's ``tta_mirror_axes``) go through the network and their probabilities are
            averaged.
        keep_largest_component: keep only the largest connected component of each label, on or off (default: the
            bundle's ``keep_largest_component``).
        qc_threshold: flag a case for review when its quality score (the estimated Dice, 0 … 1) is below this
            (default: the bundle's calibration, ``models/quality.json``). Each case's ``quality`` in the report
            holds its score, per-label scores, ``flagged`` and the reasons; ``quality.csv`` lists the cases worst
            first. A bundle without a calibration writes no scores.
        quiet: no progress bars; log warnings only.

    Raises:
        UsageError: a bad option value, an output folder that cannot be created or written, an output folder that
            is the input folder, an output that would replace an input file, a DICOMweb URL that cannot be used or a
            server that cannot be reached or refuses the credentials; all before the model is loaded.
        FileNotFoundError: the input does not exist (also: a study or series URL naming nothing on the server).
        ~ic_moe_monai.inference.predictor.BundleError: the bundle cannot be used (configs, network, weights).
    """
    started = time.monotonic()
    quiet = _flag("quiet", quiet)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    wanted = _parse_formats(formats)
    configs = _as_list("config", config)
    statistics = _flag("statistics", statistics)
    preview = _flag("preview", preview)
    overwrite = _flag("overwrite", overwrite)
    num_parts, part_id = _parse_parts(num_parts, part_id)
    batch_size = None if batch_size is None else _integer("batch_size", batch_size, 1)
    num_workers = _integer("num_workers", num_workers, 0)
    max_bytes = _size_limit(max_image_size)
    push = _flag("push", push)
    threshold = None if qc_threshold is None else _fraction("qc_threshold", qc_threshold)
    switches = {
        "tta_mirror": ("tta", tta),
        "keep_largest_component": ("keep_largest_component", keep_largest_component),
    }
    options = {key: _flag(name, value) for key, (name, value) in switches.items() if value is not None}
    remote = _remote_input(input) if is_dicomweb_url(input) else None
    if push and remote is None:
        raise UsageError("push stores the DICOM SEGs on the DICOMweb server the series come from: it needs a "
                         "DICOMweb input URL.")  # fmt: skip
    if push and "dicom_seg" not in wanted:
        wanted.append("dicom_seg")
    if isinstance(bundle, BundleSegmenter):
        if options:
            raise UsageError("tta and keep_largest_component are set when a BundleSegmenter is built, not here.")
        torch_device = _reused_segmenter_device(bundle, configs, batch_size, device)
    else:
        torch_device = _resolve_device(device)
    if remote is None and not os.path.lexists(input):
        raise FileNotFoundError(f"input {input}: no such file or folder.")
    out_dir = _prepare_output(None if remote else Path(input), Path(output))
    with ExitStack() as fetched:
        if remote is None:
            local, shown, remote_skipped = Path(input), _PathsShown(), []
            all_cases, skipped = discover_cases(input, exclude=_excluded(local, out_dir))
        else:
            # each part retrieves only the series it segments
            retrieved = _retrieved(*remote, max_bytes, quiet, num_parts, part_id)
            local, shown, remote_skipped = fetched.enter_context(retrieved)
            all_cases, skipped = discover_cases(local)
        skipped = remote_skipped + skipped
        return _segment_cases(input, bundle, configs, torch_device, wanted, statistics, preview, overwrite,
                              batch_size, num_workers, num_parts, part_id, max_bytes, quiet, out_dir, all_cases,
                              skipped, shown, remote[1] if push and remote else None, started,
                              split=remote is None, options=options, qc_threshold=threshold)  # fmt: skip


def _segment_cases(
    input: str,
    bundle: str | Path | BundleSegmenter,
    configs: list[str],
    torch_device: torch.device,
    wanted: list[str],
    statistics: bool,
    preview: bool,
    overwrite: bool,
    batch_size: int | None,
    num_workers: int,
    num_parts: int,
    part_id: int,
    max_bytes: int,
    quiet: bool,
    out_dir: Path,
    all_cases: list[Case],
    skipped: list[Skipped],
    shown: _PathsShown,
    push: DicomwebClient | None,
    started: float,
    split: bool = True,
    options: dict[str, bool] | None = None,
    qc_threshold: float | None = None,
) -> SegmentReport:
    """The run on the cases found (of all parts when ``split``, else of this part only): refuse outputs that would
    replace inputs, plan, segment, write the report."""
    suffix = f"_part{part_id}" if num_parts > 1 else ""
    run_files = [out_dir / f"{name}{suffix}{ext}" for name, ext in RUN_FILES]
    _refuse_replacing_inputs(all_cases, _all_outputs(out_dir, all_cases, wanted, statistics, preview, run_files,
                                                     push is not None))  # fmt: skip

    bundle_name = str(bundle.bundle) if isinstance(bundle, BundleSegmenter) else str(bundle)
    settings = {"bundle": bundle_name, "config": configs, "formats": wanted, "statistics": statistics,
                "preview": preview, "overwrite": overwrite, "batch_size": batch_size, "num_workers": num_workers,
                "num_parts": num_parts, "part_id": part_id, "max_image_size": max_bytes,
                "push": push is not None, "qc_threshold": qc_threshold, **(options or {})}  # fmt: skip
    report = SegmentReport(input=str(input), output=str(out_dir), settings=settings, versions=_versions(),
                           device=_device_name(torch_device), run_id=run_id())  # fmt: skip

    with ExitStack() as run:
        run.enter_context(shown.in_logs(logger))
        reader_notes = run.enter_context(_library_logs())
        if not run.enter_context(exclusive_lock(out_dir / REPORT_LOCK.format(run_files[0].name), remove=True)):
            # another run is writing into this folder: its report keeps its name, this one's gets the run id
            run_files = [p.with_name(f"{p.stem}_{run_id().replace('~', '_')}{p.suffix}") for p in run_files]
            logger.warning("another run is writing into %s: this run's report is %s", out_dir, run_files[0].name)
        _remove_leftovers(out_dir)
        _list_not_segmented(report, input, all_cases, skipped)
        mine = all_cases[part_id::num_parts] if split else all_cases
        todo = _plan(report, mine, out_dir, wanted, statistics, preview, overwrite,
                     push is not None)  # fmt: skip
        if todo:
            if isinstance(bundle, BundleSegmenter):
                segmenter = bundle
            else:
                segmenter = BundleSegmenter(bundle, configs, torch_device, batch_size, options=options)
            if qc_threshold is not None:
                segmenter.qc_threshold = qc_threshold
            if segmenter.quality is None:
                logger.warning("the bundle has no quality calibration (models/quality.json): no quality scores; "
                               "`run evaluating` writes one")  # fmt: skip
            else:
                settings["qc_threshold"] = segmenter.quality.qc_threshold if qc_threshold is None else qc_threshold
            settings["batch_size"] = segmenter.batch_size
            settings["tta_mirror"] = len(getattr(segmenter.inferer, "flips", [()])) > 1
            settings["keep_largest_component"] = segmenter.keep_largest_component
            _run_cases(_Job(segmenter, out_dir, overwrite, max_bytes, reader_notes, push), todo, num_workers, quiet)
        shown.in_report(report)
        _write_run_files(report, run_files, statistics, time.monotonic() - started)
    counts = {s: sum(c.status == s for c in report.cases) for s in ("done", "failed", SKIPPED_EXISTS, SKIPPED_BUSY)}
    logger.info("%d segmented, %d already done, %d written by another run, %d failed, %d inputs not segmented "
                "(%.1f s)", counts["done"], counts[SKIPPED_EXISTS], counts[SKIPPED_BUSY], counts["failed"],
                len(report.not_segmented), report.seconds)  # fmt: skip
    scored = [c for c in report.cases if c.quality is not None]
    if scored:
        flagged = sum(c.quality["flagged"] for c in scored)
        logger.log(logging.WARNING if flagged else logging.INFO, "%d of %d case(s) flagged for review (%s)",
                   flagged, len(scored), run_files[2].name)  # fmt: skip
    return report


def _list_not_segmented(report: SegmentReport, input: str, cases: list[Case], skipped: list[Skipped]) -> None:
    """What discovery did not make a case of, in the report and on the console."""
    report.not_segmented = [{"path": str(s.path), "reason": s.reason, "failure": s.failure} for s in skipped]
    if not cases and not skipped:
        report.not_segmented.append({"path": str(input), "reason": "no image files or DICOM series found",
                                     "failure": True})  # fmt: skip
    for s in report.not_segmented:
        (logger.warning if s["failure"] else logger.info)("not segmented: %s: %s", s["path"], s["reason"])


def _plan(
    report: SegmentReport,
    cases: list[Case],
    out_dir: Path,
    formats: list[str],
    statistics: bool,
    preview: bool,
    overwrite: bool,
    push: bool = False,
) -> list[tuple[Case, CaseResult]]:
    """A result per case in the report; the cases to segment (not finished yet, or all with ``overwrite``)."""
    todo = []
    for case in cases:
        result = CaseResult(name=case.name, source=str(case.path), status="done")
        result.outputs = _output_paths(out_dir, case, formats, statistics, preview, result.notes, push)
        if push and "pushed" not in result.outputs:  # asked to store a SEG that cannot be made
            result.status, result.outputs = "failed", {}
            result.error = f"{case.path}: cannot push: no DICOM SEG ({case.dicom_seg_problem})"
            logger.warning("failed: %s", result.error)
        elif not result.outputs:
            result.status = SKIPPED_NOTHING
        elif not overwrite and _finished(result):
            result.status = SKIPPED_EXISTS
        else:
            todo.append((case, result))
        report.cases.append(result)
    return todo


# ------------------------------------------------------------------------------------------------- the cases
@dataclass
class _Job:
    """What every case of a run shares."""

    segmenter: BundleSegmenter
    out_dir: Path
    overwrite: bool
    max_bytes: int
    reader_notes: _ReaderNotes
    push: DicomwebClient | None = None  # where the DICOM SEGs are stored, with --push


def _run_cases(job: _Job, todo: list[tuple[Case, CaseResult]], num_workers: int, quiet: bool) -> None:
    """Segment the cases in order while up to ``num_workers`` next cases load in background threads and the
    finished ones are written by another. Each case is locked from before it loads until it is written."""
    progress_cases = _progress_bar(quiet, total=len(todo), desc="cases", unit="case", position=0)
    progress_slices = _progress_bar(quiet, desc="slices", unit="slice", position=1, leave=False)

    def on_batch(done: int, total: int) -> None:
        if progress_slices.total != total:
            progress_slices.reset(total=total)
        progress_slices.n = done
        progress_slices.refresh()

    redirect = logging_redirect_tqdm() if tqdm is not None and not quiet else nullcontext()
    # one case waits to be written at most: labelmaps (and the image, for statistics) do not pile up
    with redirect, _CaseLoader(job, todo, num_workers) as loader, BackgroundWriter(max_pending=1) as writer:
        for (case, result), pending in zip(todo, loader.futures(), strict=True):
            progress_cases.set_postfix_str(case.name)
            lock = loader.lock_of(result)
            try:
                loaded = pending.result()
                if loaded is None:  # not this run's to write: the claim recorded why
                    progress_cases.update(1)
                    continue
                image, data, result.seconds["load"] = loaded
                result.slices = int(data["image"].shape[-1])
                start = time.monotonic()
                labels = job.segmenter.predict(data, progress=None if quiet else on_batch)
                result.seconds["inference"] = round(time.monotonic() - start, 3)
                quality = job.segmenter.last_quality
                result.quality = None if quality is None else quality.as_dict()
                del data
                needs_image = "statistics_json" in result.outputs or "preview" in result.outputs
                writer.submit(_finish_case, case, result, image if needs_image else None, labels, job.segmenter,
                              progress_cases, lock, job.push)  # fmt: skip
            except Exception as err:  # one bad case must not stop the batch
                _fail(case, result, err, remove_outputs=lock is not None)
                if lock is not None:
                    lock.release()
                progress_cases.update(1)
    progress_slices.close()
    progress_cases.close()


def _finish_case(
    case: Case,
    result: CaseResult,
    image: MetaTensor | None,
    labels: MetaTensor,
    seg: BundleSegmenter,
    progress: Any,
    lock: _CaseLock | None,
    push: DicomwebClient | None = None,
) -> None:
    """Write one case's outputs (in the writing thread), record how it went, and release the case."""
    try:
        start = time.monotonic()
        _write_outputs(case, result, image, labels, seg, push)
        result.seconds["write"] = round(time.monotonic() - start, 3)
        logger.info("%s: done (%s)", case.name, ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    except Exception as err:  # one bad case must not stop the batch
        _fail(case, result, err, remove_outputs=True)
    finally:
        if lock is not None:
            lock.release()
        progress.update(1)


def _fail(case: Case, result: CaseResult, err: BaseException, remove_outputs: bool) -> None:
    """Record a failed case; with ``remove_outputs`` (the case is locked by this run) delete what it has written,
    so no half set of outputs remains and a rerun redoes the case."""
    result.status = "failed"
    result.error = _case_error(case, err)
    for path in result.outputs.values() if remove_outputs else ():
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as unlink_error:
            result.notes.append(f"could not remove {path}: {unlink_error.strerror or unlink_error}")
    result.outputs = {}
    logger.warning("failed: %s", result.error)
    logger.debug("%s", "".join(traceback.format_exception(err)))


class _CaseLock:
    """The lock of one case in the output folder (:func:`~ic_moe_monai.io.writers.exclusive_lock`, removed when
    released), held by this run from before the case loads until its outputs are written or removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stack = ExitStack()

    def acquire(self) -> bool:
        """Whether the lock is now held (False: another run holds it)."""
        held = self._stack.enter_context(exclusive_lock(self.path, remove=True))
        if not held:
            self._stack.close()
        return held

    def release(self) -> None:
        """Let the lock go (again: nothing happens)."""
        self._stack.close()


def _claim(job: _Job, case: Case, result: CaseResult) -> _CaseLock | None:
    """Lock ``case`` for this run; None, with the case's status set, when another run writes it or (without
    ``overwrite``) finished it meanwhile.

    Raises:
        _OutputError: the lock file cannot be created.
    """
    lock = _CaseLock(job.out_dir / _lock_name(case.name))
    try:
        held = lock.acquire()
    except OSError as err:
        raise _OutputError(f"{case.path}: cannot lock the case in {job.out_dir} ({_os_reason(err)})") from err
    if not held:
        result.status = SKIPPED_BUSY
        logger.info("%s: %s", case.name, SKIPPED_BUSY)
        return None
    if not job.overwrite and _finished(result):  # another run wrote it since the outputs were first looked at
        lock.release()
        result.status = SKIPPED_EXISTS
        return None
    return lock


def _lock_name(case_name: str) -> str:
    name = CASE_LOCK.format(case_name)
    if len(os.fsencode(name)) > NAME_MAX:  # a case named after a very long file name
        name = CASE_LOCK.format(hashlib.sha1(os.fsencode(case_name)).hexdigest()[:16])
    return name


def _finished(result: CaseResult) -> bool:
    return all(Path(p).is_file() for p in result.outputs.values())  # a folder in an output's place is no output


class _NoBar:
    """What the loop asks of a tqdm bar, doing nothing (``quiet``, or tqdm not installed)."""

    total = None
    n = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _progress_bar(quiet: bool, **kwargs: Any) -> Any:
    return tqdm(**kwargs) if tqdm is not None and not quiet else _NoBar()


Loaded = tuple[MetaTensor, dict[str, Any], float]


class _CaseLoader:
    """Futures of ``(image, preprocessed data, seconds)`` for the cases in order (None for a case this run does not
    write), ``ahead`` of them in flight. Each case is claimed (locked) in the consuming thread just before its load
    is submitted; the locks still held at the end are released."""

    def __init__(self, job: _Job, todo: list[tuple[Case, CaseResult]], ahead: int) -> None:
        self.job, self.todo, self.ahead = job, todo, ahead
        self.pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="load") if ahead else None
        self.locks: dict[int, _CaseLock] = {}

    def lock_of(self, result: CaseResult) -> _CaseLock | None:
        """The lock this run holds on the case of ``result``, if any."""
        return self.locks.get(id(result))

    def _load(self, case: Case, result: CaseResult) -> Loaded:
        start = time.monotonic()
        with self.job.reader_notes.collecting(case.name, result.notes):
            image = load_case(case, self.job.max_bytes)
            data = self.job.segmenter.preprocess(image)
        return image, data, round(time.monotonic() - start, 3)

    def _submit(self, case: Case, result: CaseResult) -> Future:
        future: Future = Future()
        try:
            lock = _claim(self.job, case, result)
        except Exception as err:  # handed to the consumer through the future, as a load error is
            future.set_exception(err)
            return future
        if lock is None:
            future.set_result(None)
            return future
        self.locks[id(result)] = lock
        if self.pool is not None:
            return self.pool.submit(self._load, case, result)
        try:
            future.set_result(self._load(case, result))
        except Exception as err:  # handed to the consumer through the future, as a pool would
            future.set_exception(err)
        return future

    def futures(self) -> Iterator[Future]:
        """One future per case, in order; the current case and up to ``ahead`` after it are in flight."""
        pending = iter(self.todo)
        queue: deque[Future] = deque()
        for _ in self.todo:
            while len(queue) <= self.ahead and (item := next(pending, None)) is not None:
                queue.append(self._submit(*item))
            yield queue.popleft()

    def __enter__(self) -> _CaseLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for lock in self.locks.values():  # cases left unwritten by an error or an interruption
                lock.release()


def _output_paths(
    out_dir: Path,
    case: Case,
    formats: list[str],
    statistics: bool,
    preview: bool,
    notes: list[str] | None = None,
    push: bool = False,
) -> dict[str, str]:
    paths = {}
    if "nifti" in formats:
        paths["nifti"] = out_dir / f"{case.name}.nii.gz"
    if "dicom_seg" in formats:
        if case.dicom_seg_problem is None:
            paths["dicom_seg"] = out_dir / f"{case.name}_seg.dcm"
            if push:  # the receipt of the stored SEG: a case stored once is finished, and a rerun resumes
                paths["pushed"] = out_dir / f"{case.name}_seg_stored.json"
        elif notes is not None and not push:
            notes.append(f"no DICOM SEG: {case.dicom_seg_problem}")
    if statistics:
        paths["statistics_json"] = out_dir / f"{case.name}_statistics.json"
        paths["statistics_csv"] = out_dir / f"{case.name}_statistics.csv"
    if preview:
        paths["preview"] = out_dir / f"{case.name}_preview.png"
    return {k: str(v) for k, v in paths.items()}


def _write_outputs(
    case: Case,
    result: CaseResult,
    image: MetaTensor | None,
    labels: MetaTensor,
    seg: BundleSegmenter,
    push: DicomwebClient | None = None,
) -> None:
    """All requested outputs of one case; the NIfTI labelmap last, as the mark of a finished case. A DICOM SEG that
    cannot be made is a note on the case, whose other outputs are still written, unless it is to be pushed: then
    the case fails, as it does when the server does not store it."""
    label_array = np.asarray(labels[0], dtype=np.uint8)  # keeps the labelmap's memory order (NIfTI's, x fastest)
    affine = np.asarray(labels.affine, dtype=np.float64)
    outputs = result.outputs
    if "dicom_seg" in outputs:
        try:
            write_dicom_seg(label_array, affine, case.files, seg.label_names, outputs["dicom_seg"], seg.version,
                            segment_codes=getattr(seg, "segment_codes", None))  # fmt: skip
        except Exception as err:  # the SEG is one output among others: the case keeps its labelmap
            if push is not None:
                raise _OutputError(f"{case.path}: cannot push: no DICOM SEG ({_one_line(err)})") from err
            with suppress(OSError):  # an earlier run's SEG would not match the new labelmap
                Path(outputs.pop("dicom_seg")).unlink(missing_ok=True)
            note = f"no DICOM SEG: {_one_line(err)}"
            result.notes.append(note)
            logger.warning("%s: %s", case.path, note)
    with _writing("the statistics", case):
        if "statistics_json" in outputs:
            stats = label_statistics(label_array, np.asarray(image), affine, seg.label_names)
            write_statistics(case.name, stats, outputs["statistics_json"], outputs["statistics_csv"])
    with _writing("the preview", case):
        if "preview" in outputs:
            flagged = bool(result.quality and result.quality["flagged"])
            write_preview(np.asarray(image), label_array, affine, outputs["preview"], seg.label_names,
                          caption=_quality_caption(result.quality), alert=flagged)  # fmt: skip
    if push is not None and "pushed" in outputs:
        _push_seg(case, Path(outputs["dicom_seg"]), Path(outputs["pushed"]), push)
    with _writing("the labelmap", case):
        if "nifti" in outputs:
            write_nifti_labels(label_array, affine, outputs["nifti"])


def _push_seg(case: Case, seg_file: Path, receipt: Path, client: DicomwebClient) -> None:
    """Store the case's DICOM SEG in its study on the server (STOW-RS), and keep what the server answered.

    Raises:
        _OutputError: the server did not store it (the message names the URL and the reason).
    """
    try:
        urls = client.store([seg_file], study=case.study_uid or None)
    except DicomwebError as err:
        raise _OutputError(f"{case.path}: cannot push the DICOM SEG ({err})") from err
    with _writing("the push receipt", case), atomic_output(receipt) as tmp:
        tmp.write_text(stored_receipt(urls, seg_file))


class _OutputError(RuntimeError):
    """An output of a case that cannot be written; the message names the case's input and the reason."""


@contextmanager
def _writing(what: str, case: Case) -> Iterator[None]:
    """Name the case and the output in a writer's error."""
    try:
        yield
    except Exception as err:
        reason = _os_reason(err) if isinstance(err, OSError) else _one_line(err)
        raise _OutputError(f"{case.path}: writing {what} failed ({reason})") from err


def _case_error(case: Case, err: BaseException) -> str:
    """One line naming the case's file and the problem.

    MONAI wraps a transform's error in ``RuntimeError("applying transform <object at 0x…>")``: the transform's
    class and the original error are shown instead.
    """
    step = ""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        match = re.search(r"\.(\w+) object at 0x", str(err))
        step = step or (match.group(1) if match else "")
        err = err.__cause__
    where, message = str(case.path), _first_line(err)
    if not isinstance(err, (ImageError, _OutputError)) and where not in message:  # not one of our own messages
        message = f"{type(err).__name__}: {message}"
    if step:
        message = f"preprocessing ({step}) failed: {message}"
    return message if where in message else f"{where}: {message}"


# ---------------------------------------------------------------------------------------------- run files
def _write_run_files(report: SegmentReport, run_files: list[Path], statistics: bool, seconds: float) -> None:
    """The report (``report.json``, ``report_part<K>.json`` for one of several parts, with the run id when another
    run holds that name) and, with statistics, ``statistics.csv`` likewise. What cannot be written is a run error:
    said on stderr, and exit code 1."""
    report_path, statistics_path, quality_path = run_files
    report.seconds = round(seconds, 3)
    scored = [c for c in report.cases if c.quality is not None and c.status != "failed"]
    if scored:
        try:
            with atomic_output(quality_path) as tmp:
                tmp.write_text(_quality_csv(scored))
        except OSError as err:
            _run_error(report, f"cannot write {quality_path}: {_os_reason(err)}")
    if statistics:
        try:
            with atomic_output(statistics_path) as tmp:
                tmp.write_text(statistics_csv(_statistics_rows(report)))
        except OSError as err:
            _run_error(report, f"cannot write {statistics_path}: {_os_reason(err)}")
    try:
        with atomic_output(report_path) as tmp:
            tmp.write_text(json.dumps(asdict(report) | {"exit_code": report.exit_code}, indent=2) + "\n")
    except OSError as err:
        _run_error(report, f"cannot write the report {report_path}: {_os_reason(err)}")


def _quality_caption(quality: dict[str, Any] | None) -> str:
    """The preview's line about the case's quality score ("" without one)."""
    if quality is None:
        return ""
    return f"quality {quality['score']:.2f}" + (" - review: " + quality["reasons"][0] if quality["flagged"] else "")


def _quality_csv(cases: list[CaseResult]) -> str:
    """One row per scored case, flagged ones first, then by score (worst first)."""
    names = list(cases[0].quality["labels"])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["case", "score", *(f"{n}_score" for n in names), "flagged", "reasons"])
    for case in sorted(cases, key=lambda c: (not c.quality["flagged"], c.quality["score"], c.name)):
        q = case.quality
        writer.writerow([case.name, q["score"], *(q["labels"].get(n, "") for n in names), q["flagged"],
                         "; ".join(q["reasons"])])  # fmt: skip
    return out.getvalue()


def _statistics_rows(report: SegmentReport) -> list[tuple[str, dict]]:
    rows = []
    for case in report.cases:
        path = case.outputs.get("statistics_json")
        if case.status == "failed" or not path or case.status == SKIPPED_BUSY:
            continue
        try:
            rows.append((case.name, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as err:  # e.g. removed or damaged since an earlier run wrote it
            case.notes.append(f"not in statistics.csv: {Path(path).name} cannot be read ({_first_line(err)})")
    return rows


def _run_error(report: SegmentReport, message: str) -> None:
    report.errors.append(message)
    logger.error("%s", message)


# ------------------------------------------------------------------------------------------ input and output
def _prepare_output(input: Path | None, output: Path) -> Path:
    """Create the output folder and check that files can be written into it (``input`` None: a DICOMweb input).

    Raises:
        UsageError: ``output`` is a file, is the input folder, cannot be created, or cannot be written into.
    """
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output}: exists and is not a folder.")
    if input is not None and output.is_dir() and input.is_dir() and os.path.samefile(input, output):
        raise UsageError(
            f"output {output} is the input folder {input}: outputs written there would be read as inputs by the "
            "next run; choose another output folder (one inside the input is fine)."
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"output {output}: cannot create the folder ({_os_reason(err)}).") from err
    probe = output / f".write-probe{PARTIAL_MARK}~{run_id()}"  # a dead run's leftover is removed like any other
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, b"write probe\n")
        finally:
            os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
        raise UsageError(f"output {output}: cannot write into the folder ({_os_reason(err)}).") from err
    return output


def _remote_input(url: str) -> tuple[DicomwebSource, DicomwebClient]:
    """The study, series or query a DICOMweb input URL names, and a client of its server.

    Raises:
        UsageError: a URL that names none, carries credentials, or credentials in the environment that are half set.
    """
    try:
        source = DicomwebSource.parse(url)
        return source, DicomwebClient(source.root)
    except ValueError as err:
        raise UsageError(str(err)) from err


@contextmanager
def _retrieved(
    source: DicomwebSource, client: DicomwebClient, max_bytes: int, quiet: bool, num_parts: int = 1, part_id: int = 0
) -> Iterator[tuple[Path, _PathsShown, list[Skipped]]]:
    """Retrieve the image series ``source`` names (of part ``part_id`` of ``num_parts``, in UID order) into a
    temporary folder, removed after the block; yield it, how its paths are shown (as the URLs they came from), and
    the series not retrieved with the reason.

    Raises:
        UsageError: the server cannot be reached or refuses the query or the credentials (nothing is retrieved).
        FileNotFoundError: a study or series URL that names nothing on the server.
    """
    try:
        series, skipped = find_series(client, source)
    except DicomwebError as err:
        raise UsageError(str(err)) from err
    series = sorted(series, key=lambda s: (s.study, s.series))[part_id::num_parts]
    folder = Path(tempfile.mkdtemp(prefix="ic_moe_dicomweb_"))
    try:
        shown = _PathsShown(folder, series)
        logger.info("retrieving %d series from %s", len(series), client.root)
        progress = _progress_bar(quiet, total=len(series), desc="retrieving", unit="series")
        for item in series:
            try:
                retrieve_series(client, item, folder, max_bytes)
            except (DicomwebError, ImageError, OSError, ValueError) as err:
                shutil.rmtree(folder / item.series, ignore_errors=True)  # a part of a series is no series
                reason = str(err).removeprefix(f"{item.url}: ")
                skipped.append(Skipped(item.url, f"cannot retrieve the series: {reason}"))
            progress.update(1)
        progress.close()
        yield folder, shown, skipped
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _PathsShown:
    """Paths of retrieved series (``<folder>/<series uid>/<instance uid>.dcm``) shown as the URLs they came from,
    in the report and the run's log lines, and the DICOMweb credentials blanked out (a server may echo them)."""

    def __init__(self, folder: Path | None = None, series: Sequence[Any] = ()) -> None:
        self.urls = {s.series: s.url for s in series}
        uid = r"[0-9]+(?:\.[0-9]+)*"
        self.pattern = (
            re.compile(re.escape(str(folder)) + rf"/(?P<series>{uid})(?:/(?P<sop>{uid})\.dcm)?") if folder else None
        )

    def __call__(self, text: str) -> str:
        if self.pattern is None or not isinstance(text, str):
            return text
        return redact(self.pattern.sub(self._url, text))

    def _url(self, match: re.Match) -> str:
        url = self.urls.get(match["series"])
        if url is None:
            return match[0]
        return f"{url}/instances/{match['sop']}" if match["sop"] else url

    def in_report(self, report: SegmentReport) -> None:
        """Rewrite the report's paths of retrieved files and folders as URLs."""
        if self.pattern is None:
            return
        for case in report.cases:
            case.source = self(case.source)
            case.error = self(case.error) if case.error else case.error
            case.notes = [self(n) for n in case.notes]
        for item in report.not_segmented:
            item["path"], item["reason"] = self(item["path"]), self(item["reason"])
        report.errors = [self(e) for e in report.errors]

    @contextmanager
    def in_logs(self, log: logging.Logger) -> Iterator[None]:
        """Rewrite ``log``'s lines for the block."""
        if self.pattern is None:
            yield
            return
        shown = self

        class _Rewrite(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.msg, record.args = shown(record.getMessage()), ()
                return True

        rewrite = _Rewrite()
        log.addFilter(rewrite)
        try:
            yield
        finally:
            log.removeFilter(rewrite)


def _excluded(input: Path, out_dir: Path) -> list[Path]:
    """The output folder when it lies inside the input folder: earlier outputs are no inputs. An input inside the
    output folder (``segment studies .``) is searched as usual."""
    try:
        inside = input.is_dir() and input.resolve() in out_dir.resolve().parents
    except (OSError, RuntimeError):  # a symbolic link loop: nothing to exclude through it
        inside = False
    return [out_dir] if inside else []


def _all_outputs(
    out_dir: Path,
    cases: list[Case],
    formats: list[str],
    statistics: bool,
    preview: bool,
    run_files: list[Path],
    push: bool = False,
) -> Iterator[Path]:
    """Every file a run may write for ``cases`` (of all parts), run files included."""
    yield from run_files
    for case in cases:
        yield from map(Path, _output_paths(out_dir, case, formats, statistics, preview, None, push).values())


def _refuse_replacing_inputs(cases: list[Case], outputs: Iterable[Path]) -> None:
    """Refuse outputs that are input files: the same file (device and inode), reached by the same path, a symbolic
    link or a hard link.

    Raises:
        UsageError: naming the first output and input, and how many more.
    """
    inputs: dict[tuple[int, int], Path] = {}
    for case in cases:
        for path in case.files or [case.path]:
            try:
                status = os.stat(path)
            except OSError:  # gone or unreadable: its load reports it
                continue
            inputs[(status.st_dev, status.st_ino)] = path
    clashes = []
    for output in outputs:
        try:
            status = os.stat(output)
        except OSError:  # not there (the usual case): it is no input
            continue
        if (status.st_dev, status.st_ino) in inputs:
            clashes.append((output, inputs[(status.st_dev, status.st_ino)]))
    if clashes:
        (output, source), more = clashes[0], f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        same = "" if Path(output) == Path(source) else " (the same file)"
        raise UsageError(f"output {output} would replace the input {source}{same}{more}: choose an output folder "
                         "that holds no input files.")  # fmt: skip


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary files of runs that are no longer alive, and lock files nobody holds (left by killed runs)."""
    for stale in remove_partial_outputs(out_dir):
        logger.info("removed %s, left by an interrupted run", stale.name)
    for path in [*out_dir.glob(CASE_LOCK.format("*")), *out_dir.glob(REPORT_LOCK.format("report*.json"))]:
        try:
            with exclusive_lock(path, remove=True):  # removed only when no other run holds it
                pass
        except OSError:  # e.g. removed by another run meanwhile
            continue


class _ReaderNotes(logging.Handler):
    """What readers log while a case loads (nibabel's header fix-ups and complaints, which name no file), kept as
    notes on that case instead of bare lines on the console. Errors are left out: they come back as the load's
    exception, which names the file."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def collecting(self, case_name: str, notes: list[str]) -> Iterator[None]:
        """Collect this thread's reader messages into ``notes`` for the block."""
        self._local.target = (case_name, notes)
        try:
            yield
        finally:
            self._local.target = None

    def emit(self, record: logging.LogRecord) -> None:
        target = getattr(self._local, "target", None)
        if target is None or record.levelno >= logging.ERROR:
            return
        name, notes = target
        note = f"while reading: {record.getMessage()}"
        if note not in notes:
            notes.append(note)
            logger.info("%s: %s", name, note)


@contextmanager
def _library_logs() -> Iterator[_ReaderNotes]:
    """For the run: nibabel's messages go to the case they concern, highdicom's INFO lines (every module it copies)
    are left out; both loggers are restored afterwards."""
    from nibabel import imageglobals  # its logger gets a console handler at import: import it before the swap

    notes = _ReaderNotes()
    nibabel_log, highdicom_log = imageglobals.logger, logging.getLogger("highdicom")
    saved = (nibabel_log.handlers[:], nibabel_log.propagate, highdicom_log.level)
    nibabel_log.handlers, nibabel_log.propagate = [notes], False
    highdicom_log.setLevel(logging.WARNING)
    try:
        yield notes
    finally:
        nibabel_log.handlers, nibabel_log.propagate = saved[0], saved[1]
        highdicom_log.setLevel(saved[2])


# ---------------------------------------------------------------------------------------------------- options
def _parse_formats(formats: str | Sequence[str]) -> list[str]:
    wanted = [f.lower() for f in _as_list("formats", formats)]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise UsageError(f"formats must be a comma-separated subset of {', '.join(FORMATS)}, got {formats!r}.")
    return list(dict.fromkeys(wanted))


def _parse_parts(num_parts: object, part_id: object) -> tuple[int, int]:
    """``num_parts``/``part_id`` as given, else torchrun's ``WORLD_SIZE``/``RANK``, else one part."""
    if num_parts is None and part_id is None:
        num_parts = _integer("WORLD_SIZE (environment)", os.environ.get("WORLD_SIZE", 1), 1)
        part_id = _integer("RANK (environment)", os.environ.get("RANK", 0), 0)
    num_parts = 1 if num_parts is None else _integer("num_parts", num_parts, 1)
    part_id = 0 if part_id is None else _integer("part_id", part_id, 0)
    if part_id >= num_parts:
        raise UsageError(f"need 0 ≤ part_id < num_parts, got part_id {part_id} and num_parts {num_parts}.")
    return num_parts, part_id


def _integer(name: str, value: object, minimum: int) -> int:
    """``value`` as a whole number ≥ ``minimum`` (ints, and strings or floats holding one)."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value)
    ):
        number = int(value)
    if number is None or number < minimum:
        raise UsageError(f"{name} must be a whole number ≥ {minimum}, got {value!r}.")
    return number


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _fraction(name: str, value: object) -> float:
    """``value`` as a number in [0, 1]."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise UsageError(f"{name} must be a number from 0 to 1, got {value!r}.")
    return number


def _flag(name: str, value: object) -> bool:
    """An on/off option: a bool (``--name`` / ``--noname``), 0 / 1, or true / false / yes / no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise UsageError(f"{name} is an on/off option (--{name} or --no{name}), got {value!r}.")


def _size_limit(max_image_size: object) -> int:
    """The image size limit in bytes (see :func:`~ic_moe_monai.io.guards.max_image_bytes`)."""
    try:
        return max_image_bytes(max_image_size)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        source = MAX_BYTES_ENV if max_image_size in (None, "") else "max_image_size"
        raise UsageError(f"{source}: {err}") from err


def _resolve_device(device: object) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a bare N is ``cuda:N``), checked against this machine."""
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"(?:cuda:)?([0-9]+)|cuda", text)
    if match is None:
        raise UsageError(f"device {device} is not supported: use auto, cpu or cuda:N.")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device}: CUDA is not available on this machine.")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    return torch.device("cuda", index)


def _reused_segmenter_device(
    segmenter: BundleSegmenter, configs: list[str], batch_size: int | None, device: object
) -> torch.device:
    """The device of a segmenter passed in place of a bundle folder, after checking nothing asks to rebuild it."""
    if configs or batch_size is not None:
        raise UsageError("config and batch_size cannot change a BundleSegmenter that is already built.")
    if str(device).strip().lower() != "auto" and _resolve_device(device) != segmenter.device:
        raise UsageError(f"device {device!r}: the BundleSegmenter given runs on {segmenter.device}.")
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
    try:  # without importing ITK: it is needed only for NRRD and MHA
        versions["itk"] = package_metadata.version("itk")
    except package_metadata.PackageNotFoundError:
        versions["itk"] = "not installed"
    return versions


def _as_list(name: str, value: object) -> list[str]:
    """A comma-separated string or a sequence of strings, as a list of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise UsageError(f"{name} must be a comma-separated list, got {value!r}.")


def _os_reason(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) and err.strerror else None) or _one_line(err)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {_first_line(err)}" if str(err).strip() else type(err).__name__
