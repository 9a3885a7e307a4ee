"""Outputs of batch segmentation: NIfTI labelmaps, DICOM SEG, label statistics and preview images.

Every writer goes through :func:`atomic_output`: the file is written under a hidden temporary name in the target
folder and renamed when complete, so an interrupted run never leaves a partial file under the final name. The
temporary name carries the writing run's id (host, process id, random token): :func:`remove_partial_outputs` removes
only the leftovers of runs that are gone, never those of a run still writing into the same folder.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PARTIAL_MARK",
    "SegmentCode",
    "atomic_output",
    "exclusive_lock",
    "label_statistics",
    "labels_to_dicom_frames",
    "named_labels",
    "partial_name",
    "read_segment_codes",
    "remove_partial_outputs",
    "run_id",
    "write_dicom_seg",
    "write_nifti_labels",
    "write_preview",
    "write_statistics",
]

PARTIAL_MARK = ".partial"
NAME_MAX = 255  # bytes in a file name on common file systems
# Overlay colours of labels 1, 2, ... (RGB), repeated when there are more labels.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip
# Type 2 attributes (required, may be empty) of the patient and study modules the SEG copies from its source.
SOURCE_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip
IMAGE_STORAGE_BY_MODALITY = {"CT": pydicom.uid.CTImageStorage, "MR": pydicom.uid.MRImageStorage,
                             "PT": pydicom.uid.PositronEmissionTomographyImageStorage}  # fmt: skip
# LPS (DICOM) <-> RAS (NIfTI, MONAI) sign flip of the first two world axes.
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------- temporary files
_RUN: dict[str, str] = {}
_PARTIAL = re.compile(re.escape(PARTIAL_MARK) + r"~(?P<host>[^~/]+)~(?P<pid>[0-9]+)~(?P<token>[0-9a-f]+)")


def run_id() -> str:
    """This process's id in temporary names: ``host~pid~token`` (the token tells apart reused process ids)."""
    pid = str(os.getpid())
    if _RUN.get("pid") != pid:  # a forked child is another run
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
        _RUN.update(pid=pid, id=f"{host}~{pid}~{secrets.token_hex(4)}")
    return _RUN["id"]


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds, delete it otherwise.

    The temporary name starts with a dot, carries this run's id (:func:`run_id`) and keeps the final suffix
    (writers pick their format from it): ``.<name>.partial~<host>~<pid>~<token><suffixes>``.
    """
    path = Path(path)
    tmp = path.with_name(partial_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_name(name: str) -> str:
    """The temporary name of ``name`` for this run: ``.<name>.partial~<run id><suffixes>``.

    A name that would be too long for a file system (255 bytes) is shortened to a digest of ``name``, so a long
    input file name does not make its outputs unwritable.
    """
    full = f".{name}{PARTIAL_MARK}~{run_id()}{''.join(Path(name).suffixes)}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return f".{digest}{PARTIAL_MARK}~{run_id()}{''.join(Path(name).suffixes[-2:])}"


def remove_partial_outputs(folder: str | Path) -> list[Path]:
    """Delete the temporary files that runs which are gone left in ``folder``; return them.

    A leftover is removed when its run ran on this host and its process no longer exists, or when it has no run id
    (older versions). Files of live runs, and of runs on other hosts (a shared folder), are kept.
    """
    stale = []
    for p in Path(folder).glob(f".*{PARTIAL_MARK}*"):
        if not p.is_file():
            continue
        owner = _PARTIAL.search(p.name)
        if owner is None or (owner["host"] == run_id().split("~")[0] and not _process_alive(int(owner["pid"]))):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


@contextmanager
def exclusive_lock(path: str | Path, remove: bool = False) -> Iterator[bool]:
    """Try to hold an advisory lock on ``path`` (created if needed) for the block; yield whether it is held.

    The lock ends with the block or with the process (the OS drops it), so a killed run never leaves a stale lock
    (only, with ``remove``, the file, which the next holder removes). With ``remove`` the file is deleted at the end
    of the block while the lock is still held; every holder checks, once it holds the lock, that the file it locked
    is still the one at ``path`` (and else opens it again), so removing lock files never lets two processes hold the
    same lock. Where the OS has no ``fcntl`` (Windows) or the file system has no locks, the lock is always granted.

    Raises:
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path = Path(path)
    handle = _locked_handle(path, fcntl)
    if handle is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            if remove:  # still held: a process that opened this file before the unlink finds it gone and retries
                path.unlink(missing_ok=True)
        finally:
            handle.close()  # closing the file drops the lock


