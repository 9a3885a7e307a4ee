"""Weights that carry what they were trained for, the one-line refusal of weights trained for something else, and
fine-tuning from one label set to another."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks import ICMoE
from ic_moe_monai.networks.checkpoints import (
    BundleCheckpointLoader,
    CheckpointMismatchError,
    StampedWeights,
    check_checkpoint,
    checkpoint_info,
    read_info,
    refuse_shipped_model,
    with_info,
)
from ic_moe_monai.networks.fine_tuning import load_pretrained_weights

from .helpers import BUNDLE

HIPPOCAMPUS = {0: "background", 1: "anterior", 2: "posterior"}
ORGANS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}


def _net(classes: int, seed: int) -> ICMoE:
    torch.manual_seed(seed)
    return ICMoE(num_classes=classes, img_size=32, encoder="lite")


def test_info_survives_save_and_weights_only_load_and_loads_everywhere(tmp_path):
    """model.pt stays a plain state dict: MONAI's CheckpointLoader and load_state_dict take it; the info rides in
    PyTorch's own metadata."""
    info = checkpoint_info(ORGANS, "ct", "abdomen", "neighbors", 32)
    assert info["num_classes"] == 3 and info["preprocessing"]["ct_window"] == [40.0, 400.0]
    net = _net(3, 0)
    torch.save(StampedWeights(net, info).state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert read_info(state) == info
    fresh = _net(3, 1)
    CheckpointLoader(str(tmp_path / "model.pt"), {"model": fresh})(Engine(lambda e, b: None))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    _net(3, 2).load_state_dict(state)  # strict


def test_mismatch_is_one_line_naming_file_both_sides_and_what_to_do():
    organs = checkpoint_info(ORGANS, "ct", "abdomen", img_size=32)
    state = with_info(_net(3, 0).state_dict(), organs)
    check_checkpoint(state, organs, "models/model.pt")  # the same: fine
    hippocampus = checkpoint_info(HIPPOCAMPUS, "mr", img_size=32)
    with pytest.raises(CheckpointMismatchError) as caught:
        check_checkpoint(state, hippocampus, "models/model.pt")
    message = str(caught.value)
    assert "\n" not in message and "models/model.pt" in message and "liver, spleen, kidney" in message
    assert "anterior, posterior" in message and "classes and preprocessing differ" in message
    assert "init_bundle" in message
    other_window = checkpoint_info(ORGANS, "ct", [50, 350], img_size=32)
    with pytest.raises(CheckpointMismatchError, match="preprocessing differ"):
        check_checkpoint(state, other_window, "x.pt")
    # a plain state dict (e.g. the shipped model): its class count, from its shapes
    check_checkpoint(_net(2, 0).state_dict(), hippocampus, "plain.pt")
    with pytest.raises(CheckpointMismatchError, match=r"plain\.pt has 3 classes"):
        check_checkpoint(_net(3, 0).state_dict(), hippocampus, "plain.pt")


def test_bundle_checkpoint_loader_refuses_when_attached(tmp_path):
    torch.save(with_info(_net(3, 0).state_dict(), checkpoint_info(ORGANS, "ct", img_size=32)), tmp_path / "m.pt")
    engine = Engine(lambda e, b: None)
    loader = BundleCheckpointLoader(str(tmp_path / "m.pt"), {"model": _net(2, 0)}, checkpoint_info(HIPPOCAMPUS))
    with pytest.raises(CheckpointMismatchError, match=r"m\.pt was trained for 3 classes"):
        loader.attach(engine)  # before the engine runs
    with pytest.raises(ConfigError, match="no such file"):
        BundleCheckpointLoader(str(tmp_path / "none.pt"), {"model": _net(2, 0)}).attach(engine)
    target = _net(3, 1)
    BundleCheckpointLoader(str(tmp_path / "m.pt"), {"model": target}, checkpoint_info(ORGANS, "ct", img_size=32))(
        engine
    )
    assert torch.equal(target.mask_decoder.mask_tokens.weight, _net(3, 0).mask_decoder.mask_tokens.weight)


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "code", "list"])
def test_bundle_checkpoint_loader_refuses_unreadable_files_in_one_line(tmp_path, kind, capsys):
    path = tmp_path / "model.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(_net(2, 0).state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "code":
        torch.save({"model": _RunsCode()}, path)
    else:
        torch.save([torch.zeros(2)], path)
    loader = BundleCheckpointLoader(str(path), {"model": _net(2, 0)}, checkpoint_info(HIPPOCAMPUS))
    with pytest.raises(ConfigError, match=r"^checkpoint .*model\.pt: not a (file that torch\.load|checkpoint)"):
        loader.attach(Engine(lambda e, b: None))
    assert "unpickling ran code" not in capsys.readouterr().out


def test_a_corrupt_model_in_run_inference_is_one_line(tmp_path):
    """``python -m monai.bundle run inference --ckpt_path <corrupt>``: one line naming the file, no traceback."""
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 truncated zip")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
           "--bundle_root", str(BUNDLE), "--ckpt_path", str(tmp_path / "model.pt"),
           "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: checkpoint {tmp_path / 'model.pt'}: not a file that torch.load(weights_only=True) reads" in (
        result.stderr
    )


