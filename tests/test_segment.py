"""``python -m ic_moe_monai segment``: bad inputs, statistics, previews, parts, resume after a kill, exit codes,
and a real run with the shipped weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ic_moe_monai.io import atomic, writers
from ic_moe_monai.segment import segment

from .conftest import REPO_ROOT
from .helpers import BUNDLE, expected_threshold_labels, threshold_bundle_config

SIZE = 16


@pytest.fixture(scope="module")
def threshold_config(tmp_path_factory):
    return str(threshold_bundle_config(tmp_path_factory.mktemp("threshold"), img_size=SIZE))


def _volume(path, seed=0, shape=(SIZE, SIZE, SIZE), affine=None):
    data = np.random.default_rng(seed).random(shape).astype(np.float32) * 400
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), path)
    return data


def _run(input, output, config, **kwargs):
    return segment(str(input), str(output), bundle=str(BUNDLE), config=config, quiet=True, **kwargs)


def test_bad_inputs_are_reported_and_the_run_goes_on(tmp_path, threshold_config):
    studies = tmp_path / "studies"
    studies.mkdir()
    _volume(studies / "good.nii.gz")
    nan = _volume(studies / "nan.nii.gz", seed=1)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), studies / "nan.nii.gz")
    inf = _volume(studies / "inf.nii.gz", seed=2)
    inf[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(inf, np.eye(4)), studies / "inf.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((SIZE, SIZE), np.float32), np.eye(4)), studies / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((SIZE, SIZE, SIZE, 3), np.float32), np.eye(4)), studies / "series4d.nii.gz")
    (studies / "truncated.nii.gz").write_bytes((studies / "good.nii.gz").read_bytes()[:300])
    (studies / "notes.bin").write_bytes(b"\x00\x01 not an image")
    (studies / "empty" / "deeper").mkdir(parents=True)
    report = _run(studies, tmp_path / "out", threshold_config)

    status = {c.name: c for c in report.cases}
    assert status["good"].status == "done"
    reasons = {
        "nan": "1 NaN or infinite voxel values",
        "inf": "1 NaN or infinite voxel values",
        "flat2d": "a 2D image",
        "series4d": "a 4D image",
        "truncated": "cannot read the image",
    }
    for name, reason in reasons.items():
        case = status[name]
        assert case.status == "failed" and reason in case.error, (name, case.error)
        assert f"{name}.nii.gz" in case.error and "\n" not in case.error  # one line, naming the file
        assert not (tmp_path / "out" / f"{name}.nii.gz").exists()
    skipped = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report.not_segmented}
    assert skipped["notes.bin"] == "not an image or DICOM file"
    assert skipped["empty"] == "empty folder: no files in it" and "deeper" not in skipped
    assert report.exit_code == 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["exit_code"] == 1 and {c["name"] for c in saved["cases"]} == {*reasons, "good"}
    assert saved["versions"]["monai"] and saved["device"].startswith("cpu")

    empty = tmp_path / "nothing"
    empty.mkdir()
    report = _run(empty, tmp_path / "out2", threshold_config)
    assert report.exit_code == 1 and report.not_segmented[0]["reason"] == "no image files or DICOM series found"


def test_statistics_and_preview(tmp_path, threshold_config, monkeypatch):
    from ic_moe_monai.segment import outputs as segment_outputs

    studies = tmp_path / "studies"
    studies.mkdir()
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])  # voxel volume 1.8 mm³
    data = _volume(studies / "case.nii.gz", affine=affine)
    drawn = []
    real_preview = segment_outputs.write_preview

    def recording_preview(image, labels, *args, uncertainty=None, **kwargs):
        drawn.append(uncertainty)
        return real_preview(image, labels, *args, uncertainty=uncertainty, **kwargs)

    monkeypatch.setattr(segment_outputs, "write_preview", recording_preview)
    report = _run(studies, tmp_path / "out", threshold_config, statistics=True, preview=True, num_workers=0)
    assert report.exit_code == 0
    assert len(drawn) == 1 and drawn[0].shape == data.shape and drawn[0].max() > 0  # where the network was unsure
    outputs = report.cases[0].outputs
    labels = expected_threshold_labels(data)
    stats = json.loads(Path(outputs["statistics_json"]).read_text())
    assert list(stats) == ["anterior", "posterior"]
    for value, name in ((1, "anterior"), (2, "posterior")):
        count = int((labels == value).sum())
        assert stats[name]["voxels"] == count
        assert stats[name]["volume_ml"] == pytest.approx(count * 0.8 * 0.9 * 2.5 / 1000, abs=1e-4)
        assert stats[name]["mean_intensity"] == pytest.approx(float(data[labels == value].mean()), rel=1e-4)
    rows = (tmp_path / "out" / "statistics.csv").read_text().splitlines()
    assert rows[0] == "case,label,name,voxels,volume_ml,mean_intensity" and rows[1].startswith("case,1,anterior,")
    assert Path(outputs["statistics_csv"]).read_text().splitlines() == rows
    preview = Image.open(outputs["preview"])
    assert preview.format == "PNG" and preview.height == 256 + 16 and preview.width > 3 * 100


def test_preview_is_radiological(tmp_path):
    """The patient's right (RAS +x) is drawn on the left of the axial view, superior up in the coronal view."""
    image = np.zeros((20, 20, 20), np.float32)
    names = {0: "background", 1: "right", 2: "top"}
    right = np.zeros((20, 20, 20), np.uint8)
    right[15:, 8:12, 8:12] = 1
    top = np.zeros((20, 20, 20), np.uint8)
    top[8:12, 8:12, 15:] = 2
    panels = []
    for name, labels, channel in (("right", right, 0), ("top", top, 1)):
        writers.write_preview(image, labels, np.eye(4), tmp_path / f"{name}.png", names, height=100)
        rgb = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(int)[:100]
        overlay = (rgb[..., channel] > 50) & (rgb[..., 2 - channel * 2] < 40)  # the label's colour (red, green)
        panels.append([overlay[:, 104 * i : 104 * i + 100] for i in range(3)])  # 100 × 100 views, 4 px apart
    axial = panels[0][0]
    assert axial[:, :50].sum() > 0 and axial[:, 50:].sum() == 0
    coronal = panels[1][1]
    assert coronal[:50].sum() > 0 and coronal[50:].sum() == 0