def _locked_handle(path: Path, fcntl: Any) -> Any | None:
    """An open file on ``path`` holding its exclusive lock, or None when another process holds it."""
    for _ in range(16):  # another holder may remove the file between our open and our lock: open it again
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            return _NoLock()  # no locks on this file system (e.g. ENOLCK): granted, as without fcntl
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
    return None


class _NoLock:
    """Stands for a held lock where the file system cannot lock."""

    def close(self) -> None:
        pass


def write_nifti_labels(labels: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """A uint8 labelmap ``(X, Y, Z)`` with the RAS ``affine`` as NIfTI (sform and qform set, like MONAI's writer)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(image, tmp)


def named_labels(labels: np.ndarray, label_names: Mapping[int, str]) -> dict[int, str]:
    """``label_names`` plus ``"label <v>"`` for every value the labelmap holds that has no name, so that no output
    leaves a label out (e.g. a model trained for more labels than the names a bundle gives)."""
    present = np.flatnonzero(np.bincount(np.asarray(labels).ravel().astype(np.int64)))
    names = {int(k): str(v) for k, v in label_names.items()}
    names.update({int(v): f"label {int(v)}" for v in present if int(v) != 0 and int(v) not in names})
    return dict(sorted(names.items()))


# --------------------------------------------------------------------------------------------------- statistics
def label_statistics(
    labels: np.ndarray, image: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str]
) -> dict[str, dict[str, float | int | None]]:
    """Per-label voxel count, volume (mL) and mean image intensity (in the image's own units, e.g. HU).

    Args:
        labels: the labelmap ``(X, Y, Z)``.
        image: the input image in the same grid.
        affine: the voxel-to-world matrix (mm); its determinant gives the voxel volume.
        label_names: label value → name; background (0) is left out; values without a name are ``label <v>``.
    """
    label_names = named_labels(labels, label_names)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label_names, default=0) + 1)
    sums = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64), minlength=len(counts))
    stats = {}
    for value, name in sorted(label_names.items()):
        if value == 0:
            continue
        n = int(counts[value]) if value < len(counts) else 0
        stats[name] = {
            "label": value,
            "voxels": n,
            "volume_ml": round(n * voxel_ml, 4),
            "mean_intensity": round(float(sums[value]) / n, 4) if n else None,
        }
    return stats


def write_statistics(case: str, stats: Mapping[str, Mapping], json_path: str | Path, csv_path: str | Path) -> None:
    """One case's statistics as JSON (``{label name: {...}}``) and CSV (one row per label)."""
    with atomic_output(json_path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    with atomic_output(csv_path) as tmp:
        tmp.write_text(statistics_csv([(case, stats)]))


def statistics_csv(cases: Sequence[tuple[str, Mapping[str, Mapping]]]) -> str:
    """CSV text with the columns ``case, label, name, voxels, volume_ml, mean_intensity``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "name", "voxels", "volume_ml", "mean_intensity"])
    for case, stats in cases:
        for name, row in stats.items():
            mean = "" if row["mean_intensity"] is None else row["mean_intensity"]
            writer.writerow([case, row["label"], name, row["voxels"], row["volume_ml"], mean])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ preview
def write_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    label_names: Mapping[int, str],
    height: int = 256,
    caption: str = "",
    alert: bool = False,
) -> None:
    """A PNG with axial, coronal and sagittal slices through the labelled region, labels overlaid in colour.

    Views are in radiological convention (patient right on the image left, anterior and superior up), with the
    physical aspect ratio, each ``height`` pixels high, and a legend of the label names, followed by ``caption``
    (e.g. the quality score), in red with ``alert`` (a case flagged for review).
    """
    import nibabel as nib

    label_names = named_labels(labels, label_names)
    orientation = nib.orientations.io_orientation(affine)  # how to reach RAS+ by flips and permutations
    ras_image = nib.orientations.apply_orientation(image, orientation)
    ras_labels = nib.orientations.apply_orientation(labels, orientation)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(orientation[:, 0])]
    centre = _label_centre(ras_labels)
    low, high = np.percentile(ras_image, [1, 99])
    gray = np.clip((ras_image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    views = [  # (image rows, image columns), row/column spacings
        (gray[::-1, ::-1, centre[2]].T, ras_labels[::-1, ::-1, centre[2]].T, spacing[1], spacing[0]),  # axial
        (gray[::-1, centre[1], ::-1].T, ras_labels[::-1, centre[1], ::-1].T, spacing[2], spacing[0]),  # coronal
        (gray[centre[0], ::-1, ::-1].T, ras_labels[centre[0], ::-1, ::-1].T, spacing[2], spacing[1]),  # sagittal
    ]
    panels = [_overlay(g, lab, dr, dc, height) for g, lab, dr, dc in views]
    legend = [(PALETTE[(v - 1) % len(PALETTE)], n) for v, n in sorted(label_names.items()) if v != 0]
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height + 16), (0, 0, 0))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 4
    draw, font, x = ImageDraw.Draw(canvas), ImageFont.load_default(), 2
    for colour, name in legend:
        draw.rectangle([x, height + 4, x + 8, height + 12], fill=colour)
        draw.text((x + 11, height + 2), name, fill=(255, 255, 255), font=font)
        x += 11 + int(draw.textlength(name, font=font)) + 10
    if caption:
        draw.text((x + 6, height + 2), caption, fill=(255, 80, 80) if alert else (200, 200, 200), font=font)
    with atomic_output(path) as tmp:
        canvas.save(tmp, format="PNG")


def _label_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The centroid voxel of the foreground, or the volume centre when there is none."""
    foreground = np.argwhere(labels > 0)
    if len(foreground) == 0:
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(np.rint(c)) for c in foreground.mean(axis=0))


def _overlay(gray: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float, height: int) -> Image.Image:
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(PALETTE[(int(value) - 1) % len(PALETTE)], dtype=np.float32)
        mask = labels == value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
    width = max(1, round(height * (gray.shape[1] * col_mm) / (gray.shape[0] * row_mm)))
    return Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------------- DICOM SEG
def labels_to_dicom_frames(labels: np.ndarray, affine: np.ndarray, headers: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The labelmap's frame under each source DICOM image, ``(len(headers), Rows, Columns)``.

    ``labels`` ``(X, Y, Z)`` with its RAS ``affine`` must lie on the series' own grid (as ITK reads a series); each
    image's position and orientation locate its frame, so the order of ``headers`` is free.

    Raises:
        ValueError: when an image does not lie on a slice of the labelmap's grid.
    """
    inverse = np.linalg.inv(affine)
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    frames = []
    for header in headers:
        orientation = np.array([float(v) for v in header.ImageOrientationPatient])
        row_dir, col_dir = orientation[:3] * LPS_TO_RAS, orientation[3:] * LPS_TO_RAS  # along a row, a column
        col_axis, row_axis = _matching_axis(axes, row_dir), _matching_axis(axes, col_dir)
        if col_axis is None or row_axis is None or col_axis == row_axis:
            raise ValueError(f"image {header.get('SOPInstanceUID', '?')}: its orientation is not the volume's.")
        slice_axis = 3 - col_axis - row_axis
        origin = np.array([float(v) for v in header.ImagePositionPatient]) * LPS_TO_RAS
        index = inverse[:3, :3] @ origin + inverse[:3, 3]
        k = int(np.rint(index[slice_axis]))
        col_forward, row_forward = axes[:, col_axis] @ row_dir > 0, axes[:, row_axis] @ col_dir > 0
        corner = {col_axis: 0 if col_forward else labels.shape[col_axis] - 1,
                  row_axis: 0 if row_forward else labels.shape[row_axis] - 1}  # fmt: skip
        on_grid = abs(index[slice_axis] - k) < 0.1 and 0 <= k < labels.shape[slice_axis]
        if not on_grid or any(abs(index[a] - v) > 0.1 for a, v in corner.items()):
            raise ValueError(f"image {header.get('SOPInstanceUID', '?')}: not on a slice of the volume's grid.")
        frame = np.moveaxis(np.take(labels, k, axis=slice_axis), 0 if row_axis < col_axis else 1, 0)  # (rows, cols)
        frame = frame if col_forward else frame[:, ::-1]
        frame = frame if row_forward else frame[::-1, :]
        if frame.shape != (int(header.Rows), int(header.Columns)):
            raise ValueError(f"image {header.get('SOPInstanceUID', '?')}: its matrix size is not the volume's.")
        frames.append(frame)
    return np.stack(frames)


def _matching_axis(axes: np.ndarray, direction: np.ndarray) -> int | None:
    alignment = np.abs(axes.T @ direction)
    best = int(np.argmax(alignment))
    return best if alignment[best] > 0.999 else None


@dataclass(frozen=True)
class SegmentCode:
    """A coded concept of a DICOM SEG segment: (code value, coding scheme, meaning), e.g. SCT 5366008 Hippocampus."""

    value: str
    scheme: str
    meaning: str

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], where: str) -> SegmentCode:
        try:
            return cls(str(entry["code"]), str(entry["scheme"]), str(entry["meaning"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: a code needs 'code', 'scheme' and 'meaning', got {entry!r:.120}.") from err


# The category and type of a segment whose label has no code of its own: SCT 91723000 "Anatomical Structure" (the
# category of DICOM CID 7150 Segmentation Property Categories).
GENERIC_CODE = SegmentCode("91723000", "SCT", "Anatomical Structure")


def read_segment_codes(metadata: Mapping[str, Any]) -> dict[int, dict[str, SegmentCode]]:
    """Label value → ``{"category", "type"[, "modifier"]}`` from a bundle's ``metadata.json`` ``segment_codes``.

    ``segment_codes`` maps label values (as strings) to ``{"category": {"code", "scheme", "meaning"}, "type": {...},
    "modifier": {...}}`` (modifier optional); labels it leaves out get the generic code.

    Raises:
        ValueError: an entry that is not such a mapping.
    """
    codes: dict[int, dict[str, SegmentCode]] = {}
    for key, entry in (metadata.get("segment_codes") or {}).items():
        where = f"metadata segment_codes[{key!r}]"
        if not str(key).isdigit() or not isinstance(entry, Mapping) or not {"category", "type"} <= set(entry):
            raise ValueError(f"{where}: a label value with 'category' and 'type' codes is needed.")
        codes[int(key)] = {part: SegmentCode.from_json(entry[part], f"{where}.{part}")
                           for part in ("category", "type", "modifier") if part in entry}  # fmt: skip
    return codes


def write_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[str | Path],
    label_names: Mapping[int, str],
    path: str | Path,
    algorithm_version: str = "",
    segment_codes: Mapping[int, Mapping[str, SegmentCode]] | None = None,
    algorithm_type: str = "AUTOMATIC",
    series_description: str = "IC-MoE segmentation",
) -> None:
    """A binary DICOM Segmentation (one segment per non-background label) referencing the source series.

    Segment number = label value, so the segments must be 1, 2, ... without gaps (DICOM numbers them so); a label
    absent from ``labels`` is an empty segment.

    Args:
        labels: the labelmap ``(X, Y, Z)`` in the series' grid.
        affine: its RAS voxel-to-world matrix.
        source_files: the series' DICOM files.
        label_names: label value → name (from the bundle's ``channel_def``); background (0) is left out; a value
            the labelmap holds without a name becomes a segment ``label <v>`` with the generic code.
        path: the ``.dcm`` file to write.
        algorithm_version: recorded in the segments' algorithm identification.
        segment_codes: label value → coded category, type and optional modifier (:func:`read_segment_codes`);
            labels without one are coded as the generic "Anatomical Structure".
        algorithm_type: the segments' ``SegmentAlgorithmType``: ``AUTOMATIC`` (the model's answer) or
            ``SEMIAUTOMATIC`` (an annotator's label made with the model).
        series_description: the SEG series' description.
    """
    headers = [_clean_header(pydicom.dcmread(f, stop_before_pixels=True)) for f in source_files]
    frames = labels_to_dicom_frames(labels, affine, headers)
    label_names = named_labels(frames, label_names)  # highdicom refuses pixel values without a segment
    _share_orientation(headers)
    with warnings.catch_warnings():  # pydicom's nits about the source's own values (e.g. one-part person names)
        warnings.simplefilter("ignore", UserWarning)
        seg = _segmentation(headers, frames, label_names, algorithm_version, segment_codes or {}, algorithm_type,
                            series_description)  # fmt: skip
    with atomic_output(path) as tmp:
        seg.save_as(tmp)


def _share_orientation(headers: Sequence[pydicom.Dataset], tolerance: float = 1e-3) -> None:
    """Give the (in-memory) headers the first one's ImageOrientationPatient when they all agree within
    ``tolerance``, as the series check does: highdicom needs them identical, and scanners write values that differ
    in the last digits."""
    first = [float(v) for v in headers[0].ImageOrientationPatient]
    for header in headers[1:]:
        if max(abs(float(a) - b) for a, b in zip(header.ImageOrientationPatient, first, strict=True)) > tolerance:
            return
    for header in headers[1:]:
        header.ImageOrientationPatient = list(headers[0].ImageOrientationPatient)


def _clean_header(header: pydicom.Dataset) -> pydicom.Dataset:
    """Make good, in memory, what anonymisers and old scanners leave out of a source header that the SEG copies:
    type 2 patient/study attributes (present, possibly empty), the SOP instance and class UIDs (from the file meta,
    or the class from the modality), and an empty SpecificCharacterSet (the default repertoire anyway)."""
    for keyword in SOURCE_TYPE2_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, "")
    file_meta = getattr(header, "file_meta", None)
    if not header.get("SOPInstanceUID") and getattr(file_meta, "MediaStorageSOPInstanceUID", None):
        header.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    if not header.get("SOPClassUID"):
        from_meta = getattr(file_meta, "MediaStorageSOPClassUID", None)
        by_modality = IMAGE_STORAGE_BY_MODALITY.get(str(header.get("Modality", "")).upper())
        header.SOPClassUID = from_meta or by_modality or pydicom.uid.SecondaryCaptureImageStorage
    if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
        del header.SpecificCharacterSet
    return header


def _segmentation(
    headers: Sequence[pydicom.Dataset],
    frames: np.ndarray,
    label_names: Mapping[int, str],
    algorithm_version: str,
    segment_codes: Mapping[int, Mapping[str, SegmentCode]],
    algorithm_type: str = "AUTOMATIC",
    series_description: str = "IC-MoE segmentation",
):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="IC-MoE", version=algorithm_version or "unknown", family=codes.cid7162.ArtificialIntelligence
    )

    def concept(code: SegmentCode) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)

    segments = []
    for value, name in sorted(label_names.items()):
        if value == 0:
            continue
        coded = segment_codes.get(value, {})
        segment = hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=name,
            segmented_property_category=concept(coded.get("category", GENERIC_CODE)),
            segmented_property_type=concept(coded.get("type", GENERIC_CODE)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type],
            algorithm_identification=algorithm,
        )
        if "modifier" in coded:  # highdicom has no argument for it: (0062,0011) inside the type's item
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                concept(coded["modifier"])
            ]
        segments.append(segment)
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(headers[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="IC-MoE",
        manufacturer_model_name="IC-MoE MONAI bundle",
        software_versions=algorithm_version or "unknown",
        device_serial_number="0",
        series_description=series_description,
    )