def test_fine_tuning_to_other_labels_loads_what_fits_and_renews_class_parts(tmp_path):
    source = _net(2, 0)
    torch.save(with_info(source.state_dict(), checkpoint_info(HIPPOCAMPUS, img_size=32)), tmp_path / "shipped.pt")
    target, fresh = _net(3, 1), _net(3, 1)  # the same initialisation: "re-initialised" = left as built
    info = checkpoint_info(ORGANS, "ct", img_size=32)
    report = load_pretrained_weights(target, tmp_path / "shipped.pt", info, tmp_path / "report.json")
    got, src, new = target.state_dict(), source.state_dict(), fresh.state_dict()
    assert torch.equal(got["image_encoder.patch_embed.proj.weight"], src["image_encoder.patch_embed.proj.weight"])
    tokens = "mask_decoder.mask_tokens.weight"
    assert torch.equal(got[tokens][0], src[tokens][0])  # background kept
    assert torch.equal(got[tokens][1:], new[tokens][1:])  # liver, spleen, kidney start afresh
    for part in ("moe_layers.3.experts.0.classifier.weight", "moe_layers.3.experts.2.prototypes"):
        assert torch.equal(got[part][0], src[part][0]) and torch.equal(got[part][1:], new[part][1:])
    hyper = "mask_decoder.output_hypernetworks_mlps.{}.layers.0.weight"
    assert torch.equal(got[hyper.format(0)], src[hyper.format(0)])
    assert torch.equal(got[hyper.format(1)], new[hyper.format(1)])  # the shape fits, but it was anterior's
    assert report.class_sources == {0: 0} and report.new_classes == [1, 2, 3]
    assert tokens in report.reinitialised and "image_encoder.patch_embed.proj.weight" in report.loaded
    lines = "\n".join(report.lines({int(k): v for k, v in info["label_names"].items()}))
    assert "re-initialised for: liver, spleen, kidney" in lines and "MR normalisation" in lines
    written = json.loads((tmp_path / "report.json").read_text())
    assert tokens in written["reinitialised"] and written["new_classes"] == [1, 2, 3]


def test_fine_tuning_keeps_the_classes_both_label_sets_name(tmp_path):
    source = _net(2, 0)
    torch.save(with_info(source.state_dict(), checkpoint_info(HIPPOCAMPUS, img_size=32)), tmp_path / "s.pt")
    target = _net(2, 1)
    info = checkpoint_info({0: "background", 1: "Posterior", 2: "tail"}, img_size=32)
    report = load_pretrained_weights(target, tmp_path / "s.pt", info)
    tokens = "mask_decoder.mask_tokens.weight"
    assert torch.equal(target.state_dict()[tokens][1], source.state_dict()[tokens][2])  # by name, any case
    assert report.class_sources == {0: 0, 1: 2} and report.new_classes == [2]
    hyper = "mask_decoder.output_hypernetworks_mlps.{}.layers.2.bias"
    assert torch.equal(target.state_dict()[hyper.format(1)], source.state_dict()[hyper.format(2)])


def test_fine_tuning_plain_checkpoints_and_what_does_not_fit(tmp_path):
    state = _net(2, 0).state_dict()
    for name, saved in (("plain.pt", state), ("checkpoint.pt", {"model": state}),
                        ("ddp.pt", {f"module.{k}": v for k, v in state.items()})):  # fmt: skip
        torch.save(saved, tmp_path / name)
        target = _net(2, 1)
        report = load_pretrained_weights(target, tmp_path / name, checkpoint_info(HIPPOCAMPUS, img_size=32))
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())  # same count: all loaded
        assert any("names no labels" in n for n in report.notes)
    assert load_pretrained_weights(_net(2, 0), None) is False
    from monai.networks.nets import UNet

    torch.save(UNet(2, 3, 3, (4, 8), (2,)).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(ValueError, match=r"unet\.pt do not fit the network"):
        load_pretrained_weights(_net(2, 0), tmp_path / "unet.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_pretrained_weights(_net(2, 0), tmp_path / "missing.pt")


def test_the_shipped_model_is_refused_as_a_training_target(tmp_path):
    with pytest.raises(ConfigError, match=r"write over the shipped model.*init_bundle"):
        refuse_shipped_model(BUNDLE / "models")
    with pytest.raises(ConfigError):
        refuse_shipped_model(BUNDLE / "configs" / ".." / "models")
    assert refuse_shipped_model(tmp_path / "models") is True


def test_the_shipped_model_loads_with_the_shipped_configs():
    """The shipped model.pt (a plain state dict, unchanged) passes the bundle's own check."""
    from ic_moe_monai.inference.predictor import BundleSegmenter

    segmenter = BundleSegmenter(BUNDLE)
    assert segmenter.label_names == HIPPOCAMPUS and segmenter.checkpoint_info["num_classes"] == 2
