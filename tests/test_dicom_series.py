"""DICOM series read with pydicom: the same array, affine and meta as ITK gives, plus what ITK gets wrong."""

from __future__ import annotations

import os
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
from monai.data import ITKReader

from ic_moe_monai.io import ImageError, discover_cases, read_dicom_series

from .helpers import OBLIQUE, write_dicom_series

ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "oblique": (tuple(OBLIQUE[:, 0]), tuple(OBLIQUE[:, 1])),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def _itk(files):
    array, meta = ITKReader().get_data(itk.imread([str(f) for f in files]))
    return np.asarray(array, dtype=np.float32), meta


def _assert_like_itk(files):
    expected, meta = _itk(files)
    ours = read_dicom_series(files)
    assert tuple(ours.shape) == expected.shape
    np.testing.assert_array_equal(ours.numpy(), expected)
    np.testing.assert_allclose(ours.affine.numpy(), meta["affine"], atol=1e-4)
    np.testing.assert_allclose(ours.meta["spacing"], meta["spacing"], atol=1e-4)
    assert ours.dtype.is_floating_point and ours.meta["space"] == "RAS"
    assert list(ours.meta["spatial_shape"]) == list(meta["spatial_shape"])


def test_shared_series_match_itk(shared_data):
    """Every shared series that forms a volume: JPEG 2000, JPEG-LS, JPEG lossless, RLE, oblique, sagittal, CT."""
    cases, _ = discover_cases(shared_data / "dicom")
    series = [c for c in cases if c.kind == "dicom"]
    assert len(series) >= 12
    for case in series:
        _assert_like_itk(case.files)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_synthetic_orientations_match_itk(tmp_path, orientation):
    pixels = np.random.default_rng(5).integers(-1000, 3000, (7, 12, 10)).astype(np.int16)
    files = write_dicom_series(tmp_path, pixels, *ORIENTATIONS[orientation], spacing=(0.7, 0.9, 2.5))
    along = discover_cases(tmp_path)[0][0].files  # sorted along the normal, as load_case passes them
    _assert_like_itk(along)
    shuffled = read_dicom_series(files)  # the reader sorts by itself
    np.testing.assert_array_equal(shuffled.numpy(), read_dicom_series(along).numpy())


def test_rescale_is_applied_per_file(tmp_path):
    pixels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    files = write_dicom_series(tmp_path, pixels)
    for f in files:
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber) - 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{1 + k * 0.5}", f"{-100 * k}"
        ds.save_as(f)
    volume = read_dicom_series(files).numpy()
    for k in range(4):
        np.testing.assert_allclose(volume[:, :, k], pixels[k].T * (1 + k * 0.5) - 100 * k)


def _set_photometric(files, kinds):
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = kinds[int(ds.InstanceNumber) - 1]
        ds.save_as(f)


def test_monochrome1_is_inverted_to_monochrome2_and_a_mix_is_refused(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 200, (5, 8, 9)).astype(np.int16)
    plain = read_dicom_series(write_dicom_series(tmp_path / "m2", pixels)).numpy()
    inverted_files = write_dicom_series(tmp_path / "m1", pixels)
    _set_photometric(inverted_files, ["MONOCHROME1"] * 5)
    inverted = read_dicom_series(inverted_files).numpy()
    np.testing.assert_array_equal(inverted, plain.min() + plain.max() - plain)  # as a viewer shows it, same range
    assert inverted.min() == plain.min() and inverted.max() == plain.max()

    mixed = write_dicom_series(tmp_path / "mixed", pixels)
    _set_photometric(mixed, ["MONOCHROME1", "MONOCHROME2"] * 2 + ["MONOCHROME1"])
    with pytest.raises(ImageError, match=r"PhotometricInterpretation MONOCHROME2 where .* has MONOCHROME1"):
        read_dicom_series(sorted(mixed))
    _, skipped = discover_cases(tmp_path / "mixed")
    assert [s.reason for s in skipped] == [
        f"DICOM series {pydicom.dcmread(mixed[0]).SeriesInstanceUID} (5 files): mixed PhotometricInterpretation "
        "between slices (3 MONOCHROME1, 2 MONOCHROME2): their intensities are inverted to each other"
    ]


def test_files_without_or_with_truncated_pixel_data(tmp_path):
    files = write_dicom_series(tmp_path / "a", np.ones((3, 16, 16), dtype=np.int16))
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    with pytest.raises(ImageError, match=rf"^{files[1]}: the DICOM file has no pixel data\.$"):
        read_dicom_series(files)
    files = write_dicom_series(tmp_path / "b", np.ones((3, 16, 16), dtype=np.int16))
    files[2].write_bytes(files[2].read_bytes()[:-100])  # the file ends inside its pixel data
    with pytest.raises(ImageError, match=rf"^{files[2]}: truncated pixel data \(412 of 512 bytes"):
        read_dicom_series(files)


def test_non_utf8_path_reads(tmp_path):
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/s\xe9rie"))
    pixels = np.random.default_rng(3).integers(0, 100, (4, 6, 7)).astype(np.int16)
    files = write_dicom_series(folder, pixels, prefix="\udce9")
    volume = read_dicom_series(files)
    assert tuple(volume.shape) == (7, 6, 4)
    assert volume.meta["filename_or_obj"] == str(folder)
