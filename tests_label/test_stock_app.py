"""MONAI Label's stock ``monaibundle`` sample app serves the IC-MoE bundle: info, inference, training, load."""

from __future__ import annotations

import hashlib
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from .conftest import BUNDLE, start_server


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _labelmap(response: requests.Response, path: Path) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text[:500]
    path.write_bytes(response.content)
    return nib.load(path)


@pytest.fixture(scope="module")
def stock_server(tmp_path_factory, studies):
    tmp = tmp_path_factory.mktemp("stock")
    sample_app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    assert sample_app.is_dir(), f"MONAI Label's sample apps are not installed at {sample_app}"
    app = tmp / "monaibundle"
    shutil.copytree(sample_app, app)
    shutil.copytree(BUNDLE, app / "model" / "ic_moe", ignore=shutil.ignore_patterns("eval", "logs"))
    conf = {"models": "ic_moe", "zoo_source": "github", "sam2": "false", "preload": "false"}
    yield from start_server(tmp, studies, app, conf)


def test_info_infer_train_then_infer_with_new_weights(stock_server, tmp_path):
    info = requests.get(f"{stock_server.url}/info/", timeout=30).json()
    assert info["models"]["ic_moe"]["labels"] == {"anterior": 1, "posterior": 2}
    assert "ic_moe" in info["trainers"]

    out = _labelmap(stock_server.infer("ic_moe", "hippocampus_003"), tmp_path / "a.nii.gz")
    study = nib.load(stock_server.studies / "hippocampus_003.nii.gz")
    assert out.shape == study.shape
    np.testing.assert_allclose(out.affine, study.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj)).astype(int)) == {0, 1, 2}

    weights = stock_server.bundle / "models" / "model.pt"
    before = _md5(weights)
    trained = requests.post(f"{stock_server.url}/train/ic_moe", params={"run_sync": "true"},
                            json={"max_epochs": 1, "device": "cpu"}, timeout=900)  # fmt: skip
    assert trained.status_code == 200, trained.text[:500]
    assert _md5(weights) != before  # fine-tuned from the current weights, saved as models/model.pt

    again = _labelmap(stock_server.infer("ic_moe", "hippocampus_003"), tmp_path / "b.nii.gz")
    assert again.shape == study.shape
    assert "Reload model from cache" in stock_server.log.read_text()  # /infer picked up the new weights

    once_more = _md5(weights)  # a second /train trains again (the finished first run is not "resumed")
    trained = requests.post(f"{stock_server.url}/train/ic_moe", params={"run_sync": "true"},
                            json={"max_epochs": 1, "device": "cpu"}, timeout=900)  # fmt: skip
    assert trained.status_code == 200 and _md5(weights) != once_more


def test_concurrent_requests_and_unknown_image(stock_server, tmp_path):
    reference = np.asarray(_labelmap(stock_server.infer("ic_moe", "hippocampus_007"), tmp_path / "r.nii.gz").dataobj)
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: stock_server.infer("ic_moe", "hippocampus_007"), range(8)))
    for i, response in enumerate(responses):
        labels = np.asarray(_labelmap(response, tmp_path / f"c{i}.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, reference)
    unknown = stock_server.infer("ic_moe", "no_such_image")
    assert unknown.status_code == 500  # the stock app's answer (ours answers 404)
    assert requests.get(f"{stock_server.url}/info/", timeout=30).status_code == 200  # still serving
