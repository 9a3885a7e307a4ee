"""The IC-MoE MONAI Label app: automatic and interactive inference, the second-click speed-up, load, 4xx answers,
uploads and sessions, hostile images, clicks and ids, one training run at a time."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import requests

from ic_moe_monai.label import make_app_folder

from .conftest import BUNDLE, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, studies):
    tmp = tmp_path_factory.mktemp("ours")
    bundle = tmp / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "logs"))
    app = make_app_folder(tmp / "apps" / "ic_moe")
    yield from start_server(tmp, studies, app, {"bundle": str(bundle), "max_clicks": "64", "max_image_mb": "1"})


def _labels(response, path):
    assert response.status_code == 200, response.text[:500]
    path.write_bytes(response.content)
    image = nib.load(path)
    return np.asarray(image.dataobj).astype(np.uint8), image.affine


def test_info_and_automatic_inference(server, tmp_path):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert set(info["models"]) == {"ic_moe", "ic_moe_interactive"}
    assert info["models"]["ic_moe_interactive"]["type"] == "deepgrow"
    assert info["models"]["ic_moe_interactive"]["labels"] == {"anterior": 1, "posterior": 2}
    assert info["models"]["ic_moe"]["dimension"] == 3 and info["models"]["ic_moe_interactive"]["dimension"] == 3
    auto, affine = _labels(server.infer("ic_moe", "hippocampus_003"), tmp_path / "auto.nii.gz")
    study = nib.load(server.studies / "hippocampus_003.nii.gz")
    assert auto.shape == study.shape
    np.testing.assert_allclose(affine, study.affine, atol=1e-4)
    plain, affine = _labels(server.infer("ic_moe_interactive", "hippocampus_003"), tmp_path / "plain.nii.gz")
    np.testing.assert_allclose(affine, study.affine, atol=1e-4)
    assert (plain == auto).mean() >= 0.999  # no clicks: the automatic answer


def test_the_answer_carries_the_quality_score(server):
    """A viewer can show how far to trust the answer: its params hold the case's quality (the shipped bundle is
    calibrated), for both models, the same for the automatic answer and a refined one of the same image."""
    answers = []
    for model, params in (("ic_moe_interactive", {}), ("ic_moe_interactive", {"foreground": [[10, 20, 15]],
                                                                             "label": "anterior"}), ("ic_moe", {})):
        answer = requests.post(f"{server.url}/infer/{model}", params={"image": "hippocampus_003", "output": "json"},
                               files={"params": (None, json.dumps(params))}, timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text[:500]
        answers.append(answer.json()["quality"])
    quality = answers[0]
    assert 0.0 <= quality["score"] <= 1.0 and set(quality["labels"]) == {"anterior", "posterior"}
    assert isinstance(quality["flagged"], bool) and isinstance(quality["reasons"], list)
    assert answers[1] == quality  # the score is of the automatic answer, which clicks refine
    assert answers[2]["score"] == pytest.approx(quality["score"], abs=0.05)  # the bundle task: the same network


def test_clicks_refine_near_them_and_second_click_is_fast(server, tmp_path):
    image = "hippocampus_007"
    start = time.perf_counter()
    auto, _ = _labels(server.infer("ic_moe_interactive", image), tmp_path / "auto.nii.gz")
    first_s = time.perf_counter() - start  # embeds every slice: the first request on an image
    background = np.argwhere(auto == 0)
    centre = np.array(auto.shape) / 2
    x, y, z = (int(v) for v in background[np.argmin(np.abs(background - centre).sum(axis=1))])
    start = time.perf_counter()
    clicked, _ = _labels(server.infer("ic_moe_interactive", image, {"foreground": [[x, y, z]], "label": "anterior"}),
                         tmp_path / "clicked.nii.gz")  # fmt: skip
    second_s = time.perf_counter() - start
    assert clicked[x, y, z] == 1
    changed = np.argwhere(clicked != auto)
    assert len(changed) and set(changed[:, 2]) == {z}  # the clicked slice only (the image is stored in RAS) ...
    reach = max(5.0, 0.15 * max(auto.shape[:2]))
    assert (np.hypot(changed[:, 0] - x, changed[:, 1] - y) <= reach).all()  # ... and near the click
    assert first_s / second_s >= 5, (first_s, second_s)


def test_concurrent_requests_in_both_models(server, tmp_path):
    expected = {
        model: _labels(server.infer(model, "hippocampus_003"), tmp_path / f"{model}.nii.gz")[0]
        for model in ("ic_moe", "ic_moe_interactive")
    }
    models = ["ic_moe", "ic_moe_interactive"] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda m: server.infer(m, "hippocampus_003"), models))
    for i, (model, response) in enumerate(zip(models, responses, strict=True)):
        labels, _ = _labels(response, tmp_path / f"c{i}.nii.gz")
        np.testing.assert_array_equal(labels, expected[model])


def test_bad_requests_get_4xx_and_the_server_goes_on(server):
    unknown = server.infer("ic_moe", "no_such_image")
    assert unknown.status_code == 404 and "not in the datastore" in unknown.json()["detail"]
    for clicks, message in (({"foreground": [[1, 2]]}, "three numbers"),
                            ({"foreground": "here"}, "must be a list"),
                            ({"background": [[999, 0, 0]]}, "outside the image"),
                            ({"foreground": [[1, 2, 3]], "label": "liver"}, "not one of")):  # fmt: skip
        answer = server.infer("ic_moe_interactive", "hippocampus_003", clicks)
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert server.infer("no_model", "hippocampus_003").status_code == 404
    assert server.infer("ic_moe_interactive", "hippocampus_003").status_code == 200  # still serving


MODELS = ("ic_moe", "ic_moe_interactive")


def _upload(server, model, name, content, params=None, timeout=300):
    files = {"file": (name, content), "params": (None, json.dumps(params or {}))}
    return requests.post(f"{server.url}/infer/{model}", params={"output": "image"}, files=files, timeout=timeout)


@pytest.mark.parametrize("model", MODELS)
def test_uploaded_file_and_session_are_segmented(server, tmp_path, model):
    """3D Slicer's routes: an image sent with the request, or once to a session and then referred to by its id."""
    study = server.studies / "hippocampus_003.nii.gz"
    reference, _ = _labels(server.infer(model, "hippocampus_003"), tmp_path / "ref.nii.gz")
    uploaded, affine = _labels(_upload(server, model, "study.nii.gz", study.read_bytes()), tmp_path / "up.nii.gz")
    np.testing.assert_array_equal(uploaded, reference)
    np.testing.assert_allclose(affine, nib.load(study).affine, atol=1e-4)
    session = requests.put(f"{server.url}/session/", files=[("files", ("study.nii.gz", study.read_bytes()))],
                           timeout=60)  # fmt: skip
    assert session.status_code == 200, session.text
    answer = requests.post(f"{server.url}/infer/{model}",
                           params={"session_id": session.json()["session_id"], "output": "image"},
                           files={"params": (None, "{}")}, timeout=300)  # fmt: skip
    np.testing.assert_array_equal(_labels(answer, tmp_path / "session.nii.gz")[0], reference)


