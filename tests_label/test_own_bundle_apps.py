"""A bundle made by ``init_bundle`` for other labels, served by both MONAI Label apps with no task option: ``/info``
gives its label names."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import requests
import torch

from ic_moe_monai.bundles.initialize import init_bundle
from ic_moe_monai.label import make_app_folder
from ic_moe_monai.networks import ICMoE
from ic_moe_monai.networks.checkpoints import StampedWeights, checkpoint_info
from tests.helpers import make_ct_task

from .conftest import start_server

ORGANS = {"liver": 1, "spleen": 2, "kidney": 3}


@pytest.fixture(scope="module")
def organ_bundle(tmp_path_factory) -> Path:
    """A bundle for liver, spleen and kidney, with weights as its training would write them (random here)."""
    tmp = tmp_path_factory.mktemp("own")
    data = make_ct_task(tmp / "AbdomenPhantom", count=5)
    bundle = init_bundle(data, tmp / "organs", profile="lite", from_bundle="none").bundle  # the network below
    info = checkpoint_info({0: "background", **{v: k for k, v in ORGANS.items()}}, "ct", "abdomen", img_size=64)
    network = ICMoE(num_classes=3, img_size=64, encoder="lite")
    torch.save(StampedWeights(network, info).state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def ours(tmp_path_factory, studies, organ_bundle):
    tmp = tmp_path_factory.mktemp("ours_organs")
    app = make_app_folder(tmp / "apps" / "ic_moe")
    yield from start_server(tmp, studies, app, {"bundle": str(organ_bundle), "skip_trainers": "true"})


@pytest.fixture(scope="module")
def stock(tmp_path_factory, studies, organ_bundle):
    tmp = tmp_path_factory.mktemp("stock_organs")
    sample_app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    app = tmp / "monaibundle"
    shutil.copytree(sample_app, app)
    shutil.copytree(organ_bundle, app / "model" / "organs")
    conf = {"models": "organs", "zoo_source": "github", "sam2": "false", "preload": "false"}
    yield from start_server(tmp, studies, app, conf)


def test_the_ic_moe_app_names_the_bundles_labels(ours):
    info = requests.get(f"{ours.url}/info/", timeout=30).json()
    assert info["models"]["ic_moe"]["labels"] == ORGANS
    assert info["models"]["ic_moe_interactive"]["labels"] == ORGANS


def test_the_stock_app_names_the_bundles_labels(stock):
    info = requests.get(f"{stock.url}/info/", timeout=30).json()
    assert info["models"]["organs"]["labels"] == ORGANS
