"""Outputs of batch segmentation: NIfTI labelmaps, DICOM SEG, label statistics and preview images.

Every writer goes through :func:`atomic_output`: the file is written under a hidden temporary name in the target
folder and renamed when complete, so an interrupted run never leaves a partial file under the final name. The
temporary name carries the writing run's id (host, process id, random token): :func:`remove_partial_outputs` removes
only the leftovers of runs that are gone, never those of a run still writing into the same folder.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ic_moe_monai.io.atomic import (
    PARTIAL_MARK,
    atomic_output,
    exclusive_lock,
    partial_name,
    remove_partial_outputs,
    run_id,
)
from ic_moe_monai.io.dicom_seg import (
    SegmentCode,
    labels_to_dicom_frames,
    named_labels,
    read_segment_codes,
    write_dicom_seg,
)

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

# Overlay colours of labels 1, 2, ... (RGB), repeated when there are more labels.
# Where the network is unsure (``uncertainty`` of at least UNSURE_FROM of 255: the top class has less than 87.5 % of
# the probability with 2 classes, 83 % with 3): a checkerboard of this colour over the labels, unlike any tissue.
UNSURE_COLOUR, UNSURE_FROM = (255, 255, 255), 64
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip


def write_nifti_labels(labels: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """A uint8 labelmap ``(X, Y, Z)`` with the RAS ``affine`` as NIfTI (sform and qform set, like MONAI's writer)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(image, tmp)


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
    uncertainty: np.ndarray | None = None,
) -> None:
    """A PNG with axial, coronal and sagittal slices through the labelled region, labels overlaid in colour.

    Views are in radiological convention (patient right on the image left, anterior and superior up), with the
    physical aspect ratio, each ``height`` pixels high, and a legend of the label names, followed by ``caption``
    (e.g. the quality score), in red with ``alert`` (a case flagged for review). ``uncertainty`` (``(X, Y, Z)``
    uint8 in the labels' geometry, 0 sure … 255 unsure, see ``BundleSegmenter.predict``) is drawn in
    :data:`UNSURE_COLOUR` where it reaches :data:`UNSURE_FROM`, the more opaque the more unsure: where a reviewer
    should look first.
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
    unsure = None if uncertainty is None else nib.orientations.apply_orientation(uncertainty, orientation)
    views = [  # (image rows, image columns), row/column spacings
        (lambda v: v[::-1, ::-1, centre[2]].T, spacing[1], spacing[0]),  # axial
        (lambda v: v[::-1, centre[1], ::-1].T, spacing[2], spacing[0]),  # coronal
        (lambda v: v[centre[0], ::-1, ::-1].T, spacing[2], spacing[1]),  # sagittal
    ]
    panels = [_overlay(cut(gray), cut(ras_labels), dr, dc, height, None if unsure is None else cut(unsure))
              for cut, dr, dc in views]  # fmt: skip
    legend = [(PALETTE[(v - 1) % len(PALETTE)], n) for v, n in sorted(label_names.items()) if v != 0]
    if unsure is not None:
        legend.append((UNSURE_COLOUR, "unsure"))
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


def _overlay(
    gray: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float, height: int, unsure: np.ndarray | None = None
) -> Image.Image:
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(PALETTE[(int(value) - 1) % len(PALETTE)], dtype=np.float32)
        mask = labels == value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
    if unsure is not None:
        checker = (np.indices(unsure.shape).sum(axis=0) % 2) == 0
        strength = 0.35 + 0.55 * unsure.astype(np.float32) / 255
        alpha = np.where((unsure >= UNSURE_FROM) & checker, strength, 0.0)[..., None]
        rgb = (1 - alpha) * rgb + alpha * np.array(UNSURE_COLOUR, dtype=np.float32)
    width = max(1, round(height * (gray.shape[1] * col_mm) / (gray.shape[0] * row_mm)))
    return Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
