"""``python -m ic_moe_monai segment``: a mixed folder of studies, bad inputs, resume, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ic_moe_monai.segment import segment

from .conftest import REPO_ROOT
from .helpers import BUNDLE


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
def test_mixed_folder_bad_cases_and_resume(tmp_path, mixed_input):
    report = segment(str(mixed_input), str(tmp_path), bundle=str(BUNDLE), quiet=True)
    status = {c.name: c.status for c in report.cases}
    assert status["hippo"] == "done" and status["broken"] == "failed"
    assert sum(s == "done" for s in status.values()) == 3  # hippo, the 3-slice CT, the sagittal MR
    assert report.exit_code == 1  # a truncated file and a junk file
    reasons = {r["path"].rsplit("/", 1)[-1]: r for r in report.not_segmented}
    assert reasons["junk.bin"]["failure"] and not reasons["liver.dcm"]["failure"]
    failed = next(c for c in report.cases if c.name == "broken")
    assert "broken.nii.gz: cannot read the image" in failed.error  # a one-line reason naming the file
    assert "\n" not in failed.error
    # outputs: input geometry, no partial files
    out = nib.load(tmp_path / "hippo.nii.gz")
    ref = nib.load(mixed_input / "hippo.nii.gz")
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-4)
    assert not list(tmp_path.glob(".*partial*"))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["exit_code"] == 1 and len(saved["cases"]) == 4 and saved["versions"]["torch"]
    # a rerun resumes: finished cases are skipped, the failed one is tried again
    again = segment(str(mixed_input), str(tmp_path), bundle=str(BUNDLE), quiet=True)
    assert {c.name: c.status for c in again.cases}["hippo"] == "skipped (exists)"
    assert {c.name: c.status for c in again.cases}["broken"] == "failed"
    forced = segment(str(mixed_input / "hippo.nii.gz"), str(tmp_path), bundle=str(BUNDLE), overwrite=True, quiet=True)
    assert [c.status for c in forced.cases] == ["done"] and forced.exit_code == 0


def test_cli_usage_errors_and_help(tmp_path):
    run = [sys.executable, "-m", "ic_moe_monai", "segment"]
    missing = subprocess.run([*run, str(tmp_path / "missing"), str(tmp_path / "out")], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr
    helped = subprocess.run([*run, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})  # fmt: skip
    text = helped.stdout + helped.stderr
    for option in ("--bundle", "--device", "--overwrite", "--batch_size", "--quiet"):
        assert option in text, option
