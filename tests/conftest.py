"""Shared fixtures: real data from ../shared/data and SAM-format checkpoints made from segment_anything's builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real data folder: $IC_MOE_SHARED_DATA, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("IC_MOE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set IC_MOE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def hippocampus_dir(shared_data: Path) -> Path:
    return shared_data / "msd_hippocampus"


@pytest.fixture(scope="session")
def sam_vit_b_state() -> dict[str, torch.Tensor]:
    """A state dict in SAM's exact format, from segment_anything's own vit_b builder (random weights)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(1234)
    sam = sam_model_registry["vit_b"]()
    # rel_pos tables are zero-initialised by SAM; give them values so interpolation and copying are visible
    for name, p in sam.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.02)
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


@pytest.fixture(scope="session")
def sam_vit_b_checkpoint(tmp_path_factory, sam_vit_b_state) -> Path:
    """The vit_b state dict saved exactly as the official ``sam_vit_b_01ec64.pth`` is (a plain torch.save)."""
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam_vit_b_state, path)
    return path


from tests.orthanc import orthanc_server  # noqa: E402, F401 (the session's Orthanc PACS, for tests that need one)
