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
) -> list[Path]:
    """Write ``pixels`` ``(slices, rows, columns)`` (int16) as an MR DICOM series; return the files.

    ``row_dir`` / ``col_dir`` are ImageOrientationPatient's two direction cosines (LPS), ``spacing`` is (row spacing,
    column spacing, slice gap) in mm; slice k lies at ``origin + k * gap * (row_dir × col_dir)``. File names are
    shuffled against the slice order, so readers must sort by position.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_dir, col_dir)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    order = np.random.default_rng(series_number).permutation(len(pixels))
    files = []
    for k, plane in enumerate(pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", "MR", "test"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, f"phantom {series_number}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [f"{spacing[0]}", f"{spacing[1]}"]
        ds.SliceThickness = f"{spacing[2]}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(plane, dtype=np.int16).tobytes()
        path = folder / f"{prefix}img{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def expected_threshold_labels(data: np.ndarray) -> np.ndarray:
    """What :class:`ThresholdNet` gives after the bundle's MR intensity preset, for a whole volume ``data``."""
    from ic_moe_monai.transforms import IntensityPresetd

    image = torch.from_numpy(np.asarray(data, dtype=np.float32)[None])
    scaled = np.asarray(IntensityPresetd("image", modality="mr")({"image": image})["image"])[0]
    return np.digitize(scaled, [1 / 3, 2 / 3]).astype(np.uint8)


def threshold_bundle_config(folder: Path, img_size: int) -> Path:
    """A config file that turns the bundle into the :class:`ThresholdNet` bundle (weights saved beside it), whose
    labelmap of any volume is known voxel by voxel (:func:`expected_threshold_labels`): no component cleaning."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ThresholdNet().state_dict(), folder / "threshold.pt")
    config = {"network_def": {"_target_": "tests.helpers.ThresholdNet"}, "img_size": img_size,
              "ckpt_path": str(folder / "threshold.pt"), "keep_largest_component": False}  # fmt: skip
    (folder / "threshold.json").write_text(json.dumps(config))
    return folder / "threshold.json"


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = rotation("z", 20) @ rotation("x", 15)
