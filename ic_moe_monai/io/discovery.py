"""Find the cases in an input path: image files (NIfTI, NRRD, MHA) and DICOM series, recursively.

DICOM files are grouped by SeriesInstanceUID (one case per series, wherever its files lie); objects that are not
images (SEG, RTSTRUCT, SR, presentation states, ...) are skipped. Each series is checked before it becomes a case,
and rejected with a precise reason when it cannot be a volume: a single or two slices, differing orientations or
matrix sizes, mixed MONOCHROME1 / MONOCHROME2 slices or colour images, duplicate slice positions, missing slices,
non-uniform spacing, or gantry tilt (slices not stacked along their normal). Folders that cannot be read and broken
symbolic links are listed as skipped with the reason. Only headers are read here; pixels are read when the case is
loaded.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ic_moe_monai.data.datasets import IMAGE_SUFFIXES, case_name

__all__ = ["NON_IMAGE_MODALITIES", "Case", "Skipped", "check_series_geometry", "discover_cases"]

# Modalities of DICOM objects that hold no image volume.
DESCRIPTION_BYTES = 64  # of a SeriesDescription in a case name (a long one would make output names unwritable)
# Case names become output names with suffixes of up to ~25 bytes (``_seg_stored.json``, ``_2``, lock files): a
# longer name (from a long file name) is cut and given a digest of the whole, within a file system's 255 bytes.
NAME_BYTES = 200
NON_IMAGE_MODALITIES = {
    "SEG",
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "SR",
    "PR",
    "KO",
    "DOC",
    "REG",
    "PLAN",
    "FID",
}
# Files that sit beside data and are not worth a line in the report.
IGNORED_SUFFIXES = (".md", ".txt", ".json", ".csv", ".yml", ".yaml", ".xml", ".html", ".pdf", ".png", ".jpg")
MIN_SLICES = 3


@dataclass
class Case:
    """One volume to segment."""

    name: str  # unique output name stem
    kind: str  # "image" or "dicom"
    path: Path  # the image file, or the folder holding (most of) the series
    files: list[Path] = field(default_factory=list)  # DICOM files sorted along the slice normal
    series_uid: str | None = None  # "no-series-uid:<folder>" when the files have none
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    description: str = ""

    @property
    def dicom_seg_problem(self) -> str | None:
        """Why no DICOM SEG can reference this case, or None when one can."""
        if self.kind != "dicom":
            return "the input is not a DICOM series"
        uids = {"StudyInstanceUID": self.study_uid, "SeriesInstanceUID": self.series_uid,
                "FrameOfReferenceUID": self.frame_of_reference_uid}  # fmt: skip
        missing = [name for name, uid in uids.items() if not uid or uid.startswith("no-series-uid")]
        return f"the source series has no {' / '.join(missing)} to reference" if missing else None


@dataclass
class Skipped:
    """Something found in the input that is not segmented, and why."""

    path: Path | str  # a file or folder; a URL for what a DICOMweb server holds
    reason: str
    failure: bool = True  # a bad or rejected input; False for DICOM objects that are simply not images


def discover_cases(input_path: str | Path, exclude: Iterable[str | Path] = ()) -> tuple[list[Case], list[Skipped]]:
    """All cases under ``input_path`` (a file, a DICOM series folder, or a tree mixing them) and what was skipped.

    Args:
        input_path: the file or folder to search.
        exclude: folders left out of the search (e.g. an output folder inside the input).
    """
    root = Path(input_path)
    if not root.exists():
        raise FileNotFoundError(f"input {root}: no such file or folder.")
    excluded = [Path(e).resolve() for e in exclude]

    def kept(path: Path) -> bool:
        resolved = path.resolve()
        return not any(resolved == e or e in resolved.parents for e in excluded)

    walk = _walk(root, kept)
    files = walk.files
    cases: list[Case] = []
    skipped: list[Skipped] = list(walk.problems)
    dicom_headers: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in files:
        if any(part.startswith(".") for part in path.relative_to(root if root.is_dir() else root.parent).parts):
            continue
        lower = path.name.lower()
        if lower.endswith(IMAGE_SUFFIXES):
            cases.append(Case(name=case_name(path), kind="image", path=path, description=path.name))
            continue
        if lower.endswith(IGNORED_SUFFIXES) or lower.endswith(".raw") or lower.endswith(".zraw"):
            continue
        header = _read_header(path)
        if isinstance(header, str):
            skipped.append(Skipped(path, header))
            continue
        modality = str(header.get("Modality", "")).upper()
        if modality in NON_IMAGE_MODALITIES or ("PixelData" not in header and "Rows" not in header):
            skipped.append(
                Skipped(path, f"DICOM {modality or 'object'} without an image volume (skipped)", failure=False)
            )
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or f"no-series-uid:{path.parent}"
        dicom_headers[uid].append((path, header))

    skipped.extend(Skipped(d, "empty folder: no files in it") for d in walk.empty_folders)
    for uid, members in dicom_headers.items():
        for group in _split_copies(members):
            problem = check_series_geometry([h for _, h in group])
            folder = _common_folder([p for p, _ in group])
            if problem:
                skipped.append(Skipped(folder, f"DICOM series {uid} ({len(group)} files): {problem}"))
                continue
            along = _positions_along_normal([h for _, h in group])
            ordered = [group[i][0] for i in np.argsort(along, kind="stable")]
            first = group[0][1]
            description = " ".join(str(first.get(t, "")) for t in ("Modality", "SeriesDescription")).strip()
            cases.append(
                Case(name=_series_name(folder, first), kind="dicom", path=folder, files=ordered, series_uid=uid,
                     study_uid=str(first.get("StudyInstanceUID", "")),
                     frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")), description=description)
            )  # fmt: skip
    return _unique_names(cases), skipped


@dataclass
class _Walk:
    files: list[Path] = field(default_factory=list)  # regular files (or links to them), sorted
    problems: list[Skipped] = field(default_factory=list)  # unreadable folders, broken links
    empty_folders: list[Path] = field(default_factory=list)  # outermost visible folders with nothing below them


def _walk(root: Path, kept) -> _Walk:
    """The files under ``root`` (symbolic links to folders are not followed, hidden entries are left out), and the
    folders that cannot be read (with the OS reason) and broken links met on the way."""
    result = _Walk()
    if not root.is_dir():
        result.files = [root]
        return result
    unreadable: dict[Path, str] = {}
    has_content: set[Path] = set()  # folders with a file, a broken link or an unreadable folder below them

    def on_error(err: OSError) -> None:
        unreadable[Path(err.filename)] = err.strerror or type(err).__name__

    for folder, dirs, names in os.walk(root, onerror=on_error):
        here = Path(folder)
        if any(n.startswith(".") for n in (*dirs, *names)):
            has_content.update((here / "_").parents)  # hidden files are no inputs, but the folder is not empty
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and kept(here / d))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = here / name
            if path.is_file() and kept(path):
                result.files.append(path)
            elif path.is_symlink() and not path.exists():
                result.problems.append(Skipped(path, "broken symbolic link: its target does not exist"))
            else:
                continue  # sockets, FIFOs and other special files are no inputs
            has_content.update(path.parents)
    for folder, reason in sorted(unreadable.items()):
        what = "input folder" if folder == root else "folder"
        result.problems.append(Skipped(folder, f"cannot read the {what}: {reason}"))
        has_content.update(folder.parents)
        has_content.add(folder)
    result.files.sort()
    candidates = sorted(d for d in _visible_folders(root, kept) if d not in has_content)
    empty = set(candidates)
    result.empty_folders = [d for d in candidates if d.parent not in empty]
    return result


def _visible_folders(root: Path, kept) -> list[Path]:
    folders = []
    for folder, dirs, _ in os.walk(root, onerror=lambda err: None):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and kept(here / d)]
        folders.extend(here / d for d in dirs if not (here / d).is_symlink())
    return folders


def _split_copies(members: list[tuple[Path, pydicom.Dataset]]) -> list[list[tuple[Path, pydicom.Dataset]]]:
    """One group per series, except when copies of the same series lie in several folders (the same
    SOPInstanceUID more than once): then each folder is a case of its own."""
    sop_uids = [str(h.get("SOPInstanceUID", "")) for _, h in members]
    has_copies = len(set(sop_uids)) < len(sop_uids) and all(sop_uids)
    folders: dict[Path, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path, header in members:
        folders[path.parent].append((path, header))
    return list(folders.values()) if has_copies and len(folders) > 1 else [members]


def check_series_geometry(headers: list[pydicom.Dataset], tolerance: float = 0.1) -> str | None:
    """Why the slices of one series cannot form a volume, or None when they can.

    Args:
        headers: one dataset per file of the series (headers only are needed).
        tolerance: relative tolerance on slice gaps (0.1 = 10 %).
    """
    if len(headers) < MIN_SLICES:
        what = "single slice" if len(headers) == 1 else f"only {len(headers)} slices"
        return f"{what}: not a volume (at least {MIN_SLICES} slices are needed)"
    sop_uids = [str(h.get("SOPInstanceUID", "")) for h in headers]
    if all(sop_uids) and len(set(sop_uids)) < len(sop_uids):
        return "the same image (SOPInstanceUID) more than once"
    if any("ImagePositionPatient" not in h or "ImageOrientationPatient" not in h for h in headers):
        return "slices without ImagePositionPatient / ImageOrientationPatient: the geometry is unknown"
    if len({(int(h.get("Rows", 0)), int(h.get("Columns", 0))) for h in headers}) > 1:
        return "inconsistent matrix size between slices"
    photometric = _photometric_problem(headers)
    if photometric:
        return photometric
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        return f"inconsistent orientation: {distinct} different ImageOrientationPatient values"
    normal = _slice_normal(headers[0])
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = np.argsort(along)
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    duplicates = int((gaps < 1e-3).sum())
    if duplicates:
        return f"duplicate slice positions: {duplicates + 1} slices share a position along the slice normal"
    problems = []
    tilt = _tilt_degrees(positions, normal)
    declared_tilt = max(abs(float(h.get("GantryDetectorTilt", 0) or 0)) for h in headers)
    if tilt > 0.5:
        problems.append(f"gantry tilt of {tilt:.1f}°: the slices are not stacked along their normal")
    elif declared_tilt > 0.5:
        problems.append(f"gantry tilt of {declared_tilt:.1f}° (GantryDetectorTilt)")
    spacing = float(np.median(gaps))
    ratios = gaps / spacing
    if np.abs(ratios - 1).max() > tolerance:
        worst = int(np.argmax(np.abs(ratios - 1)))
        multiple = round(ratios[worst])
        if multiple >= 2 and abs(ratios[worst] - multiple) < tolerance:
            problems.append(
                f"missing slice(s): a gap of {gaps[worst]:.2f} mm between slices {worst + 1} and {worst + 2} "
                f"where the spacing is {spacing:.2f} mm"
            )
        else:
            problems.append(f"non-uniform slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm")
    return "; ".join(problems) or None


def _photometric_problem(headers: list[pydicom.Dataset]) -> str | None:
    """A series whose slices mix MONOCHROME1 (low values bright) and MONOCHROME2, or that is not grayscale."""
    kinds = [str(h.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() or "MONOCHROME2" for h in headers]
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    if len(counts) > 1:
        listed = ", ".join(f"{n} {k}" for k, n in counts.items())
        return (
            f"mixed PhotometricInterpretation between slices ({listed}): their intensities are inverted to each other"
        )
    if kinds[0] not in ("MONOCHROME1", "MONOCHROME2") or any(int(h.get("SamplesPerPixel") or 1) != 1 for h in headers):
        return f"PhotometricInterpretation {kinds[0]}: not a grayscale image"
    return None


def _tilt_degrees(positions: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the line through the slice origins and the slice normal."""
    direction = positions[-1] - positions[0]
    length = float(np.linalg.norm(direction))
    if length == 0:
        return 0.0
    cosine = abs(float(direction @ normal)) / length
    return math.degrees(math.acos(min(1.0, cosine)))


