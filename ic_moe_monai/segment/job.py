"""The batch job: find the cases, plan what to do, segment them with one bundle runtime, and report."""

from __future__ import annotations

import logging
import os
import platform
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from ic_moe_monai.inference.predictor import BundleSegmenter
from ic_moe_monai.io import Case, Skipped, discover_cases
from ic_moe_monai.io.atomic import exclusive_lock, run_id
from ic_moe_monai.io.dicomweb import DicomwebClient, is_dicomweb_url
from ic_moe_monai.io.saving import BackgroundWriter
from ic_moe_monai.segment.errors import case_error
from ic_moe_monai.segment.loader import CaseLoader, progress_bar
from ic_moe_monai.segment.locks import REPORT_LOCK, CaseLock, is_finished
from ic_moe_monai.segment.logs import library_logs
from ic_moe_monai.segment.options import (
    UsageError,
    device_name,
    parse_flag,
    parse_formats,
    parse_fraction,
    parse_integer,
    parse_list,
    parse_parts,
    parse_size_limit,
    resolve_device,
    reused_segmenter_device,
)
from ic_moe_monai.segment.outputs import (
    all_outputs,
    excluded_folders,
    output_paths,
    prepare_output,
    refuse_replacing_inputs,
    remove_leftovers,
    write_outputs,
)
from ic_moe_monai.segment.remote import PathsShown, remote_input, retrieved_series
from ic_moe_monai.segment.report import (
    RUN_FILES,
    SKIPPED_BUSY,
    SKIPPED_EXISTS,
    SKIPPED_NOTHING,
    CaseResult,
    SegmentReport,
    write_run_files,
)
from ic_moe_monai.segment.run_state import JobContext

try:  # progress bars are a convenience: without tqdm the run is the same, silent
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements.txt
    tqdm = None

logger = logging.getLogger(__package__)


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
    quiet = parse_flag("quiet", quiet)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    wanted = parse_formats(formats)
    configs = parse_list("config", config)
    statistics = parse_flag("statistics", statistics)
    preview = parse_flag("preview", preview)
    overwrite = parse_flag("overwrite", overwrite)
    num_parts, part_id = parse_parts(num_parts, part_id)
    batch_size = None if batch_size is None else parse_integer("batch_size", batch_size, 1)
    num_workers = parse_integer("num_workers", num_workers, 0)
    max_bytes = parse_size_limit(max_image_size)
    push = parse_flag("push", push)
    threshold = None if qc_threshold is None else parse_fraction("qc_threshold", qc_threshold)
    switches = {
        "tta_mirror": ("tta", tta),
        "keep_largest_component": ("keep_largest_component", keep_largest_component),
    }
    options = {key: parse_flag(name, value) for key, (name, value) in switches.items() if value is not None}
    remote = remote_input(input) if is_dicomweb_url(input) else None
    if push and remote is None:
        raise UsageError("push stores the DICOM SEGs on the DICOMweb server the series come from: it needs a "
                         "DICOMweb input URL.")  # fmt: skip
    if push and "dicom_seg" not in wanted:
        wanted.append("dicom_seg")
    if isinstance(bundle, BundleSegmenter):
        if options:
            raise UsageError("tta and keep_largest_component are set when a BundleSegmenter is built, not here.")
        torch_device = reused_segmenter_device(bundle, configs, batch_size, device)
    else:
        torch_device = resolve_device(device)
    if remote is None and not os.path.lexists(input):
        raise FileNotFoundError(f"input {input}: no such file or folder.")
    out_dir = prepare_output(None if remote else Path(input), Path(output))
    with ExitStack() as fetched:
        if remote is None:
            local, shown, remote_skipped = Path(input), PathsShown(), []
            all_cases, skipped = discover_cases(input, exclude=excluded_folders(local, out_dir))
        else:
            # each part retrieves only the series it segments
            retrieved = retrieved_series(*remote, max_bytes, quiet, num_parts, part_id)
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
    shown: PathsShown,
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
    refuse_replacing_inputs(all_cases, all_outputs(out_dir, all_cases, wanted, statistics, preview, run_files,
                                                     push is not None))  # fmt: skip

    bundle_name = str(bundle.bundle) if isinstance(bundle, BundleSegmenter) else str(bundle)
    settings = {"bundle": bundle_name, "config": configs, "formats": wanted, "statistics": statistics,
                "preview": preview, "overwrite": overwrite, "batch_size": batch_size, "num_workers": num_workers,
                "num_parts": num_parts, "part_id": part_id, "max_image_size": max_bytes,
                "push": push is not None, "qc_threshold": qc_threshold, **(options or {})}  # fmt: skip
    report = SegmentReport(input=str(input), output=str(out_dir), settings=settings, versions=_versions(),
                           device=device_name(torch_device), run_id=run_id())  # fmt: skip

    with ExitStack() as run:
        run.enter_context(shown.in_logs(logger))
        reader_notes = run.enter_context(library_logs())
        if not run.enter_context(exclusive_lock(out_dir / REPORT_LOCK.format(run_files[0].name), remove=True)):
            # another run is writing into this folder: its report keeps its name, this one's gets the run id
            run_files = [p.with_name(f"{p.stem}_{run_id().replace('~', '_')}{p.suffix}") for p in run_files]
            logger.warning("another run is writing into %s: this run's report is %s", out_dir, run_files[0].name)
        remove_leftovers(out_dir)
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
            job = JobContext(segmenter, out_dir, overwrite, max_bytes, reader_notes, push)
            _run_cases(job, todo, num_workers, quiet)
        shown.in_report(report)
        write_run_files(report, run_files, statistics, time.monotonic() - started)
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
        result.outputs = output_paths(out_dir, case, formats, statistics, preview, result.notes, push)
        if push and "pushed" not in result.outputs:  # asked to store a SEG that cannot be made
            result.status, result.outputs = "failed", {}
            result.error = f"{case.path}: cannot push: no DICOM SEG ({case.dicom_seg_problem})"
            logger.warning("failed: %s", result.error)
        elif not result.outputs:
            result.status = SKIPPED_NOTHING
        elif not overwrite and is_finished(result):
            result.status = SKIPPED_EXISTS
        else:
            todo.append((case, result))
        report.cases.append(result)
    return todo


