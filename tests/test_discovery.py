"""Finding cases in folders of DICOM series and image files; every hard case is segmented or precisely rejected."""

from __future__ import annotations

import itertools
import shutil

import pytest

from ic_moe_monai.io import discover_cases

# every folder of the shared DICOM collection: a case (with its slice count) or the reason it is rejected
EXPECTED_CASES = {
    "tcia_btp_pgbm003_mr_study/11-T1post-18670": 22,
    "tcia_btp_pgbm003_mr_study/11_HCropVolume": 40,
    "tcia_btp_pgbm003_mr_study/26401-T1prereg-52906": 22,
    "tcia_btp_pgbm003_mr_study/36468-FLAIRreg-58706": 22,
    "tcia_btp_pgbm003_mr_study/37830-T2reg-78532": 22,
    "dicom2nifti_edge_cases/mr_jpeg2000": 4,
    "dicom2nifti_edge_cases/mr_jpeg_lossless": 4,
    "dicom2nifti_edge_cases/mr_jpegls": 4,
    "dicom2nifti_edge_cases/mr_rle": 4,
    "dcmqi_ct3slice_with_seg/series": 3,
    "dcmqa_mr_sagittal_epi/series": 63,
    "totalseg_ct_jp2k_with_seg/series": 20,
}
EXPECTED_REJECTIONS = {
    "dcmqi_ct3slice_with_seg/seg/liver.dcm": "DICOM SEG without an image volume",
    "dcmqi_ct3slice_with_seg/seg/partial_overlaps.dcm": "DICOM SEG without an image volume",
    "dcmqa_ct_ge_gantry_tilt_variable_spacing/series": "gantry tilt of 18.5°",
    "dicom2nifti_edge_cases/ct_gantry_tilt_siemens": "gantry tilt of 14.0°",
    "dicom2nifti_edge_cases/ct_missing_slice_ge": (
        "missing slice(s): a gap of 10.00 mm between slices 3 and 4 where the spacing is 5.00 mm"
    ),
    "dicom2nifti_edge_cases/ct_missing_slice_siemens": "missing slice(s): a gap of 1.50 mm",
    "dicom2nifti_edge_cases/ct_not_a_volume_same_position": "duplicate slice positions: 4 slices",
    "dicom2nifti_edge_cases/mr_mixed_orientations_one_folder": "inconsistent orientation: 2 different",
    "dicom2nifti_edge_cases/mr_only_two_slices": "only 2 slices: not a volume",
}


@pytest.fixture(scope="module")
def dicom_root(shared_data):
    return shared_data / "dicom"


def test_every_shared_series_is_a_case_or_rejected_with_its_reason(dicom_root):
    cases, skipped = discover_cases(dicom_root)
    dicom_cases = {str(c.path.relative_to(dicom_root)): c for c in cases if c.kind == "dicom"}
    # the two series mixed in one folder are split into two cases
    mixed = [c for c in cases if c.kind == "dicom" and c.path == dicom_root / "multiseries_one_folder" / "series"]
    assert sorted(len(c.files) for c in mixed) == [22, 40]
    assert {k: len(v.files) for k, v in dicom_cases.items() if "multiseries" not in k} == EXPECTED_CASES
    reasons = {str(s.path.relative_to(dicom_root)): s.reason for s in skipped}
    assert set(reasons) == set(EXPECTED_REJECTIONS)
    for where, reason in EXPECTED_REJECTIONS.items():
        assert reason in reasons[where], (where, reasons[where])
    assert "gantry tilt" in reasons["dicom2nifti_edge_cases/ct_missing_slice_siemens"]  # both problems named
    assert len({c.name for c in cases}) == len(cases)  # output names never collide


def test_files_are_sorted_along_the_slice_normal(dicom_root):
    import numpy as np
    import pydicom

    cases, _ = discover_cases(dicom_root / "dcmqa_mr_sagittal_epi")
    (case,) = cases
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [np.array([float(v) for v in h.ImagePositionPatient]) @ normal for h in headers]
    assert all(b > a for a, b in itertools.pairwise(along))


def test_bad_files_are_reported_not_fatal(tmp_path, dicom_root):
    series = tmp_path / "study" / "series"
    shutil.copytree(dicom_root / "dcmqi_ct3slice_with_seg" / "series", series)
    (tmp_path / "study" / "notes.bin").write_bytes(b"\x00\x01 not dicom at all")
    truncated = (series / "01.dcm").read_bytes()[:200]
    (tmp_path / "study" / "truncated.dcm").write_bytes(truncated)
    (tmp_path / "study" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "study" / "README.md").write_text("ignored")
    cases, skipped = discover_cases(tmp_path)
    assert [len(c.files) for c in cases] == [3]
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons["notes.bin"] == "not an image or DICOM file"
    assert "truncated.dcm" in reasons
    assert set(reasons) == {"notes.bin", "truncated.dcm"}


