"""Deterministic stand-in networks and small data builders for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"


class ThresholdNet(nn.Module):
    """Classifies each pixel by the middle channel's intensity: < 1/3 → 0, < 2/3 → 1, else 2.

    Pixel-wise and size-agnostic, so the expected labelmap of any volume is known exactly.
    """

    def __init__(self, num_classes: int = 2, **_: object) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(1 / 6, 5 / 6, num_classes + 1).view(1, -1, 1, 1))
        self.scale = nn.Parameter(torch.tensor(100.0))  # one parameter, so checkpoints and optimisers work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x[:, 1:2] - self.centres).abs() * self.scale


def make_msd_folder(hippocampus_dir: Path, target: Path, count: int) -> Path:
    """An MSD-style task folder with the first ``count`` real hippocampus cases."""
    manifest = json.loads((hippocampus_dir / "dataset.json").read_text())
    entries = manifest["training"][:count]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for key in ("image", "label"):
            shutil.copy(hippocampus_dir / entry[key], target / entry[key])
    manifest["training"] = entries
    manifest["numTraining"] = count
    (target / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return target


def write_dicom_series(
    folder: Path,
    pixels: np.ndarray,
    row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_dir: tuple[float, float, float] = (0.0, 1.0, 0.0),
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.0),
    origin: tuple[float, float, float] = (-10.0, 20.0, 5.0),
    series_number: int = 1,
    study_uid: str | None = None,
    prefix: str = "",
    modality: str = "MR",
) -> list[Path]:
    """Write ``pixels`` ``(slices, rows, columns)`` (int16) as an MR (or ``modality="CT"``: CT, in HU) DICOM series;
    return the files.

    ``row_dir`` / ``col_dir`` are ImageOrientationPatient's two direction cosines (LPS), ``spacing`` is (row spacing,
    column spacing, slice gap) in mm; slice k lies at ``origin + k * gap * (row_dir × col_dir)``. File names are
    shuffled against the slice order, so readers must sort by position.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    storage = CTImageStorage if modality == "CT" else MRImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_dir, col_dir)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    order = np.random.default_rng(series_number).permutation(len(pixels))
    files = []
    for k, plane in enumerate(pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = storage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", modality, "test"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, f"phantom {series_number}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [f"{spacing[0]}", f"{spacing[1]}"]
        ds.SliceThickness = f"{spacing[2]}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(plane, dtype=np.int16).tobytes()
        path = folder / f"{prefix}img{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def expected_threshold_labels(data: np.ndarray) -> np.ndarray:
    """What :class:`ThresholdNet` gives after the bundle's MR intensity preset, for a whole volume ``data``."""
    from ic_moe_monai.data.transforms import IntensityPresetd

    image = torch.from_numpy(np.asarray(data, dtype=np.float32)[None])
    scaled = np.asarray(IntensityPresetd("image", modality="mr")({"image": image})["image"])[0]
    return np.digitize(scaled, [1 / 3, 2 / 3]).astype(np.uint8)


def threshold_bundle_config(folder: Path, img_size: int) -> Path:
    """A config file that turns the bundle into the :class:`ThresholdNet` bundle (weights saved beside it), whose
    labelmap of any volume is known voxel by voxel (:func:`expected_threshold_labels`): no component cleaning."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ThresholdNet().state_dict(), folder / "threshold.pt")
    # no quality calibration: the shipped one belongs to the shipped model
    config = {"network_def": {"_target_": "tests.helpers.ThresholdNet"}, "img_size": img_size,
              "ckpt_path": str(folder / "threshold.pt"), "keep_largest_component": False,
              "quality_calibration": None}  # fmt: skip
    (folder / "threshold.json").write_text(json.dumps(config))
    return folder / "threshold.json"


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = rotation("z", 20) @ rotation("x", 15)


CT_LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}


def synthetic_ct(shape: tuple[int, int, int] = (48, 48, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small abdominal CT phantom in HU (int16) and its labels (uint8, :data:`CT_LABELS`), axes (x, y, z).

    Air around an elliptic body of soft tissue (40 HU) holding a liver (label 1, 60 HU) on one side, a spleen
    (label 2, 45 HU) on the other and a kidney (label 3, 150 HU) behind; sizes and positions vary with ``seed``.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy, cz = shape[0] / 2, shape[1] / 2, shape[2] / 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.38 * shape[1])) ** 2 <= 1
    image[body] = 40.0

    def organ(centre, radii, label, hu):
        c = [a + rng.uniform(-1.5, 1.5) for a in centre]
        r = [a * rng.uniform(0.85, 1.15) for a in radii]
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip((x, y, z), c, r, strict=True)) <= 1
        image[inside & body] = hu
        labels[inside & body] = label

    organ((cx - 0.22 * shape[0], cy - 0.05 * shape[1], cz), (0.17 * shape[0], 0.2 * shape[1], 0.45 * shape[2]), 1, 60)
    organ((cx + 0.25 * shape[0], cy - 0.05 * shape[1], cz), (0.09 * shape[0], 0.1 * shape[1], 0.35 * shape[2]), 2, 45)
    organ((cx + 0.08 * shape[0], cy + 0.2 * shape[1], cz), (0.07 * shape[0], 0.08 * shape[1], 0.3 * shape[2]), 3, 150)
    image += rng.normal(0, 8, shape).astype(np.float32)
    return np.round(image).astype(np.int16), labels


def make_ct_task(target: Path, count: int = 5, shape: tuple[int, int, int] = (48, 48, 12)) -> Path:
    """An MSD-style CT task folder (dataset.json with labels and modality, imagesTr, labelsTr, imagesTs) of
    :func:`synthetic_ct` phantoms, 3 × 3 × 5 mm voxels, RAS affine."""
    import nibabel as nib

    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    training = []
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count + 1):
        image, labels = synthetic_ct(shape, seed=i)
        name = f"phantom_{i:03d}.nii.gz"
        if i == count:  # one test case
            nib.save(nib.Nifti1Image(image, affine), target / "imagesTs" / name)
            break
        nib.save(nib.Nifti1Image(image, affine), target / "imagesTr" / name)
        nib.save(nib.Nifti1Image(labels, affine), target / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "AbdomenPhantom",
        "description": "Synthetic abdominal CT phantoms",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in CT_LABELS.items()},
        "numTraining": count,
        "training": training,
        "test": [f"./imagesTs/phantom_{count:03d}.nii.gz"],
    }
    (target / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return target
