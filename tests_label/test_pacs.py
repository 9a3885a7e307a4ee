"""The hospital path: both MONAI Label apps with a real PACS (Orthanc and its DICOMweb plugin) as their studies,
started offline (any download fails) with credentials from MONAI Label's environment variables.

The IC-MoE app lists the series of the bundle's modality (MR, not MONAI Label's default CT), infers and refines
clicks on each series' own grid, stores submitted labels as DICOM SEGs whose segment numbers are the label values
and whose names and codes are the bundle's, refuses empty labels and unknown values with 422, updates *completed* and
*next sample* at once after a submit, and trains on labels read back from the PACS (cropped to the annotated
slices). The stock ``monaibundle`` app starts offline and infers with the setup the README gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monai.transforms import LoadImage

from ic_moe_monai.io.dicom_series import read_dicom_series
from ic_moe_monai.label import make_app_folder

from .conftest import BUNDLE, start_server

MR_STUDY = "tcia_btp_pgbm003_mr_study"
MR_SERIES = {"hippocrop": "11_HCropVolume", "t1post": "11-T1post-18670"}
# Any download goes to a closed local port and fails at once (the PACS on 127.0.0.1 is reached directly).
_PROXIES = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
OFFLINE = {**_PROXIES, **{k.lower(): v for k, v in _PROXIES.items()}}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def pacs(orthanc_server, shared_data_dir_path):
    """The PACS holding two MR series of a brain study and a CT series (with its SEGs)."""
    dicom = shared_data_dir_path / "dicom"
    for name in MR_SERIES.values():
        orthanc_server.upload(_files(dicom / MR_STUDY / name))
    orthanc_server.upload(_files(dicom / "dcmqi_ct3slice_with_seg" / "series"))
    return orthanc_server


@pytest.fixture(scope="module")
def shared_data_dir_path():
    from tests.conftest import shared_data_dir

    path = shared_data_dir()
    if not (path / "dicom").is_dir():
        pytest.skip(f"real data folder {path} is absent")
    return path


@pytest.fixture(scope="module")
def series(shared_data_dir_path) -> dict[str, tuple[str, list[Path]]]:
    folder = shared_data_dir_path / "dicom" / MR_STUDY
    return {name: (_series_uid(folder / sub), _files(folder / sub)) for name, sub in MR_SERIES.items()}


def _server_env(pacs, tmp: Path, without_dcmqi: bool = False, **extra: str) -> dict[str, str]:
    """Credentials and a DICOMweb cache of the server's own, offline; ``without_dcmqi``: a PATH holding only
    ``python`` and ``monailabel`` (this environment's ``bin`` holds dcmqi's ``itkimage2segimage``)."""
    env = {"MONAI_LABEL_DICOMWEB_USERNAME": pacs.auth[0], "MONAI_LABEL_DICOMWEB_PASSWORD": pacs.auth[1],
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp / "dicomweb_cache"), **OFFLINE, **extra}  # fmt: skip
    if without_dcmqi:
        tools = tmp / "bin"
        tools.mkdir(exist_ok=True)
        for name in ("python", "monailabel"):
            (tools / name).write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / name}" "$@"\n')
            (tools / name).chmod(0o755)
        env["PATH"] = f"{tools}:/usr/bin:/bin"
    return env


def _ic_moe_server(tmp: Path, pacs, **conf: str):
    bundle = tmp / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "logs"))
    app = make_app_folder(tmp / "apps" / "ic_moe")
    env = _server_env(pacs, tmp, without_dcmqi=True)
    yield from start_server(tmp, pacs.dicomweb, app, {"bundle": str(bundle), **conf}, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pacs):
    yield from _ic_moe_server(tmp_path_factory.mktemp("pacs_ours"), pacs, skip_trainers="true")


def _labels(response: requests.Response, path: Path) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text[:500]
    path.write_bytes(response.content)
    return nib.load(path)


def _stats(server) -> dict:
    return requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=60).json()


def _submit(server, image: str, labels: np.ndarray, affine: np.ndarray, tmp: Path) -> requests.Response:
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), tmp / "label.nii.gz")
    return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"}, timeout=300,
                        files={"label": ("label.nii.gz", (tmp / "label.nii.gz").read_bytes()),
                               "params": (None, json.dumps({"label_info": [{"name": "anterior"}]}))})  # fmt: skip


def _auto_label(server, image: str, tmp: Path) -> nib.Nifti1Image:
    return _labels(server.infer("ic_moe", image), tmp / f"{image}.nii.gz")


def test_mr_series_listed_inferred_and_clicked_on_their_own_grid(server, series, tmp_path):
    mr = {uid for uid, _ in series.values()}
    assert _stats(server)["total"] == 2  # the two MR series; the CT is not the bundle's modality
    assert requests.post(f"{server.url}/activelearning/first", json={}, timeout=60).json()["id"] in mr
    for name, (uid, files) in series.items():
        auto = _auto_label(server, uid, tmp_path)
        reference = read_dicom_series(files)
        assert auto.shape == tuple(reference.shape), name
        np.testing.assert_allclose(auto.affine, np.asarray(reference.affine), atol=1e-4)
    uid, _ = series["hippocrop"]
    labels = np.asarray(_auto_label(server, uid, tmp_path).dataobj)
    x, y, z = (int(v) for v in np.argwhere(labels == 0)[0])
    clicked = server.infer("ic_moe_interactive", uid, {"foreground": [[x, y, z]], "label": "posterior"})
    assert np.asarray(_labels(clicked, tmp_path / "clicked.nii.gz").dataobj)[x, y, z] == 2
    assert "dcmqi" not in server.log.read_text()  # nothing was fetched to convert labels


def test_submitted_label_is_a_seg_with_its_own_numbers_names_and_codes(server, pacs, series, tmp_path):
    """A label holding only 2 (posterior) is segment 2 "posterior" (MONAI Label made it segment 1 "anterior")."""
    uid, _ = series["t1post"]
    auto = _auto_label(server, uid, tmp_path)
    only_posterior = np.zeros(auto.shape, np.uint8)
    only_posterior[100:140, 120:160, 8:13] = 2
    before = _stats(server)
    empty = _submit(server, uid, np.zeros(auto.shape), auto.affine, tmp_path)
    assert empty.status_code == 422 and "the label is empty" in empty.json()["detail"], empty.text
    unknown = _submit(server, uid, only_posterior * 4, auto.affine, tmp_path)  # value 8: no label of the bundle
    assert unknown.status_code == 422 and "are not labels of the bundle" in unknown.json()["detail"], unknown.text
    assert not pacs.segs_of(uid)  # nothing stored by refused labels

    stored = _submit(server, uid, only_posterior, auto.affine, tmp_path)
    assert stored.status_code == 200, stored.text
    (seg,) = pacs.segs_of(uid)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "anterior"), (2, "posterior")]
    posterior = seg.SegmentSequence[1]
    assert posterior.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"
    modifier = posterior.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeMeaning == "Posterior"
    assert posterior.SegmentAlgorithmType == "SEMIAUTOMATIC"
    per_frame = seg.PerFrameFunctionalGroupsSequence
    frames = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in per_frame}
    assert frames == {2} and int(seg.NumberOfFrames) == 5  # the 5 annotated slices, all of segment 2

    after = _stats(server)  # at once, not after the list cache expires
    assert after["completed"] == before["completed"] + 1
    assert requests.post(f"{server.url}/activelearning/first", json={}, timeout=60).json()["id"] != uid


def test_training_on_labels_read_back_from_the_pacs(tmp_path_factory, server, pacs, series, tmp_path):
    """Two labels submitted, then a server with an empty cache (another annotation server, or one restarted)
    trains one epoch on them as the PACS gives them back: SEGs covering only the annotated slices."""
    for name, (uid, _) in series.items():
        if pacs.segs_of(uid):
            continue
        auto = _auto_label(server, uid, tmp_path)
        labels = np.asarray(auto.dataobj).copy()
        labels[..., : labels.shape[2] // 4] = 0  # annotated on part of the slices only
        labels[labels.shape[0] // 3, labels.shape[1] // 3, labels.shape[2] // 2] = 1
        assert _submit(server, uid, labels, auto.affine, tmp_path).status_code == 200, name
    starting = _ic_moe_server(tmp_path_factory.mktemp("pacs_train"), pacs)
    trainer = next(starting)
    try:
        weights = trainer.bundle / "models" / "model.pt"
        before = weights.read_bytes()
        trained = requests.post(f"{trainer.url}/train/ic_moe", params={"run_sync": "true"}, timeout=900,
                                json={"max_epochs": 1, "val_split": 0.5, "device": "cpu"})  # fmt: skip
        assert trained.status_code == 200, trained.text[:500]
        assert weights.read_bytes() != before
        log = trainer.log.read_text()
        assert "val_mean_dice" in log and "must match the size" not in log
        cached = list((trainer.log.parent / "dicomweb_cache").rglob("labels/final/*.nrrd"))
        assert len(cached) == 2, cached  # both read back from the PACS, as MONAI Label's SEG reader gives them
        slices = {uid: len(files) for uid, files in series.values()}
        for path in cached:
            assert LoadImage(image_only=True)(str(path)).shape[-1] < slices[path.name.removesuffix(".nrrd")]  # cropped
    finally:
        starting.close()  # stops the server


@pytest.fixture(scope="module")
def stock_server(tmp_path_factory, pacs):
    tmp = tmp_path_factory.mktemp("pacs_stock")
    app = tmp / "monaibundle"
    shutil.copytree(Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle", app)
    shutil.copytree(BUNDLE, app / "model" / "ic_moe", ignore=shutil.ignore_patterns("eval", "logs"))
    conf = {"models": "ic_moe", "zoo_source": "github", "sam2": "false", "preload": "false", "skip_trainers": "true"}
    env = _server_env(pacs, tmp, MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{"Modality": "MR"}',
                      MONAI_LABEL_DICOMWEB_CACHE_EXPIRY="30")  # fmt: skip
    yield from start_server(tmp, pacs.dicomweb, app, conf, env)


def test_stock_app_starts_offline_and_infers_from_the_pacs(stock_server, series, tmp_path):
    uid, files = series["hippocrop"]
    out = _labels(stock_server.infer("ic_moe", uid), tmp_path / "stock.nii.gz")
    reference = read_dicom_series(files)
    assert out.shape == tuple(reference.shape)
    np.testing.assert_allclose(out.affine, np.asarray(reference.affine), atol=1e-4)


def test_listing_settings_a_user_setting_wins(monkeypatch):
    """The series filter: --conf, else MONAI Label's setting when the user set it, else the bundle's modality; the
    list lifetime likewise, with 30 s as the app's default (MONAI Label's is 7200 s)."""
    from ic_moe_monai.label import dicomweb

    monkeypatch.setattr(dicomweb, "_user_set", lambda name: False)
    assert dicomweb.cache_expiry({}) == (30.0, "the app's default")
    assert dicomweb.search_filters({}, BUNDLE) == ([{"Modality": "MR"}], "the bundle's modality (MR)")
    both = dicomweb.search_filters({"dicomweb_search_filter": '[{"Modality": "CT"}, {"Modality": "MR"}]'}, BUNDLE)
    assert both[0] == [{"Modality": "CT"}, {"Modality": "MR"}]
    monkeypatch.setattr(dicomweb, "_user_set", lambda name: True)
    monkeypatch.setattr(dicomweb.settings, "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", 600)
    monkeypatch.setattr(dicomweb.settings, "MONAI_LABEL_DICOMWEB_SEARCH_FILTER", {"Modality": "CT"})
    assert dicomweb.cache_expiry({}) == (600.0, "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY")
    assert dicomweb.search_filters({}, BUNDLE)[0] == [{"Modality": "CT"}]
    assert dicomweb.cache_expiry({"dicomweb_cache_expiry": "5"}) == (5.0, "--conf dicomweb_cache_expiry")
    for bad in ("-1", "soon"):
        with pytest.raises(ValueError, match="dicomweb_cache_expiry must be a number of seconds"):
            dicomweb.cache_expiry({"dicomweb_cache_expiry": bad})
    with pytest.raises(ValueError, match="dicomweb_search_filter is not JSON"):
        dicomweb.search_filters({"dicomweb_search_filter": "Modality=MR"}, BUNDLE)


def test_a_user_setting_is_told_from_monai_labels_default():
    """``monailabel start_server`` exports every setting before the app starts; the settings object still knows
    which ones the user gave."""
    code = (
        "from ic_moe_monai.label.dicomweb import _user_set as given\n"
        "print(given('MONAI_LABEL_DICOMWEB_SEARCH_FILTER'), given('MONAI_LABEL_DICOMWEB_CACHE_EXPIRY'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    given = subprocess.run([sys.executable, "-c", code], env={**env, "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "5"},
                           capture_output=True, text=True, timeout=300, cwd="/")  # fmt: skip
    assert given.stdout.split() == ["False", "True"], given.stderr[-2000:]