def test_empty_and_missing_inputs(tmp_path):
    assert discover_cases(tmp_path) == ([], [])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        discover_cases(tmp_path / "missing")


def test_image_files_and_single_file_input(tmp_path, hippocampus_dir):
    src = hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(src, tmp_path / "a" / "case.nii.gz")
    shutil.copy(src, tmp_path / "b" / "case.nii.gz")
    cases, _ = discover_cases(tmp_path)
    assert sorted(c.name for c in cases) == ["case", "case_2"]  # same file name in two folders: no collision
    cases, _ = discover_cases(tmp_path / "a" / "case.nii.gz")
    assert [(c.name, c.kind) for c in cases] == [("case", "image")]


@pytest.mark.parametrize("folder", ["mr_jpeg2000", "mr_jpeg_lossless", "mr_jpegls", "mr_rle"])
def test_compressed_transfer_syntaxes_decode_with_pydicom(dicom_root, folder):
    import numpy as np
    import pydicom

    files = sorted((dicom_root / "dicom2nifti_edge_cases" / folder).iterdir())
    pixels = [pydicom.dcmread(f).pixel_array for f in files]
    reference = [
        pydicom.dcmread(f).pixel_array for f in sorted((dicom_root / "dicom2nifti_edge_cases" / "mr_rle").iterdir())
    ]
    assert all(p.shape == (256, 256) for p in pixels)
    # the four folders hold the same images in different (lossless) encodings
    assert all(np.array_equal(a, b) for a, b in zip(pixels, reference, strict=True))


def _unreadable(monkeypatch, folders):
    """Make ``folders`` unreadable: by permissions, and (root reads anything) by refusing to list them."""
    import os

    real_scandir = os.scandir

    def scandir(path="."):
        if any(os.fspath(path) == os.fspath(f) for f in folders):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for folder in folders:
        folder.chmod(0)


def test_unreadable_folders_are_named_with_the_os_reason(tmp_path, monkeypatch, hippocampus_dir):
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "case.nii.gz").write_bytes(b"x")
    (root / "open").mkdir()
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz", root / "open" / "a.nii.gz")
    try:
        _unreadable(monkeypatch, [root / "locked"])
        cases, skipped = discover_cases(root)
    finally:
        (root / "locked").chmod(0o755)
    assert [c.name for c in cases] == ["a"]
    assert [(s.path, s.reason, s.failure) for s in skipped] == [
        (root / "locked", "cannot read the folder: Permission denied", True)
    ]  # not "empty folder"
    try:
        _unreadable(monkeypatch, [root])
        cases, skipped = discover_cases(root)
    finally:
        root.chmod(0o755)
    assert cases == [] and [(s.path, s.reason) for s in skipped] == [
        (root, "cannot read the input folder: Permission denied")
    ]


def test_broken_symlinks_are_listed_as_skipped(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (tmp_path / "study" / "gone.dcm").symlink_to("missing.dcm")
    cases, skipped = discover_cases(tmp_path)
    assert cases == []
    assert {(s.path.name, s.reason) for s in skipped} == {
        ("gone.dcm", "broken symbolic link: its target does not exist"),
        ("gone.nii.gz", "broken symbolic link: its target does not exist"),
    }


def test_mixed_photometric_interpretation_is_rejected(tmp_path, dicom_root):
    import pydicom

    series = tmp_path / "series"
    shutil.copytree(dicom_root / "dcmqi_ct3slice_with_seg" / "series", series)
    files = sorted(series.iterdir())

    def set_photometric(paths, value):
        for f in paths:
            ds = pydicom.dcmread(f)
            ds.PhotometricInterpretation = value
            ds.save_as(f)

    set_photometric(files[:1], "MONOCHROME1")
    cases, skipped = discover_cases(tmp_path)
    assert cases == [] and len(skipped) == 1
    assert "mixed PhotometricInterpretation between slices (1 MONOCHROME1, 2 MONOCHROME2)" in skipped[0].reason
    set_photometric(files[1:], "MONOCHROME1")  # a pure MONOCHROME1 series is a case (the reader inverts it)
    cases, skipped = discover_cases(tmp_path)
    assert len(cases) == 1 and skipped == []
