"""``segment`` against a real PACS (Orthanc with its DICOMweb plugin): series retrieved by study, series and query
URLs with credentials from the environment, DICOM SEGs stored back with ``--push``, the same checks, report and
exit codes as for folders, and one-line usage errors for URLs, credentials and servers that cannot be used."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ic_moe_monai.io.dicom_series import read_dicom_series
from ic_moe_monai.io.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, DicomwebSource
from ic_moe_monai.segment import UsageError, segment

from .conftest import REPO_ROOT
from .helpers import BUNDLE, threshold_bundle_config

MR_STUDY = "tcia_btp_pgbm003_mr_study"
SERIES = {"hippocrop": "11_HCropVolume", "t1post": "11-T1post-18670"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".dcm")


def _uids(path: Path) -> tuple[str, str]:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


@pytest.fixture(scope="module")
def pacs(orthanc_server, shared_data):
    """The PACS with two MR series of one study, a 3-slice CT with its SEG, and a 2-slice MR series."""
    dicom = shared_data / "dicom"
    for name in SERIES.values():
        orthanc_server.upload(_files(dicom / MR_STUDY / name))
    orthanc_server.upload(_files(dicom / "dcmqi_ct3slice_with_seg"))
    orthanc_server.upload(_files(dicom / "dicom2nifti_edge_cases" / "mr_only_two_slices"))
    return orthanc_server


@pytest.fixture
def credentials(monkeypatch, pacs):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(USER_ENV, pacs.auth[0])
    monkeypatch.setenv(PASSWORD_ENV, pacs.auth[1])


@pytest.fixture(scope="module")
def threshold_config(tmp_path_factory):
    return str(threshold_bundle_config(tmp_path_factory.mktemp("threshold"), img_size=16))


def _uid_of(case) -> str:
    return case.source.rsplit("/", 1)[1]


def _leftover_downloads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("ic_moe_dicomweb_*")}


@pytest.mark.slow
def test_study_url_with_push_stores_segs_and_a_rerun_resumes(tmp_path, pacs, credentials, shared_data):
    """The shipped model on both MR series of a study, read from the PACS; their SEGs stored back in the study."""
    folder = shared_data / "dicom" / MR_STUDY
    study, crop_uid = _uids(_files(folder / SERIES["hippocrop"])[0])
    before = _leftover_downloads()
    report = segment(f"{pacs.dicomweb}/studies/{study}", str(tmp_path), bundle=str(BUNDLE), push=True, quiet=True)
    assert report.exit_code == 0, (report.cases, report.not_segmented)
    assert report.settings["push"] and "dicom_seg" in report.settings["formats"]
    assert len(report.cases) == 2 and all(c.status == "done" for c in report.cases)
    for name, series in SERIES.items():
        files = _files(folder / series)
        _, series_uid = _uids(files[0])
        case = next(c for c in report.cases if c.source.endswith(series_uid))
        assert case.source == f"{pacs.dicomweb}/studies/{study}/series/{series_uid}"  # the URL, not a temp path
        labels = nib.load(case.outputs["nifti"])
        reference = read_dicom_series(files)
        assert labels.shape == tuple(reference.shape), name
        np.testing.assert_allclose(labels.affine, np.asarray(reference.affine), atol=1e-4)
        receipt = json.loads(Path(case.outputs["pushed"]).read_text())
        assert len(receipt["retrieve_urls"]) == 1 and study in receipt["retrieve_urls"][0]
        (seg,) = pacs.segs_of(series_uid)
        assert seg.StudyInstanceUID == study
        assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "anterior"), (2, "posterior")]
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"
    crop = next(c for c in report.cases if c.source.endswith(crop_uid))
    assert set(np.unique(np.asarray(nib.load(crop.outputs["nifti"]).dataobj))) == {0, 1, 2}  # a hippocampus crop
    assert _leftover_downloads() == before  # the retrieved series are gone
    again = segment(f"{pacs.dicomweb}/studies/{study}", str(tmp_path), bundle=str(BUNDLE), push=True, quiet=True)
    assert [c.status for c in again.cases] == ["skipped (exists)"] * 2 and again.exit_code == 0
    assert len(pacs.segs_of(crop_uid)) == 1  # nothing stored twice
    pacs.delete_series(seg.SeriesInstanceUID for c in report.cases for seg in pacs.segs_of(_uid_of(c)))


def test_query_url_reports_bad_series_by_url_and_goes_on(tmp_path, pacs, credentials, shared_data, threshold_config):
    dicom = shared_data / "dicom"
    ct_study, ct_series = _uids(_files(dicom / "dcmqi_ct3slice_with_seg" / "series")[0])
    two_study, two_series = _uids(_files(dicom / "dicom2nifti_edge_cases" / "mr_only_two_slices")[0])
    query = f"{pacs.dicomweb}/studies?StudyInstanceUID={ct_study},{two_study}"  # a UID list
    before = _leftover_downloads()
    report = segment(query, str(tmp_path), bundle=str(BUNDLE), config=threshold_config, formats="nifti,dicom_seg",
                     quiet=True)  # fmt: skip
    assert report.exit_code == 1  # the 2-slice series is no volume
    (case,) = report.cases
    assert case.status == "done" and case.source == f"{pacs.dicomweb}/studies/{ct_study}/series/{ct_series}"
    assert Path(case.outputs["dicom_seg"]).is_file()
    reasons = {r["path"]: r for r in report.not_segmented}
    two = reasons[f"{pacs.dicomweb}/studies/{two_study}/series/{two_series}"]
    assert two["failure"] and "only 2 slices" in two["reason"]
    segs = [r for r in report.not_segmented if "DICOM SEG without an image volume" in r["reason"]]
    assert len(segs) == 2 and all(not s["failure"] and s["path"].startswith(pacs.dicomweb) for s in segs)
    text = json.dumps(json.loads((tmp_path / "report.json").read_text()))
    assert "ic_moe_dicomweb_" not in text and pacs.auth[1] not in text  # no temp paths, no password
    assert _leftover_downloads() == before

    small = segment(f"{pacs.dicomweb}/studies/{ct_study}", str(tmp_path / "small"), bundle=str(BUNDLE),
                    config=threshold_config, max_image_size="1M", quiet=True)  # fmt: skip
    (refused,) = [r for r in small.not_segmented if r["failure"]]
    assert refused["path"].endswith(ct_series) and "over the limit of 1.0 MiB" in refused["reason"]
    assert refused["reason"].startswith("cannot retrieve the series: ")  # refused from the QIDO answer, before WADO
    assert small.exit_code == 1 and not small.cases


def test_parts_retrieve_and_segment_only_their_series(tmp_path, pacs, credentials, shared_data, threshold_config):
    study, _ = _uids(_files(shared_data / "dicom" / MR_STUDY / SERIES["t1post"])[0])
    sources = []
    for part in (0, 1):
        report = segment(f"{pacs.dicomweb}/studies/{study}", str(tmp_path), bundle=str(BUNDLE), config=threshold_config,
                         num_parts=2, part_id=part, quiet=True)  # fmt: skip
        assert report.exit_code == 0 and (tmp_path / f"report_part{part}.json").is_file()
        sources += [c.source for c in report.cases if c.status == "done"]
    assert len(sources) == len(set(sources)) == 2  # one series each, none twice


def test_urls_credentials_and_servers_that_cannot_be_used(tmp_path, pacs, monkeypatch, shared_data):
    study, series = _uids(_files(shared_data / "dicom" / MR_STUDY / SERIES["hippocrop"])[0])
    root = pacs.dicomweb
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    out = str(tmp_path / "out")
    refused = {
        f"http://user:secret@127.0.0.1:1/dicom-web/studies/{study}": "credentials in the URL are refused",
        f"{root}/series": "a query without filters",
        f"{root}/studies/not-a-uid": "is not a DICOM UID",
        f"{root}/instances/1.2.3": "not a DICOMweb study, series or query URL",
        f"{root}/studies/{study}": f"401 Unauthorized (credentials needed; set {USER_ENV} and {PASSWORD_ENV}",
        f"http://127.0.0.1:1/dicom-web/studies/{study}": "cannot reach the DICOMweb server (Connection refused)",
    }
    for url, message in refused.items():
        with pytest.raises(UsageError) as caught:
            segment(url, out, bundle=str(BUNDLE), quiet=True)
        assert message in str(caught.value) and "secret" not in str(caught.value), (url, caught.value)
    monkeypatch.setenv(USER_ENV, pacs.auth[0])
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(UsageError, match=f"credentials of {USER_ENV} / {PASSWORD_ENV} were refused"):
        segment(f"{root}/studies/{study}", out, bundle=str(BUNDLE), quiet=True)
    monkeypatch.setenv(PASSWORD_ENV, pacs.auth[1])
    with pytest.raises(FileNotFoundError, match=re.escape("no study 1.2.3 on the server")):
        segment(f"{root}/studies/1.2.3", out, bundle=str(BUNDLE), quiet=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no series 1.2.3 of study {study}")):
        segment(f"{root}/studies/{study}/series/1.2.3", out, bundle=str(BUNDLE), quiet=True)
    with pytest.raises(UsageError, match=r"push .* needs a DICOMweb input URL"):
        segment(str(tmp_path), out, bundle=str(BUNDLE), push=True, quiet=True)
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(UsageError, match=f"{USER_ENV} and {PASSWORD_ENV} go together: {PASSWORD_ENV} is not set"):
        segment(f"{root}/studies/{study}", out, bundle=str(BUNDLE), quiet=True)

    cli = subprocess.run([sys.executable, "-m", "ic_moe_monai", "segment", f"{root}/studies/{study}/series/{series}",
                          out, "--push"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", USER_ENV: pacs.auth[0], PASSWORD_ENV: "wrong"})  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    (line,) = cli.stderr.strip().splitlines()
    assert line.startswith("error: ") and "401 Unauthorized" in line and "wrong" not in line


def test_source_urls_parse():
    source = DicomwebSource.parse("https://pacs.example:8443/dicom-web/studies/1.2.3/series/4.5/")
    assert (source.root, source.study, source.series) == ("https://pacs.example:8443/dicom-web", "1.2.3", "4.5")
    query = DicomwebSource.parse("http://pacs/wado/rs/series?Modality=MR&StudyDate=20240101")
    assert query.root == "http://pacs/wado/rs" and query.level == "series"
    assert dict(query.filters) == {"Modality": ("MR",), "StudyDate": ("20240101",)}
