"""DICOM SEG output: a labelmap written as a DICOM Segmentation (highdicom) referencing its source series."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ic_moe_monai.io.atomic import atomic_output

__all__ = [
    "GENERIC_CODE",
    "IMAGE_STORAGE_BY_MODALITY",
    "LPS_TO_RAS",
    "SOURCE_TYPE2_ATTRIBUTES",
    "SegmentCode",
    "labels_to_dicom_frames",
    "named_labels",
    "read_segment_codes",
    "write_dicom_seg",
]


# Type 2 attributes (required, may be empty) of the patient and study modules the SEG copies from its source.
SOURCE_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


IMAGE_STORAGE_BY_MODALITY = {"CT": pydicom.uid.CTImageStorage, "MR": pydicom.uid.MRImageStorage,
                             "PT": pydicom.uid.PositronEmissionTomographyImageStorage}  # fmt: skip


# LPS (DICOM) <-> RAS (NIfTI, MONAI) sign flip of the first two world axes.
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def named_labels(labels: np.ndarray, label_names: Mapping[int, str]) -> dict[int, str]:
    """``label_names`` plus ``"label <v>"`` for every value the labelmap holds that has no name, so that no output
    leaves a label out (e.g. a model trained for more labels than the names a bundle gives)."""
    present = np.flatnonzero(np.bincount(np.asarray(labels).ravel().astype(np.int64)))
    names = {int(k): str(v) for k, v in label_names.items()}
    names.update({int(v): f"label {int(v)}" for v in present if int(v) != 0 and int(v) not in names})
    return dict(sorted(names.items()))


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
