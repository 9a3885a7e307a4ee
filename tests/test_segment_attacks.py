"""``segment`` under attack: outputs that would replace inputs, concurrent runs into one folder, output folders that
cannot be written, disks that fill up, memory bombs, messages that name the file and the cause, and usage errors
(exit code 2, one line, before the model is loaded)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from ic_moe_monai.cli import main
from ic_moe_monai.inference.predictor import BundleSegmenter
from ic_moe_monai.io import atomic, writers
from ic_moe_monai.segment import SKIPPED_BUSY, SKIPPED_EXISTS, SKIPPED_NOTHING, UsageError, segment
from ic_moe_monai.segment import outputs as segment_outputs

from .conftest import REPO_ROOT
from .helpers import BUNDLE, expected_threshold_labels, threshold_bundle_config, write_dicom_series

SIZE = 16


@pytest.fixture(scope="module")
def threshold_config(tmp_path_factory):
    return str(threshold_bundle_config(tmp_path_factory.mktemp("threshold"), img_size=SIZE))


def _volume(path: Path, seed: int = 0, shape=(SIZE, SIZE, SIZE), dtype=np.float32) -> np.ndarray:
    data = (np.random.default_rng(seed).random(shape) * 400).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return data


def _run(input, output, config, **kwargs):
    return segment(str(input), str(output), bundle=str(BUNDLE), config=config, quiet=True, **kwargs)


def _cli(capsys, *argv) -> tuple[int, str]:
    """``python -m ic_moe_monai segment ...`` in this process: exit code and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["segment", *map(str, argv)])
    return exited.value.code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded: refusals must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(BundleSegmenter, "__init__", refuse)


# ---------------------------------------------------------------------------------------- 1. inputs are safe
def test_an_output_never_replaces_an_input(tmp_path, capsys, threshold_config, no_model):
    studies = tmp_path / "x"
    _volume(studies / "case.nii.gz")
    original = (studies / "case.nii.gz").read_bytes()
    common = ["--bundle", BUNDLE, "--config", threshold_config, "--quiet"]
    for extra in (["--overwrite"], []):  # with --overwrite it used to replace the scan, without it "succeed"
        code, err = _cli(capsys, studies / "case.nii.gz", studies, *common, *extra)
        assert code == 2 and "would replace the input" in _one_error_line(err) and str(studies / "case.nii.gz") in err
    code, err = _cli(capsys, studies, studies, *common)
    assert code == 2 and "is the input folder" in _one_error_line(err)
    (tmp_path / "link").symlink_to(studies, target_is_directory=True)
    code, err = _cli(capsys, studies, tmp_path / "link", *common)
    assert code == 2 and "is the input folder" in _one_error_line(err)

    hard, soft = tmp_path / "hard", tmp_path / "soft"
    hard.mkdir()
    soft.mkdir()
    os.link(studies / "case.nii.gz", hard / "case.nii.gz")  # an earlier output that is the input's own inode
    (soft / "case.nii.gz").symlink_to(studies / "case.nii.gz")
    for out in (hard, soft):
        code, err = _cli(capsys, studies, out, *common, "--overwrite")
        assert code == 2 and "(the same file)" in _one_error_line(err), err
    assert (studies / "case.nii.gz").read_bytes() == original
    assert sorted(p.name for p in studies.iterdir()) == ["case.nii.gz"]  # nothing written beside it


def test_input_inside_the_output_folder_is_found(tmp_path, monkeypatch, threshold_config):
    """``segment studies .`` from the parent of ``studies``; an output folder inside the input is still skipped."""
    _volume(tmp_path / "studies" / "case.nii.gz")
    monkeypatch.chdir(tmp_path)
    report = _run("studies", ".", threshold_config)
    assert [(c.name, c.status) for c in report.cases] == [("case", "done")] and report.exit_code == 0
    assert (tmp_path / "case.nii.gz").is_file() and (tmp_path / "report.json").is_file()
    inside = _run("studies", "studies/out", threshold_config)
    again = _run("studies", "studies/out", threshold_config)
    assert [c.status for c in inside.cases] == ["done"] and [c.status for c in again.cases] == [SKIPPED_EXISTS]