def _nifti_bytes(tmp_path, data, name="x.nii.gz"):
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_hostile_uploads_get_422_without_server_paths(server, tmp_path):
    bomb = nib.Nifti1Header()
    bomb.set_data_shape((1200, 1200, 1000))
    bomb.set_data_dtype(np.float32)
    volume = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    truncated = _nifti_bytes(tmp_path, volume)[:3000]
    uploads = {
        "bomb.nii.gz": (gzip.compress(bomb.binaryblock + bytes(4)), "truncated or forged header"),
        "big.nii.gz": (_nifti_bytes(tmp_path, np.zeros((80, 80, 80), np.float32)), "over the limit of 1.0 MiB"),
        "flat.nii.gz": (_nifti_bytes(tmp_path, volume[:, :, 0]), "a 2D image"),
        "slice.nii.gz": (_nifti_bytes(tmp_path, volume[:, :, :1]), "a single slice"),
        "series.nii.gz": (_nifti_bytes(tmp_path, np.stack([volume] * 3, axis=-1)), "a 4D image"),
        "complex.nii.gz": (_nifti_bytes(tmp_path, volume.astype(np.complex64)), "complex voxels"),
        "junk.nii.gz": (b"this is not an image", "cannot read the image header"),
        "cut.nii.gz": (truncated, "cannot read the image"),
    }
    for model in MODELS:
        for name, (content, message) in uploads.items():
            answer = _upload(server, model, name, content)
            assert answer.status_code == 422, (model, name, answer.status_code, answer.text[:300])
            detail = answer.json()["detail"]
            assert detail.startswith("the uploaded image: ") and message in detail, (model, name, detail)
            assert "/tmp" not in detail and "tmp" not in detail.split(": ", 1)[1], detail
    assert server.infer("ic_moe", "hippocampus_003").status_code == 200  # still serving


