"""``segment`` geometry round trips with a pixel-wise threshold network, so the expected labels are known exactly.

NIfTI (RAS, LPS) and DICOM series (axial, oblique, sagittal, two series in one folder, shuffled file names): the
NIfTI output is checked voxel by voxel through each source image's own position and orientation, and the DICOM SEG
is read back with highdicom and compared frame by frame with the source images it references.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from ic_moe_monai.io import discover_cases
from ic_moe_monai.io.dicom_seg import labels_to_dicom_frames
from ic_moe_monai.segment import segment

from .helpers import BUNDLE, OBLIQUE, expected_threshold_labels, rotation, threshold_bundle_config, write_dicom_series

SIZE = 16  # rows = columns = slices, the network's img_size: no in-plane resize, so the answer is exact


SERIES = {  # name: (row direction, column direction) as ImageOrientationPatient (LPS)
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "oblique": (tuple(OBLIQUE[:, 0]), tuple(OBLIQUE[:, 1])),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@pytest.fixture(scope="module")
def threshold_config(tmp_path_factory):
    return str(threshold_bundle_config(tmp_path_factory.mktemp("threshold"), img_size=SIZE))


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory):
    """One folder per orientation, plus two interleaved series in one folder; pixel arrays kept for reference."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(7)
    pixels = {}
    for number, (name, (row_dir, col_dir)) in enumerate(SERIES.items(), start=1):
        pixels[name] = rng.integers(0, 1000, (SIZE, SIZE, SIZE)).astype(np.int16)
        write_dicom_series(root / name, pixels[name], row_dir, col_dir, series_number=number)
    for number, name in ((11, "mixed_a"), (12, "mixed_b")):  # two series of one study in one folder
        pixels[name] = rng.integers(0, 1000, (SIZE, SIZE, SIZE)).astype(np.int16)
        write_dicom_series(root / "mixed", pixels[name], *SERIES["axial"], series_number=number, prefix=name)
    return root, pixels


def _source_images(folder, series_number):
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    return [d for d in datasets if int(d.SeriesNumber) == series_number]


def _world_to_voxel(nifti, ds):
    """Voxel indices ``(rows, columns, 3)`` in the NIfTI of every pixel of a DICOM image (via its own geometry)."""
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    lps = position + cols[..., None] * col_spacing * orientation[:3] + rows[..., None] * row_spacing * orientation[3:]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    index = (np.linalg.inv(nifti.affine) @ np.concatenate([ras, np.ones((*ras.shape[:2], 1))], -1)[..., None])[..., 0]
    return index[..., :3]


def test_dicom_series_round_trip(tmp_path, dicom_studies, threshold_config):
    root, _ = dicom_studies
    report = segment(str(root), str(tmp_path), bundle=str(BUNDLE), config=threshold_config,
                     formats="nifti,dicom_seg", quiet=True)  # fmt: skip
    assert report.exit_code == 0, report
    assert len(report.cases) == 6 and all(c.status == "done" for c in report.cases)
    names = {c.name for c in report.cases}
    assert len(names) == 6  # two series of one folder get distinct names
    by_series = {}
    for case in report.cases:
        seg = pydicom.dcmread(case.outputs["dicom_seg"], stop_before_pixels=True)
        by_series[int(seg.SeriesNumber) - 1000] = case  # the SEG's series number is the source's + 1000
    folders = {1: "axial", 2: "oblique", 3: "sagittal", 4: "coronal", 11: "mixed", 12: "mixed"}
    label_names = ["anterior", "posterior"]  # the bundle's channel_def
    assert sorted(by_series) == sorted(folders)
    for number, case in sorted(by_series.items()):
        sources = _source_images(root / folders[number], number)  # in file-name order, not slice order
        assert len(sources) == SIZE
        stack = np.stack([d.pixel_array for d in sources]).astype(np.float32)
        expected = expected_threshold_labels(stack)  # (images, rows, columns); the preset is order-invariant
        # NIfTI: each source pixel's world position lands exactly on a voxel holding the pixel's label
        nifti = nib.load(case.outputs["nifti"])
        data = np.asarray(nifti.dataobj)
        assert data.shape == (SIZE, SIZE, SIZE) and nifti.get_data_dtype() == np.uint8
        for ds, frame in zip(sources, expected, strict=True):
            index = _world_to_voxel(nifti, ds)
            np.testing.assert_allclose(index, np.rint(index), atol=1e-3)
            i, j, k = np.rint(index).astype(int).transpose(2, 0, 1)
            np.testing.assert_array_equal(data[i, j, k], frame, err_msg=f"{case.name}: NIfTI voxels")
        # DICOM SEG: references the source series, one segment per label, frame by frame equal to the expectation
        seg = hd.seg.segread(case.outputs["dicom_seg"])
        assert seg.get_source_image_uids()[0][1] == sources[0].SeriesInstanceUID
        assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == label_names
        uids = [d.SOPInstanceUID for d in sources]
        frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
        np.testing.assert_array_equal(frames, expected, err_msg=f"{case.name}: SEG frames")