# ----------------------------------------------------------------------------------- 3. concurrent runs
GATED_RUN = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from ic_moe_monai.segment import segment
    studies, out, bundle, config, signals = sys.argv[1:6]
    real_replace = os.replace

    def gated_replace(src, dst):  # case0's labelmap waits, written under its temporary name, for the test's go
        if Path(dst).name == "case0.nii.gz":
            (Path(signals) / "ready").touch()
            while not (Path(signals) / "go").exists():
                time.sleep(0.02)
        real_replace(src, dst)

    os.replace = gated_replace
    report = segment(studies, out, bundle=bundle, config=config, quiet=True)
    print("EXIT", report.exit_code)
    """
)


def test_concurrent_runs_share_a_folder_without_destroying_results(tmp_path, threshold_config):
    studies, out = tmp_path / "studies", tmp_path / "out"
    data = {f"case{i}": _volume(studies / f"case{i}.nii.gz", seed=i) for i in range(6)}
    out.mkdir()
    (out / ".case~gone.lock").write_text("")  # left by a killed run: nobody holds it
    first = subprocess.Popen(
        [sys.executable, "-c", GATED_RUN, str(studies), str(out), str(BUNDLE), threshold_config, str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "ready").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run did not reach its first write"
            time.sleep(0.05)
        partial = list(out.glob(f".case0.nii.gz{writers.PARTIAL_MARK}~*"))
        assert len(partial) == 1  # the first run is writing case0

        second = _run(studies, out, threshold_config)  # starts while the first run writes

        status = {c.name: c.status for c in second.cases}
        assert status["case0"] == SKIPPED_BUSY and second.exit_code == 0
        assert partial[0].exists() and not (out / "report.json").exists()  # its temporary file was left alone
        second_report = out / f"report_{second.run_id.replace('~', '_')}.json"
        assert json.loads(second_report.read_text())["run_id"] == second.run_id
    finally:
        (tmp_path / "go").touch()
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0 and "EXIT 0" in stdout, stderr[-3000:]
    first_report = json.loads((out / "report.json").read_text())
    assert first_report["run_id"] != second.run_id
    first_status = {c["name"]: c["status"] for c in first_report["cases"]}
    for name, values in data.items():  # each case written by exactly one run; the other skipped it
        statuses = sorted([first_status[name], status[name]])
        assert statuses in (["done", SKIPPED_BUSY], ["done", SKIPPED_EXISTS]), (name, statuses)
        labels = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, expected_threshold_labels(values))
    assert not list(out.glob(".*"))  # no lock or temporary file left, the killed run's lock included


# ---------------------------------------------------------------------------------------------- 4. DICOM SEG
def test_a_failing_dicom_seg_is_a_note_and_segments_carry_the_bundle_codes(tmp_path, threshold_config, monkeypatch):
    pixels = np.random.default_rng(5).integers(0, 1000, (SIZE, SIZE, SIZE)).astype(np.int16)
    write_dicom_series(tmp_path / "studies" / "mr", pixels)
    out = tmp_path / "out"
    report = _run(tmp_path / "studies", out, threshold_config, formats="nifti,dicom_seg", statistics=True)
    (case,) = report.cases
    seg = hd.seg.segread(case.outputs["dicom_seg"])
    coded = {int(s.SegmentNumber): s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    assert coded[1].CodeValue == "5366008" and coded[1].CodeMeaning == "Hippocampus"  # metadata.json's codes
    assert coded[1].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Anterior"
    assert coded[2].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Posterior"

    def broken_seg(*args, **kwargs):
        raise ValueError("highdicom refused the frames")

    monkeypatch.setattr(segment_outputs, "write_dicom_seg", broken_seg)
    again = _run(tmp_path / "studies", out, threshold_config, formats="nifti,dicom_seg", statistics=True,
                 overwrite=True)  # fmt: skip
    (case,) = again.cases
    assert case.status == "done" and again.exit_code == 0
    assert case.notes == ["no DICOM SEG: ValueError: highdicom refused the frames"]
    assert set(case.outputs) == {"nifti", "statistics_json", "statistics_csv"}
    assert all(Path(p).is_file() for p in case.outputs.values())
    assert not list(out.glob("*_seg.dcm"))  # the earlier run's SEG does not stay beside the new labelmap
    _volume(tmp_path / "nifti" / "case.nii.gz")
    (nothing,) = _run(tmp_path / "nifti", tmp_path / "seg_only", threshold_config, formats="dicom_seg").cases
    assert nothing.status == SKIPPED_NOTHING and nothing.notes == ["no DICOM SEG: the input is not a DICOM series"]


# ------------------------------------------------------------------------------------ 5. the output side
def test_unusable_output_folders_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model):
    _volume(tmp_path / "in" / "case.nii.gz")
    (tmp_path / "afile").write_text("not a folder")
    code, err = _cli(capsys, tmp_path / "in", tmp_path / "afile", "--quiet")
    assert code == 2 and "exists and is not a folder" in _one_error_line(err)
    code, err = _cli(capsys, tmp_path / "in", tmp_path / "afile" / "out", "--quiet")
    assert code == 2 and "cannot create the folder" in _one_error_line(err)

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # a read-only folder, as it looks to root as well
        if "write-probe" in os.fspath(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, err = _cli(capsys, tmp_path / "in", tmp_path / "ro", "--quiet")
    assert code == 2 and "cannot write into the folder (Permission denied)" in _one_error_line(err)
    monkeypatch.setattr(os, "open", real_open)
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway)
        (tmp_path / "real_ro").mkdir(mode=0o555)
        code, err = _cli(capsys, tmp_path / "in", tmp_path / "real_ro", "--quiet")
        assert code == 2 and "cannot write into the folder" in _one_error_line(err)


def test_write_errors_fail_their_case_and_the_report_still_comes(
    tmp_path, capsys, caplog, threshold_config, monkeypatch
):
    studies, out = tmp_path / "studies", tmp_path / "out"
    for i in range(3):
        _volume(studies / f"case{i}.nii.gz", seed=i)
    real_replace = os.replace
    full = {"case1.nii.gz"}

    def disk_full(src, dst):
        if Path(dst).name in full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    report = _run(studies, out, threshold_config, statistics=True)
    status = {c.name: c for c in report.cases}
    assert [status[f"case{i}"].status for i in range(3)] == ["done", "failed", "done"]
    assert status["case1"].error == f"{studies / 'case1.nii.gz'}: writing the labelmap failed (No space left on device)"
    assert not list(out.glob("case1*")) and not list(out.glob(".*"))  # its statistics went with it
    assert json.loads((out / "report.json").read_text())["exit_code"] == 1

    full.update({"report.json", "statistics.csv"})  # the disk is full when the run files are written
    (out / "report.json").unlink()
    code, err = _cli(capsys, studies, out, "--bundle", BUNDLE, "--config", threshold_config, "--statistics",
                     "--overwrite", "--quiet")  # fmt: skip
    assert code == 1 and "Traceback" not in err
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # on stderr outside pytest
    assert f"cannot write the report {out / 'report.json'}: No space left on device" in said
    assert f"cannot write {out / 'statistics.csv'}: No space left on device" in said
    assert not (out / "report.json").exists() and not list(out.glob(".*"))


# ------------------------------------------------------------------------------------------ 7. memory bombs
def test_memory_bomb_and_max_image_size(tmp_path, threshold_config):
    studies = tmp_path / "studies"
    studies.mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1000))  # 5.4 GiB as float32
    header.set_data_dtype(np.float32)
    (studies / "bomb.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4))
    assert (studies / "bomb.nii.gz").stat().st_size < 200
    _volume(studies / "big.nii.gz", shape=(32, 32, 32))  # 128 KiB as float32
    _volume(studies / "small.nii.gz")  # 16 KiB
    segmenter = BundleSegmenter(BUNDLE, [threshold_config])  # built outside the measurement
    start = time.monotonic()
    tracemalloc.start()
    report = segment(str(studies), str(tmp_path / "out"), bundle=segmenter, max_image_size="64K", quiet=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20 and time.monotonic() - start < 60, peak
    status = {c.name: c for c in report.cases}
    assert status["small"].status == "done" and report.settings["max_image_size"] == 64 << 10
    assert "truncated or forged header" in status["bomb"].error and "1200×1200×1000" in status["bomb"].error
    assert "over the limit of 64.0 KiB" in status["big"].error and str(studies / "big.nii.gz") in status["big"].error
    with pytest.raises(UsageError, match="max_image_size"):
        segment(str(studies), str(tmp_path / "out"), bundle=segmenter, max_image_size="lots", quiet=True)


# ------------------------------------------------------------------------------ 9, 10. messages of bad inputs
def _nifti_with_srow(path: Path, srow: list[list[float]]) -> None:
    """A NIfTI whose sform (the affine readers use) is ``srow``, the qform unset."""
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((SIZE,) * 3).astype(np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([0, 1], np.int16).tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.asarray(srow, np.float32).tobytes()
    path.write_bytes(bytes(raw))


def test_bad_inputs_name_the_file_and_the_cause(tmp_path, capsys, threshold_config):
    studies = tmp_path / "studies"
    studies.mkdir()
    _nifti_with_srow(studies / "flat.nii", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    _nifti_with_srow(studies / "parallel.nii", [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    (studies / "garbage.nii.gz").write_bytes(gzip.compress(os.urandom(2000)))
    (studies / "notgzip.nii.gz").write_bytes(os.urandom(500))
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, SIZE), np.complex64), np.eye(4)), studies / "complex.nii.gz")
    _volume(studies / "one_slice.nii.gz", shape=(SIZE, SIZE, 1))
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((SIZE,) * 3).astype(np.float32), None),
             studies / "zero_spacing.nii")  # fmt: skip
    raw = bytearray((studies / "zero_spacing.nii").read_bytes())
    raw[80:92] = np.zeros(3, np.float32).tobytes()  # pixdim 0, no qform / sform: nibabel fixes it, and says so
    (studies / "zero_spacing.nii").write_bytes(bytes(raw))

    report = _run(studies, tmp_path / "out", threshold_config)

    expected = {
        "flat": "singular/degenerate affine (voxel axis 2 has zero length",
        "parallel": "singular/degenerate affine (",
        "garbage": "cannot read the image header",
        "notgzip": "not a gzip file",
        "complex": "complex voxels (complex64); a real-valued volume is needed",
        "one_slice": "a single slice",
    }
    status = {c.name: c for c in report.cases}
    for name, cause in expected.items():
        error = status[name].error
        assert status[name].status == "failed" and cause in error, (name, error)
        assert error.startswith(str(studies / name)) and "\n" not in error and "object at 0x" not in error, error
    fixed = status["zero_spacing"]
    assert fixed.status == "done" and any("pixdim" in n and "while reading" in n for n in fixed.notes), fixed.notes
    assert "pixdim" not in capsys.readouterr().err  # no bare library line on the console


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, threshold_config):
    studies, out = tmp_path / "in", tmp_path / "out"
    _volume(studies / "case.nii.gz")
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").symlink_to(BUNDLE / "configs", target_is_directory=True)
    (bundle / "models" / "model.pt").write_bytes(os.urandom(1000))
    checkpoint = tmp_path / "broken.pt"
    checkpoint.write_bytes(BUNDLE.joinpath("models", "model.pt").read_bytes()[:5000])  # a cut-short archive
    broken_config = tmp_path / "broken.json"
    broken_config.write_text(
        json.dumps({**json.loads(Path(threshold_config).read_text()), "ckpt_path": str(checkpoint)})
    )
    cases = {
        ("--device", "mps"): "device mps is not supported: use auto, cpu or cuda:N",
        ("--device", "cuda:x"): "device cuda:x is not supported",
        ("--bundle", bundle): f"bundle {bundle}: models/model.pt is not a readable checkpoint (",
        ("--config", broken_config): "broken.pt is not a readable checkpoint (damaged or truncated",
        ("--bundle", tmp_path / "nowhere"): "no such folder",
        ("--config", tmp_path / "none.json"): "none.json: no such file",
        ("--formats", "jpeg"): "formats must be a comma-separated subset of nifti, dicom_seg",
        ("--formats", "3"): "formats must be",
        ("--num_parts", "0"): "num_parts must be a whole number ≥ 1",
        ("--num_parts", "abc"): "num_parts must be a whole number ≥ 1, got 'abc'",
        ("--num_parts", "2.5"): "num_parts must be a whole number ≥ 1, got 2.5",
        ("--num_parts", "2", "--part_id", "2"): "need 0 ≤ part_id < num_parts",
        ("--num_workers", "-1"): "num_workers must be a whole number ≥ 0",
        ("--max_image_size", "lots"): "max_image_size: a size in bytes",
        ("--statistics=maybe",): "statistics is an on/off option",
        ("--colour", "red"): "unknown option --colour",
        ("-z",): "unknown option -z",
    }
    for options, message in cases.items():
        code, err = _cli(capsys, studies, out, "--quiet", *options)
        assert code == 2 and message in _one_error_line(err), (options, err)
    code, err = _cli(capsys, tmp_path / "missing", out, "--quiet")
    assert code == 2 and "no such file or folder" in _one_error_line(err)
    assert not out.exists() or not list(out.glob("*.nii.gz"))  # nothing was segmented


def test_long_input_names_give_writable_distinct_outputs(tmp_path, threshold_config):
    """Inputs named near the file system's 255-byte limit: outputs that add suffixes to the name would be too long,
    so the case name is cut and given a digest; two such names stay distinct and every output is written."""
    stem_a, stem_b = "a" * 240 + "1", "a" * 240 + "2"
    _volume(tmp_path / "in" / f"{stem_a}.nii.gz", seed=0)
    _volume(tmp_path / "in" / f"{stem_b}.nii.gz", seed=1)
    report = _run(tmp_path / "in", tmp_path / "out", threshold_config, statistics=True, preview=True)
    assert [c.status for c in report.cases] == ["done", "done"] and report.exit_code == 0
    names = {c.name for c in report.cases}
    assert len(names) == 2 and all(len(os.fsencode(n)) <= 200 for n in names)
    for case in report.cases:
        assert len(case.outputs) == 4 and all(Path(p).is_file() for p in case.outputs.values())
        assert case.source.endswith(".nii.gz") and len(Path(case.source).name) > 240