def test_click_flood_and_extreme_coordinates_get_422(server):
    too_many = {"foreground": [[5, 5, 5]] * 40, "background": [[6, 6, 6]] * 25}
    answer = server.infer("ic_moe_interactive", "hippocampus_003", too_many)
    assert answer.status_code == 422 and "65 clicks in one request; at most 64" in answer.json()["detail"]
    for clicks in ([[1e30, 2, 3]], [[10**30, 2, 3]], [[1, 2, -1e308]]):
        answer = server.infer("ic_moe_interactive", "hippocampus_003", {"foreground": clicks})
        assert answer.status_code == 422 and "outside the image" in answer.json()["detail"], answer.text
    edge = server.infer("ic_moe_interactive", "hippocampus_003", {"foreground": [[-0.5, -0.5, -0.5]]})
    assert edge.status_code == 200


def test_ids_that_leave_the_datastore_are_refused(server, tmp_path):
    study = (server.studies / "hippocampus_007.nii.gz").read_bytes()
    for image_id in ("../escaped", "a/../../escaped", "..", "sub/dir"):
        answer = requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                              files={"file": ("x.nii.gz", study), "params": (None, "{}")}, timeout=60)  # fmt: skip
        assert answer.status_code == 422 and "must not contain path separators" in answer.json()["detail"]
    label = requests.put(f"{server.url}/datastore/label", params={"image": "hippocampus_007", "tag": "../../x"},
                         files={"label": ("l.nii.gz", study), "params": (None, "{}")}, timeout=60)  # fmt: skip
    assert label.status_code == 422, label.text
    assert not list(server.studies.parent.glob("escaped*")) and not list(server.studies.parent.glob("x*"))
    fine = requests.put(f"{server.url}/datastore/image", params={"image": "fine_id"},
                        files={"file": ("x.nii.gz", study), "params": (None, "{}")}, timeout=60)  # fmt: skip
    assert fine.status_code == 200 and (server.studies / "fine_id.nii.gz").is_file()
    requests.delete(f"{server.url}/datastore/image", params={"id": "fine_id"}, timeout=60)


def test_a_second_training_run_is_refused_while_one_runs(server):
    def train(_):
        return requests.post(f"{server.url}/train/ic_moe", json={"max_epochs": 2, "device": "cpu"}, timeout=60)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(train, range(2)))
    try:
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text[:200] for a in answers]
        refused = next(a for a in answers if a.status_code == 409)
        assert "a training run is in progress" in refused.json()["detail"]
        assert train(0).status_code == 409  # still running
    finally:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # stop it once its process exists
            status = requests.get(f"{server.url}/train/", timeout=30).json()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                break
            if status.get("status") == "RUNNING":
                requests.delete(f"{server.url}/train/", timeout=30)
            time.sleep(0.5)
