"""Bundles made before the package was arranged by stage keep working.

``tests/data/bundle_made_before_stage_layout`` is what ``init_bundle`` wrote before the move (commit 0f01509, a CT
task with liver, spleen and kidney, ``--from_bundle none``), its dataset path replaced by a placeholder. Its configs
name the old module paths (``ic_moe_monai.engines``, ``ic_moe_monai.checkpoints``, ``ic_moe_monai.data.datalist``).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from monai.bundle import ConfigParser

from ic_moe_monai._moved import MOVED_MODULES, MOVED_NAMES, current_paths

from .conftest import REPO_ROOT
from .helpers import make_ct_task

LEGACY = Path(__file__).parent / "data" / "bundle_made_before_stage_layout"
OLD_PATH = re.compile(r"\bic_moe_monai\.(" + "|".join(MOVED_MODULES) + r")\b")
SHORT = ["--max_epochs", "1", "--steps_per_epoch", "2", "--volumes_per_batch", "2", "--slices_per_volume", "2",
         "--num_workers", "0", "--cache_rate", "0"]  # fmt: skip


def test_the_fixture_names_the_old_paths():
    text = (LEGACY / "configs" / "train.json").read_text()
    assert {"engines", "checkpoints", "handlers", "transforms"} <= set(OLD_PATH.findall(text))
    assert "ic_moe_monai.data.datalist" in text


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_is_the_new_module(old):
    new = importlib.import_module(f"ic_moe_monai.{MOVED_MODULES[old]}")
    assert importlib.import_module(f"ic_moe_monai.{old}") is new


def test_old_paths_resolve_in_a_fresh_interpreter():
    """As MONAI resolves them: ``_target_`` by import, ``$`` expressions after ``$import ic_moe_monai``."""
    code = ("import pydoc\n"
            "import ic_moe_monai\n"
            "import ic_moe_monai.training.engines as new\n"
            "assert ic_moe_monai.engines.adamw is new.adamw\n"
            "fine_tuning = ic_moe_monai.checkpoints.load_pretrained_weights.__module__\n"
            "assert fine_tuning == 'ic_moe_monai.networks.fine_tuning', fine_tuning\n"
            "assert ic_moe_monai.data.datalist.__module__ == 'ic_moe_monai.data.datasets'\n"
            "assert pydoc.locate('ic_moe_monai.inferers.SliceContextInferer') is not None\n"
            "assert new.__spec__.name == 'ic_moe_monai.training.engines', new.__spec__.name\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_current_paths_rewrites_old_paths_only():
    text = (LEGACY / "configs" / "train.json").read_text()
    rewritten = current_paths(text)
    assert not OLD_PATH.search(rewritten) and "ic_moe_monai.data.datalist" not in rewritten
    assert current_paths(rewritten) == rewritten
    for old, new in MOVED_NAMES.items():
        assert current_paths(f"$ic_moe_monai.{old}(x)") == f"$ic_moe_monai.{new}(x)"
    shipped = [p.read_text() for p in (REPO_ROOT / "bundle" / "configs").glob("*.json")]
    assert all(current_paths(t) == t for t in shipped), "the shipped configs use the current paths"


def test_every_component_of_the_old_configs_instantiates(tmp_path):
    bundle = Path(shutil.copytree(LEGACY, tmp_path / "organs"))
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json")])
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    assert type(network).__module__ == "ic_moe_monai.networks.ic_moe"
    loss = parser.get_parsed_content("loss")
    assert type(loss).__module__.startswith("ic_moe_monai.training.")


def _run(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_a_bundle_made_before_the_move_trains_infers_segments_and_exports(tmp_path):
    data = make_ct_task(tmp_path / "AbdomenPhantom", count=5)
    bundle = Path(shutil.copytree(LEGACY, tmp_path / "organs"))
    (bundle / "models").mkdir(exist_ok=True)
    log = _run("-m", "monai.bundle", "run", "training", "--config_file", f"{bundle}/configs/train.json",
               "--bundle_root", str(bundle), "--dataset_dir", str(data), *SHORT)  # fmt: skip
    assert "training finished after epoch 1" in log and (bundle / "models" / "model.pt").is_file()

    _run("-m", "monai.bundle", "run", "evaluating", "--config_file",
         f"['{bundle}/configs/train.json','{bundle}/configs/evaluate.json']", "--bundle_root", str(bundle),
         "--dataset_dir", str(data), "--num_workers", "0")  # fmt: skip
    assert (bundle / "eval" / "metrics_summary.json").is_file()

    _run("-m", "monai.bundle", "run", "inference", "--config_file", f"{bundle}/configs/inference.json",
         "--bundle_root", str(bundle), "--dataset_dir", str(data / "imagesTs"),
         "--output_dir", str(tmp_path / "out"))  # fmt: skip
    inferred = nib.load(tmp_path / "out" / "phantom_005.nii.gz")
    assert inferred.shape == nib.load(data / "imagesTs" / "phantom_005.nii.gz").shape

    _run("-m", "ic_moe_monai", "segment", str(data / "imagesTs"), str(tmp_path / "segmented"), "--bundle", str(bundle),
         "--quiet")  # fmt: skip
    report = json.loads((tmp_path / "segmented" / "report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["done"]

    exported = tmp_path / "exported"
    _run("-m", "ic_moe_monai", "export_bundle", str(bundle), str(exported))
    for config in (exported / "configs").glob("*.json"):
        text = config.read_text()
        assert not re.search(r"\bscripts\.(" + "|".join(MOVED_MODULES) + r")\b", text), config.name
        assert "scripts.data.datalist(" not in text, config.name