def test_nifti_round_trip_ras_and_lps(tmp_path, threshold_config):
    rng = np.random.default_rng(3)
    affines = {"ras": np.diag([0.9, 1.1, 2.0, 1.0]), "lps": np.diag([-0.8, -0.8, 2.5, 1.0])}
    affines["lps"][:3, 3] = (40.0, -12.0, 7.5)
    data = {}
    for name, affine in affines.items():
        data[name] = rng.random((SIZE, SIZE, SIZE)).astype(np.float32) * 500
        nib.save(nib.Nifti1Image(data[name], affine), tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    report = segment(str(tmp_path), str(out), bundle=str(BUNDLE), config=threshold_config, quiet=True)
    assert report.exit_code == 0 and len(report.cases) == 2
    again = segment(str(tmp_path), str(out), bundle=str(BUNDLE), config=threshold_config, quiet=True)
    assert [c.status for c in again.cases] == ["skipped (exists)"] * 2  # the outputs inside the input are not inputs
    for name, affine in affines.items():
        result = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_allclose(result.affine, affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(result.dataobj), expected_threshold_labels(data[name]))


def test_labels_to_dicom_frames_rejects_foreign_geometry(dicom_studies):
    root, _ = dicom_studies
    headers = _source_images(root / "axial", 1)
    affine = np.diag([-0.9, -0.8, 2.0, 1.0])  # the series' grid seen from ITK (LPS → RAS): column, row, slice
    affine[:3, 3] = (10.0, -20.0, 5.0)
    labels = np.zeros((SIZE, SIZE, SIZE), np.uint8)
    assert labels_to_dicom_frames(labels, affine, headers).shape == (SIZE, SIZE, SIZE)
    shifted = affine.copy()
    shifted[2, 3] += 1.0  # half a slice off
    with pytest.raises(ValueError, match="not on a slice"):
        labels_to_dicom_frames(labels, shifted, headers)
    rotated = affine.copy()
    rotated[:3, :3] = rotation("z", 10) @ affine[:3, :3]
    with pytest.raises(ValueError, match="orientation"):
        labels_to_dicom_frames(labels, rotated, headers)


@pytest.mark.slow
def test_shared_dicom_collection_seg_overlays_the_labelmap(tmp_path, shared_data, threshold_config):
    """Every real series that discovery accepts is segmented (compressed ones included); the DICOM SEG of each,
    read back, equals the NIfTI labelmap at every source pixel's world position (oblique and sagittal included)."""
    report = segment(str(shared_data / "dicom"), str(tmp_path), bundle=str(BUNDLE), config=threshold_config,
                     formats="nifti,dicom_seg", quiet=True)  # fmt: skip
    assert report.exit_code == 1  # the collection holds rejected series
    dicom = [c for c in report.cases if not c.source.endswith((".nii", ".nii.gz"))]  # NIfTI files lie there too
    series, _ = discover_cases(shared_data / "dicom")
    assert len(dicom) == sum(c.kind == "dicom" for c in series) >= 12
    assert all(c.status == "done" for c in report.cases), [c.error for c in report.cases]
    NO_FRAME = "FrameOfReferenceUID"  # noqa: N806
    no_seg = {c.source.split("dicom/", 1)[1]: c.notes for c in dicom if "dicom_seg" not in c.outputs}
    assert no_seg == {  # sources without the UIDs a SEG must reference
        "totalseg_ct_jp2k_with_seg/series": [
            "no DICOM SEG: the source series has no StudyInstanceUID / SeriesInstanceUID to reference"
        ],
        **{f"dicom2nifti_edge_cases/mr_{kind}": [f"no DICOM SEG: the source series has no {NO_FRAME} to reference"]
           for kind in ("jpeg2000", "jpeg_lossless", "jpegls", "rle")},
    }  # fmt: skip
    for case in dicom:
        if "dicom_seg" not in case.outputs:
            continue
        nifti = nib.load(case.outputs["nifti"])
        data = np.asarray(nifti.dataobj)
        seg = hd.seg.segread(case.outputs["dicom_seg"])
        series_uid = seg.get_source_image_uids()[0][1]
        sources = [d for d in map(pydicom.dcmread, sorted(Path(case.source).rglob("*"))) if
                   d.get("SeriesInstanceUID") == series_uid]  # fmt: skip
        frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], combine_segments=True)
        for ds, frame in zip(sources, frames, strict=True):
            index = _world_to_voxel(nifti, ds)
            np.testing.assert_allclose(index, np.rint(index), atol=0.05, err_msg=case.name)
            i, j, k = np.rint(index).astype(int).transpose(2, 0, 1)
            np.testing.assert_array_equal(data[i, j, k], frame, err_msg=case.name)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage_inputs(tmp_path, threshold_config, suffix):
    """NRRD and MetaImage (one file, or header + .raw) with a non-trivial direction: labels and geometry kept."""
    import itk

    rng = np.random.default_rng(11)
    data = rng.integers(0, 1000, (SIZE, SIZE, SIZE)).astype(np.int16)  # ITK order: (z, y, x)
    image = itk.image_from_array(data)
    image.SetSpacing([0.7, 0.9, 2.0])
    image.SetOrigin([5.0, -3.0, 12.0])
    image.SetDirection(itk.matrix_from_array(OBLIQUE))
    studies = tmp_path / "studies"
    studies.mkdir()
    itk.imwrite(image, str(studies / f"volume{suffix}"))
    report = segment(str(studies), str(tmp_path / "out"), bundle=str(BUNDLE), config=threshold_config, quiet=True)
    assert report.exit_code == 0 and [c.name for c in report.cases] == ["volume"]
    out = nib.load(tmp_path / "out" / "volume.nii.gz")
    expected_affine = np.eye(4)
    expected_affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ OBLIQUE @ np.diag([0.7, 0.9, 2.0])  # LPS → RAS
    expected_affine[:3, 3] = np.array([-5.0, 3.0, 12.0])
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected_threshold_labels(data.transpose(2, 1, 0)))
