"""Output paths and writing: the labelmap, DICOM SEG, statistics and preview of a case, each written whole or not
at all, and the checks that no output replaces an input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from monai.data import MetaTensor

from ic_moe_monai.inference.predictor import BundleSegmenter
from ic_moe_monai.io import Case
from ic_moe_monai.io.atomic import PARTIAL_MARK, atomic_output, exclusive_lock, remove_partial_outputs, run_id
from ic_moe_monai.io.dicom_seg import write_dicom_seg
from ic_moe_monai.io.dicomweb import DicomwebClient, DicomwebError
from ic_moe_monai.io.dicomweb_series import stored_receipt
from ic_moe_monai.io.writers import label_statistics, write_nifti_labels, write_preview, write_statistics
from ic_moe_monai.segment.errors import OutputError, one_line, os_reason
from ic_moe_monai.segment.locks import CASE_LOCK, REPORT_LOCK
from ic_moe_monai.segment.options import UsageError
from ic_moe_monai.segment.report import CaseResult, quality_caption

logger = logging.getLogger(__package__)


def output_paths(
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


def write_outputs(
    case: Case,
    result: CaseResult,
    image: MetaTensor | None,
    labels: MetaTensor,
    seg: BundleSegmenter,
    push: DicomwebClient | None = None,
    uncertainty: np.ndarray | None = None,
) -> None:
    """All requested outputs of one case; the NIfTI labelmap last, as the mark of a finished case. A DICOM SEG that
    cannot be made is a note on the case, whose other outputs are still written, unless it is to be pushed: then
    the case fails, as it does when the server does not store it. ``uncertainty``: where the network was unsure
    (:attr:`BundleSegmenter.last_uncertainty`), drawn on the preview."""
    label_array = np.asarray(labels[0], dtype=np.uint8)  # keeps the labelmap's memory order (NIfTI's, x fastest)
    affine = np.asarray(labels.affine, dtype=np.float64)
    outputs = result.outputs
    if "dicom_seg" in outputs:
        try:
            write_dicom_seg(label_array, affine, case.files, seg.label_names, outputs["dicom_seg"], seg.version,
                            segment_codes=getattr(seg, "segment_codes", None))  # fmt: skip
        except Exception as err:  # the SEG is one output among others: the case keeps its labelmap
            if push is not None:
                raise OutputError(f"{case.path}: cannot push: no DICOM SEG ({one_line(err)})") from err
            with suppress(OSError):  # an earlier run's SEG would not match the new labelmap
                Path(outputs.pop("dicom_seg")).unlink(missing_ok=True)
            note = f"no DICOM SEG: {one_line(err)}"
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
                          caption=quality_caption(result.quality), alert=flagged, uncertainty=uncertainty)  # fmt: skip
    if push is not None and "pushed" in outputs:
        _push_seg(case, Path(outputs["dicom_seg"]), Path(outputs["pushed"]), push)
    with _writing("the labelmap", case):
        if "nifti" in outputs:
            write_nifti_labels(label_array, affine, outputs["nifti"])


def _push_seg(case: Case, seg_file: Path, receipt: Path, client: DicomwebClient) -> None:
    """Store the case's DICOM SEG in its study on the server (STOW-RS), and keep what the server answered.

    Raises:
        OutputError: the server did not store it (the message names the URL and the reason).
    """
    try:
        urls = client.store([seg_file], study=case.study_uid or None)
    except DicomwebError as err:
        raise OutputError(f"{case.path}: cannot push the DICOM SEG ({err})") from err
    with _writing("the push receipt", case), atomic_output(receipt) as tmp:
        tmp.write_text(stored_receipt(urls, seg_file))


@contextmanager
def _writing(what: str, case: Case) -> Iterator[None]:
    """Name the case and the output in a writer's error."""
    try:
        yield
    except Exception as err:
        reason = os_reason(err) if isinstance(err, OSError) else one_line(err)
        raise OutputError(f"{case.path}: writing {what} failed ({reason})") from err


# ------------------------------------------------------------------------------------------ input and output
def prepare_output(input: Path | None, output: Path) -> Path:
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
        raise UsageError(f"output {output}: cannot create the folder ({os_reason(err)}).") from err
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
        raise UsageError(f"output {output}: cannot write into the folder ({os_reason(err)}).") from err
    return output


def excluded_folders(input: Path, out_dir: Path) -> list[Path]:
    """The output folder when it lies inside the input folder: earlier outputs are no inputs. An input inside the
    output folder (``segment studies .``) is searched as usual."""
    try:
        inside = input.is_dir() and input.resolve() in out_dir.resolve().parents
    except (OSError, RuntimeError):  # a symbolic link loop: nothing to exclude through it
        inside = False
    return [out_dir] if inside else []


def all_outputs(
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
        yield from map(Path, output_paths(out_dir, case, formats, statistics, preview, None, push).values())


def refuse_replacing_inputs(cases: list[Case], outputs: Iterable[Path]) -> None:
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


def remove_leftovers(out_dir: Path) -> None:
    """Temporary files of runs that are no longer alive, and lock files nobody holds (left by killed runs)."""
    for stale in remove_partial_outputs(out_dir):
        logger.info("removed %s, left by an interrupted run", stale.name)
    for path in [*out_dir.glob(CASE_LOCK.format("*")), *out_dir.glob(REPORT_LOCK.format("report*.json"))]:
        try:
            with exclusive_lock(path, remove=True):  # removed only when no other run holds it
                pass
        except OSError:  # e.g. removed by another run meanwhile
            continue
