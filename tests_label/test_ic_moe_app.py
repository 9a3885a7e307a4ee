"""The IC-MoE MONAI Label app: automatic and interactive inference, the second-click speed-up, load, 4xx answers."""

from __future__ import annotations

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
    yield from start_server(tmp, studies, app, {"bundle": str(bundle), "skip_trainers": "true"})


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
    auto, affine = _labels(server.infer("ic_moe", "hippocampus_003"), tmp_path / "auto.nii.gz")
    study = nib.load(server.studies / "hippocampus_003.nii.gz")
    assert auto.shape == study.shape
    np.testing.assert_allclose(affine, study.affine, atol=1e-4)
    plain, affine = _labels(server.infer("ic_moe_interactive", "hippocampus_003"), tmp_path / "plain.nii.gz")
    np.testing.assert_allclose(affine, study.affine, atol=1e-4)
    assert (plain == auto).mean() >= 0.999  # no clicks: the automatic answer


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