def _run_cases(job: JobContext, todo: list[tuple[Case, CaseResult]], num_workers: int, quiet: bool) -> None:
    """Segment the cases in order while up to ``num_workers`` next cases load in background threads and the
    finished ones are written by another. Each case is locked from before it loads until it is written."""
    progress_cases = progress_bar(quiet, total=len(todo), desc="cases", unit="case", position=0)
    progress_slices = progress_bar(quiet, desc="slices", unit="slice", position=1, leave=False)

    def on_batch(done: int, total: int) -> None:
        if progress_slices.total != total:
            progress_slices.reset(total=total)
        progress_slices.n = done
        progress_slices.refresh()

    redirect = logging_redirect_tqdm() if tqdm is not None and not quiet else nullcontext()
    # one case waits to be written at most: labelmaps (and the image, for statistics) do not pile up
    with redirect, CaseLoader(job, todo, num_workers) as loader, BackgroundWriter(max_pending=1) as writer:
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
                preview = "preview" in result.outputs
                labels = job.segmenter.predict(data, progress=None if quiet else on_batch, uncertainty=preview)
                unsure = job.segmenter.last_uncertainty if preview else None
                result.seconds["inference"] = round(time.monotonic() - start, 3)
                quality = job.segmenter.last_quality
                result.quality = None if quality is None else quality.as_dict()
                del data
                needs_image = "statistics_json" in result.outputs or "preview" in result.outputs
                writer.submit(_finish_case, case, result, image if needs_image else None, labels, job.segmenter,
                              progress_cases, lock, job.push, unsure)  # fmt: skip
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
    lock: CaseLock | None,
    push: DicomwebClient | None = None,
    uncertainty: Any = None,
) -> None:
    """Write one case's outputs (in the writing thread), record how it went, and release the case."""
    try:
        start = time.monotonic()
        write_outputs(case, result, image, labels, seg, push, uncertainty)
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
    result.error = case_error(case, err)
    for path in result.outputs.values() if remove_outputs else ():
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as unlink_error:
            result.notes.append(f"could not remove {path}: {unlink_error.strerror or unlink_error}")
    result.outputs = {}
    logger.warning("failed: %s", result.error)
    logger.debug("%s", "".join(traceback.format_exception(err)))


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
