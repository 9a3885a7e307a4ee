"""Read a DICOM series into a volume with pydicom, in the geometry ITK gives the series.

ITK cannot open paths that are not valid UTF-8 and reports broken files with messages that name neither the file
nor the problem; pydicom reads any path and its errors are caught here per file. The result is what MONAI's
``ITKReader`` gives for the same sorted series: a float32 ``(X, Y, Z)`` array (X along a row, Y down the columns,
Z along the slice normal), the first file's position as origin, the first file's orientation, the in-plane
spacing of ``PixelSpacing`` and the slice spacing of the distance from the first to the last slice over the gaps.
Intensities are ``stored * RescaleSlope + RescaleIntercept`` of each file; a MONOCHROME1 series (low values shown
bright) is inverted to MONOCHROME2 semantics after rescale, as viewers display it: ``v' = min + max - v`` over the
series, so the values keep their range.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor

from ic_moe_monai.io.discovery import _common_folder, _positions_along_normal
from ic_moe_monai.io.guards import ImageError, _one_line, check_dicom_series

__all__ = ["LPS_TO_RAS", "dicom_series_affine", "read_dicom_series"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_dicom_series(files: Sequence[str | Path], max_bytes: int | str | None = None) -> MetaTensor:
    """The series as a float32 MetaTensor ``(X, Y, Z)`` with its RAS affine and ``ITKReader``'s meta keys.

    Args:
        files: the series' single-frame image files (any order: they are sorted along the slice normal).
        max_bytes: size limit of the volume as float32 (see :func:`ic_moe_monai.io.guards.max_image_bytes`),
            checked from the headers before any pixel is read.

    Raises:
        ImageError: naming the file, for a file without pixel data or with truncated or undecodable pixel data,
            multi-frame or colour files, mixed MONOCHROME1 / MONOCHROME2 slices, or a series over the size limit.
    """
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise ImageError(f"a DICOM series needs at least 2 files, got {len(paths)}.")
    check_dicom_series(paths, max_bytes)
    datasets = [_read_file(p) for p in paths]
    order = np.argsort(_positions_along_normal(datasets), kind="stable")
    datasets, paths = [datasets[i] for i in order], [paths[i] for i in order]
    volume = np.empty((int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)), dtype=np.float32)
    for k, (path, ds) in enumerate(zip(paths, datasets, strict=True)):
        volume[:, :, k] = _slice_values(path, ds).T  # (rows, columns) -> (X = columns, Y = rows)
    _to_monochrome2(paths, datasets, volume)
    affine = dicom_series_affine(datasets)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta = {
        "spacing": spacing,
        "original_affine": affine.copy(),
        "affine": affine.copy(),
        "space": "RAS",
        "spatial_shape": np.asarray(volume.shape),
        "original_channel_dim": "no_channel",
        "filename_or_obj": str(_common_folder(paths)),
    }
    return MetaTensor(torch.from_numpy(volume), meta=meta)


def dicom_series_affine(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The RAS voxel-to-world matrix of a series sorted along its slice normal, as ITK computes it."""
    first, last = datasets[0], datasets[-1]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.array([float(v) for v in first.ImagePositionPatient], dtype=np.float64)
    end = np.array([float(v) for v in last.ImagePositionPatient], dtype=np.float64)
    slice_spacing = float(np.linalg.norm(end - origin)) / max(len(datasets) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * col_spacing, col_dir * row_spacing, normal * slice_spacing
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _read_file(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # truncated or corrupt files raise many types
        raise ImageError(f"{path}: unreadable DICOM file ({_one_line(err)}).") from err
    if "PixelData" not in ds:
        raise ImageError(f"{path}: the DICOM file has no pixel data.")
    missing = [k for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if k not in ds]  # fmt: skip
    if missing:
        raise ImageError(f"{path}: the DICOM image has no {' / '.join(missing)}.")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise ImageError(f"{path}: a multi-frame DICOM file; a series of single-frame images is needed.")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ImageError(f"{path}: {ds.SamplesPerPixel} samples per pixel (colour); a grayscale series is needed.")
    return ds


def _slice_values(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """One file's pixels after its own rescale, ``(rows, columns)`` float64."""
    expected = _native_length(ds)
    if expected is not None and len(ds.PixelData) < expected:
        raise ImageError(
            f"{path}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes for "
            f"{ds.Rows}×{ds.Columns} pixels of {ds.BitsAllocated} bits)."
        )
    try:
        stored = ds.pixel_array
    except Exception as err:  # decoders raise many types
        raise ImageError(f"{path}: cannot decode the pixel data ({_one_line(err)}).") from err
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise ImageError(f"{path}: pixel data of shape {stored.shape}, not Rows × Columns {ds.Rows}×{ds.Columns}.")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float64) * slope + intercept


def _native_length(ds: pydicom.Dataset) -> int | None:
    """Bytes an uncompressed (native) PixelData must hold, or None for encapsulated (compressed) data."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return None
    bits = int(ds.get("BitsAllocated") or 16)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    return (pixels * bits + 7) // 8


def _to_monochrome2(paths: Sequence[Path], datasets: Sequence[pydicom.Dataset], volume: np.ndarray) -> None:
    """Invert a MONOCHROME1 series in place (after rescale); refuse a series mixing both interpretations."""
    kinds = [str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() for ds in datasets]
    if len(set(kinds)) > 1:
        first = kinds[0]
        other = next(i for i, k in enumerate(kinds) if k != first)
        raise ImageError(
            f"{paths[other]}: PhotometricInterpretation {kinds[other]} where {paths[0].name} has {first}: "
            "a series must not mix them."
        )
    if kinds[0] == "MONOCHROME1":
        low, high = float(volume.min()), float(volume.max())
        np.subtract(low + high, volume, out=volume)
    elif kinds[0] != "MONOCHROME2":
        raise ImageError(f"{paths[0]}: PhotometricInterpretation {kinds[0]}; a grayscale series is needed.")
