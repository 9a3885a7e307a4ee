"""On/off settings given on a command line: ``--amp false`` reaches a config as the string ``"false"`` (fire keeps
lowercase words as text), which must turn the setting off, not on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from ic_moe_monai.errors import ConfigError, config_flag
from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.inference.postprocessing import KeepLargestComponentd
from ic_moe_monai.networks import ICMoE

from .conftest import REPO_ROOT
from .helpers import CONFIGS, make_msd_folder


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "FALSE", " no ", "off", "0", "n", np.bool_(False)])
def test_off_values(value):
    assert config_flag(value, "amp") is False


@pytest.mark.parametrize("value", [True, 1, "true", "True", "yes", "on", "1", "t", torch.tensor(True)])
def test_on_values(value):
    assert config_flag(value, "amp") is True


@pytest.mark.parametrize("value", ["flase", "2", 2, 0.5, [], "maybe"])
def test_other_values_are_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match=r"^resume is an on/off setting .*got"):
        config_flag(value, "resume")


def test_components_take_command_line_words():
    assert SliceContextInferer(img_size=64, amp="false").amp is False
    assert KeepLargestComponentd("pred", enabled="false").enabled is False
    frozen = ICMoE(num_classes=2, img_size=64, encoder="lite", freeze_encoder="true")
    trainable = ICMoE(num_classes=2, img_size=64, encoder="lite", freeze_encoder="false")
    assert not any(p.requires_grad for p in frozen.image_encoder.parameters())
    assert all(p.requires_grad for p in trainable.image_encoder.parameters())
    assert ICMoE(num_classes=2, img_size=64, encoder="lite", compile_blocks="false").compile_blocks is False
    tuned = ICMoE(num_classes=2, img_size=64, encoder="lite", compile_blocks="max-autotune")
    assert tuned.compile_blocks == "max-autotune"


@pytest.fixture(scope="module")
def parsed_train(tmp_path_factory, hippocampus_dir):
    """train.json with every on/off setting overridden the way ``monai.bundle run`` passes ``--x false``."""
    task = make_msd_folder(hippocampus_dir, tmp_path_factory.mktemp("flags") / "Task", 6)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    for key in ("amp", "resume", "cuda_graph"):
        parser[key] = "false"
    parser["freeze_encoder"] = "true"
    parser["dataset_dir"] = str(task)
    parser["ckpt_dir"] = str(tmp_path_factory.mktemp("models"))
    parser["cache_rate"] = 0
    return parser


def test_train_config_turns_off_what_the_command_line_turns_off(parsed_train):
    trainer = parsed_train.get_parsed_content("train#trainer")
    assert trainer.amp is False and trainer.cuda_graph is False
    assert parsed_train.get_parsed_content("train#prepare_batch").amp is False
    assert parsed_train.get_parsed_content("train#checkpoints").resume is False
    assert parsed_train.get_parsed_content("validate#inferer").amp is False
    assert parsed_train.get_parsed_content("validate#evaluator").amp is False
    assert parsed_train.get_parsed_content("run_settings")["amp"] is False
    network = parsed_train.get_parsed_content("network_def")
    assert not any(p.requires_grad for p in network.image_encoder.parameters())


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json"])
def test_inference_configs_take_words(config):
    parser = ConfigParser()
    bases = ["train.json"] if config == "evaluate.json" else []
    parser.read_config([str(CONFIGS / name) for name in [*bases, config]])
    parser.update({"amp": "false", "tta_mirror": "true", "keep_largest_component": "no", "dataset_dir": "unused"})
    assert parser.get_parsed_content("inferer").amp is False
    assert len(parser.get_parsed_content("inferer").flips) > 1  # the unmirrored view and the mirrored ones
    keep = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, KeepLargestComponentd)]
    assert len(keep) == 1 and keep[0].enabled is False


def test_a_misspelt_flag_is_one_line(tmp_path):
    """``--keep_largest_component flase`` stops with one line naming the setting, not a traceback."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
           "--bundle_root", str(CONFIGS.parent), "--input_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
           "--keep_largest_component", "flase"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: keep_largest_component is an on/off setting (true or false), got 'flase'." in result.stderr
    assert "Traceback" not in result.stderr