def test_parts_split_without_overlap(tmp_path, threshold_config, monkeypatch):
    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(5):
        _volume(studies / f"case{i}.nii.gz", seed=i, shape=(SIZE, SIZE, 3))
    names = []
    for part in (0, 1):
        report = _run(studies, tmp_path / "out", threshold_config, num_parts=2, part_id=part)
        names.append({c.name for c in report.cases})
        assert (tmp_path / "out" / f"report_part{part}.json").is_file()
    assert not names[0] & names[1] and names[0] | names[1] == {f"case{i}" for i in range(5)}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    report = _run(studies, tmp_path / "out3", threshold_config)
    assert {c.name for c in report.cases} == names[1]
    with pytest.raises(ValueError, match="part_id"):
        _run(studies, tmp_path / "out4", threshold_config, num_parts=2, part_id=2)
    with pytest.raises(ValueError, match="formats"):
        _run(studies, tmp_path / "out4", threshold_config, formats="nifti,png")


def test_interrupted_write_leaves_no_partial_file_and_resumes(tmp_path, threshold_config, monkeypatch):
    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(3):
        _volume(studies / f"case{i}.nii.gz", seed=i, shape=(SIZE, SIZE, 4))
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):  # the process dies while the second labelmap is being renamed
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(studies, tmp_path / "out", threshold_config)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz"]  # no partial file, no report yet
    (out / ".case1.nii.gz.partial.nii.gz").write_bytes(b"left by a killed run")
    report = _run(studies, out, threshold_config)
    assert [c.status for c in report.cases] == ["skipped (exists)", "done", "done"]
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz", "report.json"]
    forced = _run(studies / "case0.nii.gz", out, threshold_config, overwrite=True)
    assert [c.status for c in forced.cases] == ["done"]


def test_killed_process_leaves_complete_files_and_rerun_finishes(tmp_path, threshold_config):
    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(12):
        _volume(studies / f"case{i:02d}.nii.gz", seed=i, shape=(64, 64, 48))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ic_moe_monai", "segment", str(studies), str(out), "--bundle", str(BUNDLE),
           "--config", threshold_config, "--quiet"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list(out.glob("case*.nii.gz")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in out.glob("case*.nii.gz"))
    for name in finished:  # every visible output is complete
        assert np.asarray(nib.load(out / name).dataobj).shape == (64, 64, 48)
    rerun = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "report.json").read_text())
    status = {c["name"]: c["status"] for c in report["cases"]}
    assert {f"{n}.nii.gz" for n, s in status.items() if s == "skipped (exists)"} == set(finished)
    assert len(list(out.glob("case*.nii.gz"))) == 12 and not list(out.glob(".*"))