def _read_header(path: Path) -> pydicom.Dataset | str:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "not an image or DICOM file"
    except Exception as err:  # truncated or corrupt files raise many types
        return f"unreadable DICOM file ({type(err).__name__}: {err})"


def _slice_normal(header: pydicom.Dataset) -> np.ndarray:
    orientation = [float(v) for v in header.ImageOrientationPatient]
    return np.cross(orientation[:3], orientation[3:])


def _positions_along_normal(headers: list[pydicom.Dataset]) -> np.ndarray:
    """Each slice's ImagePositionPatient projected on the series' slice normal (one normal: the first slice's)."""
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    return positions @ _slice_normal(headers[0])


def _common_folder(paths: Iterable[Path]) -> Path:
    parents = [p.parent for p in paths]
    common = parents[0]
    while any(common not in (p, *p.parents) for p in parents):
        common = common.parent
    return common


def _series_name(folder: Path, header: pydicom.Dataset) -> str:
    """``<folder>_s<SeriesNumber>_<SeriesDescription>``, the description's characters other than letters, digits,
    ``-`` and ``_`` as ``_``, and at most :data:`DESCRIPTION_BYTES` of it."""
    number = header.get("SeriesNumber")
    description = str(header.get("SeriesDescription", "")).strip()
    parts = [folder.name or "series"]
    if number is not None and str(number) != "":
        parts.append(f"s{number}")
    if description:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in description)
        parts.append(safe.encode()[:DESCRIPTION_BYTES].decode("utf-8", "ignore"))  # outputs' names stay short
    return "_".join(parts)


def _short_name(name: str) -> str:
    """``name`` if it fits :data:`NAME_BYTES`, else its start and a digest of the whole (still distinct)."""
    encoded = os.fsencode(name)
    if len(encoded) <= NAME_BYTES:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:12]
    return f"{encoded[: NAME_BYTES - 13].decode('utf-8', 'ignore')}_{digest}"


def _unique_names(cases: list[Case]) -> list[Case]:
    """Give every case a distinct name (``name``, ``name_2``, ...) in a stable order."""
    seen: dict[str, int] = defaultdict(int)
    for case in sorted(cases, key=lambda c: (str(c.path), c.series_uid or "")):
        case.name = _short_name(case.name)
        seen[case.name] += 1
        if seen[case.name] > 1:
            case.name = f"{case.name}_{seen[case.name]}"
    return sorted(cases, key=lambda c: c.name)