def test_cli_usage_errors_and_help(tmp_path):
    run = [sys.executable, "-m", "ic_moe_monai", "segment"]
    missing = subprocess.run([*run, str(tmp_path / "missing"), str(tmp_path / "out")], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr
    bad_option = subprocess.run([*run, str(tmp_path), str(tmp_path / "out"), "--formats", "jpeg"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad_option.returncode == 2 and "formats must be" in bad_option.stderr
    helped = subprocess.run([*run, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})  # fmt: skip
    text = helped.stdout + helped.stderr
    options = ["--bundle", "--config", "--device", "--formats", "--statistics", "--preview", "--overwrite",
               "--batch_size", "--num_workers", "--num_parts", "--part_id", "--max_image_size", "--quiet",
               "Default: 'nifti'"]  # fmt: skip
    for option in options:
        assert option in text, option


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("studies")
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice_with_seg", root / "ct3")  # 3-slice CT + 2 SEG objects
    shutil.copytree(shared_data / "dicom" / "dcmqa_mr_sagittal_epi" / "series", root / "sagittal")
    shutil.copy(BUNDLE / "sample_data" / "hippocampus_003.nii.gz", root / "hippo.nii.gz")
    (root / "broken.nii.gz").write_bytes((BUNDLE / "sample_data" / "hippocampus_007.nii.gz").read_bytes()[:5000])
    (root / "junk.bin").write_bytes(b"\x00 not an image")
    return root


@pytest.mark.slow
def test_shipped_model_on_a_mixed_folder(tmp_path, mixed_input):
    """The real bundle: its shipped weights on a real MR volume, two real DICOM series and two bad files."""
    report = segment(str(mixed_input), str(tmp_path), bundle=str(BUNDLE), formats="nifti,dicom_seg",
                     statistics=True, quiet=True)  # fmt: skip
    status = {c.name: c.status for c in report.cases}
    assert status["hippo"] == "done" and status["broken"] == "failed"
    assert sum(s == "done" for s in status.values()) == 3  # hippo, the 3-slice CT, the sagittal MR
    assert report.exit_code == 1  # a truncated file and a junk file
    reasons = {r["path"].rsplit("/", 1)[-1]: r for r in report.not_segmented}
    assert reasons["junk.bin"]["failure"] and not reasons["liver.dcm"]["failure"]
    out = nib.load(tmp_path / "hippo.nii.gz")
    ref = nib.load(mixed_input / "hippo.nii.gz")
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-4)
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}  # the shipped model finds both hippocampus parts
    hippo = next(c for c in report.cases if c.name == "hippo")
    assert "dicom_seg" not in hippo.outputs and hippo.notes == ["no DICOM SEG: the input is not a DICOM series"]
    stats = json.loads(Path(hippo.outputs["statistics_json"]).read_text())
    assert 0.5 < stats["anterior"]["volume_ml"] < 5 and 0.5 < stats["posterior"]["volume_ml"] < 5
    sagittal = next(c for c in report.cases if c.name.startswith("sagittal"))
    assert sagittal.outputs["dicom_seg"].endswith("_seg.dcm") and os.path.getsize(sagittal.outputs["dicom_seg"])


NO_ITK = "import sys; sys.modules['itk'] = None; "  # `import itk` raises ImportError from here on


def test_nifti_input_needs_no_itk(tmp_path, threshold_config):
    """ITK is imported only for DICOM series, NRRD and MHA: a NIfTI is segmented where `import itk` fails."""
    studies = tmp_path / "studies"
    studies.mkdir()
    data = _volume(studies / "case.nii.gz")
    code = NO_ITK + (
        "from ic_moe_monai.segment import segment; "
        f"report = segment({str(studies)!r}, {str(tmp_path / 'out')!r}, bundle={str(BUNDLE)!r}, "
        f"config={threshold_config!r}, quiet=True); "
        "assert sys.modules['itk'] is None; print('EXIT', report.exit_code, report.versions['itk'])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EXIT 0" in result.stdout
    out = nib.load(tmp_path / "out" / "case.nii.gz")
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected_threshold_labels(data))


def test_reused_segmenter_and_a_failed_write(tmp_path, threshold_config, monkeypatch):
    """A BundleSegmenter built once serves several calls; a case whose writing fails is reported, the rest done."""
    from ic_moe_monai.inference.predictor import BundleSegmenter
    from ic_moe_monai.segment import outputs as segment_outputs

    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(3):
        _volume(studies / f"case{i}.nii.gz", seed=i, shape=(SIZE, SIZE, 5))
    predictor = BundleSegmenter(BUNDLE, [threshold_config])
    real_write = segment_outputs.write_nifti_labels

    def write_or_fail(labels, affine, path):
        if Path(path).name == "case1.nii.gz":
            raise OSError("no space left on device")
        real_write(labels, affine, path)

    monkeypatch.setattr(segment_outputs, "write_nifti_labels", write_or_fail)
    report = segment(str(studies), str(tmp_path / "out"), bundle=predictor, statistics=True, quiet=True)
    status = {c.name: c for c in report.cases}
    assert [status[f"case{i}"].status for i in range(3)] == ["done", "failed", "done"]
    assert "no space left on device" in status["case1"].error and status["case1"].outputs == {}
    assert not list((tmp_path / "out").glob("case1*"))  # its statistics were removed with it
    assert report.settings["batch_size"] == predictor.batch_size and report.exit_code == 1
    monkeypatch.setattr(segment_outputs, "write_nifti_labels", real_write)
    again = segment(str(studies), str(tmp_path / "out"), bundle=predictor, quiet=True)
    assert [c.status for c in again.cases] == ["skipped (exists)", "done", "skipped (exists)"]
    with pytest.raises(ValueError, match="cannot change"):
        segment(str(studies), str(tmp_path / "out2"), bundle=predictor, batch_size=4, quiet=True)
