"""Inference-time options: mirror test-time augmentation, checkpoint ensembles and largest-component cleaning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage
from torch import nn

from ic_moe_monai.inference.postprocessing import KeepLargestComponentd, keep_largest_component
from ic_moe_monai.networks import AveragedPrediction, ICMoE, load_network_copy


class _Asymmetric(nn.Module):
    """Logits that depend on position, so mirroring changes the answer: class 1 grows to the right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1]).expand_as(x[:, :1])
        return torch.cat([torch.zeros_like(ramp), ramp * 5 + x[:, 1:2]], dim=1)


def test_averaged_prediction_is_identity_for_one_network_and_no_mirroring():
    net = _Asymmetric()
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(AveragedPrediction(net)(x), net(x))


def test_mirroring_averages_probabilities_of_flipped_inputs():
    net = _Asymmetric()
    x = torch.rand(2, 3, 8, 8)
    out = AveragedPrediction(net, mirror_axes=(1,))(x)
    expected = (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1).flip(3)) / 2
    torch.testing.assert_close(out.exp(), expected)
    # the averaged prediction commutes with the mirror, although the network does not
    averaged = AveragedPrediction(net, mirror_axes=(1,))
    torch.testing.assert_close(averaged(x.flip(3)), out.flip(3))
    assert not torch.allclose(net(x.flip(3)), net(x).flip(3))
    assert len(AveragedPrediction(net, mirror_axes=(0, 1)).flips) == 4
    with pytest.raises(ValueError, match="in-plane axes"):
        AveragedPrediction(net, mirror_axes=(2,))


def test_ensemble_of_checkpoints_averages_members(tmp_path):
    torch.manual_seed(0)
    base = ICMoE(num_classes=2, img_size=32, encoder="lite").eval()
    other = ICMoE(num_classes=2, img_size=32, encoder="lite").eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "fold1.pt"
    torch.save(other.state_dict(), path)
    member = load_network_copy(base, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = AveragedPrediction([base, member])(x)
        expected = (torch.softmax(base(x), 1) + torch.softmax(other(x), 1)) / 2
    torch.testing.assert_close(out.exp(), expected, atol=1e-5, rtol=1e-4)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt: not a readable"):
        load_network_copy(base, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no such file"):
        load_network_copy(base, tmp_path / "missing.pt")


def test_keep_largest_component_per_label():
    labels = np.zeros((1, 20, 20, 10), dtype=np.uint8)
    labels[0, 2:8, 2:8, 2:6] = 1  # the large component of label 1
    labels[0, 15:17, 15:17, 8:9] = 1  # a stray island of label 1
    labels[0, 10:12, 2:4, 2:4] = 2  # label 2: one component, kept
    labels[0, 18, 0, 0] = 2  # and an island
    cleaned = keep_largest_component(labels)
    assert cleaned[0, 15:17, 15:17, 8].sum() == 0 and cleaned[0, 18, 0, 0] == 0
    assert (cleaned == 1).sum() == 6 * 6 * 4 and (cleaned == 2).sum() == 8
    only_two = keep_largest_component(labels, applied_labels=[2])
    assert (only_two == 1).sum() == (labels == 1).sum()
    # diagonal neighbours join with connectivity 3, not with 1
    diagonal = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    diagonal[0, 0, 0, 0] = diagonal[0, 1, 1, 1] = diagonal[0, 3, 3, 3] = 1
    assert (keep_largest_component(diagonal, connectivity=3) == 1).sum() == 2
    assert (keep_largest_component(diagonal, connectivity=1) == 1).sum() == 1


def test_keep_largest_componentd_keeps_meta_and_can_be_switched_off():
    labels = torch.zeros(1, 10, 10, 5, dtype=torch.uint8)
    labels[0, 1:4, 1:4, 1:3] = 1
    labels[0, 8, 8, 4] = 1
    image = MetaTensor(labels, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = KeepLargestComponentd("pred")({"pred": image})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert out.dtype == torch.uint8 and int(out.sum()) == 18
    assert int(image.sum()) == 19  # the input is not changed in place
    off = KeepLargestComponentd("pred", enabled=False)({"pred": image})["pred"]
    assert off is image


def test_inferer_mirroring_averages_and_can_be_skipped_per_call():
    from ic_moe_monai.inference.inferers import SliceContextInferer

    net = _Asymmetric()
    volume = torch.rand(1, 1, 8, 8, 5)
    plain = SliceContextInferer(img_size=8, batch_size=2)
    mirrored = SliceContextInferer(img_size=8, batch_size=2, mirror_axes=(0, 1))
    with torch.no_grad():
        out = mirrored(volume, net)
        skipped = mirrored(volume, net, mirror=False)
        reference = plain(volume, net)
    torch.testing.assert_close(skipped, reference)
    assert not torch.allclose(out, reference)
    flipped = SliceContextInferer(img_size=8, batch_size=2, mirror_axes=(0, 1))(volume.flip(2), net)
    torch.testing.assert_close(flipped, out.flip(2), atol=1e-5, rtol=1e-5)  # mirror-equivariant, unlike the net


@pytest.mark.slow
def test_bundle_commands_switch_the_options_on(tmp_path):
    """run inference, run evaluating and segment take each option on the command line; the outputs still fit."""
    import nibabel as nib

    from ic_moe_monai.segment import segment

    from .helpers import BUNDLE, CONFIGS
    from .test_bundle import bundle_cli

    on = ["--tta_mirror", "true", "--keep_largest_component", "true"]
    bundle_cli("run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE),
               "--output_dir", str(tmp_path / "plain"))  # fmt: skip
    bundle_cli("run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE),
               "--output_dir", str(tmp_path / "on"), *on)  # fmt: skip
    for case in ("hippocampus_003", "hippocampus_007"):
        plain = nib.load(tmp_path / "plain" / f"{case}.nii.gz")
        both = nib.load(tmp_path / "on" / f"{case}.nii.gz")
        assert both.shape == plain.shape and np.allclose(both.affine, plain.affine)
        labels = np.asarray(both.dataobj)
        assert {1, 2} <= set(np.unique(labels).tolist())
        for value in (1, 2):  # one connected component per label is left
            assert ndimage.label(labels == value, np.ones((3, 3, 3)))[1] == 1
    report = segment(str(BUNDLE / "sample_data"), str(tmp_path / "seg"), bundle=str(BUNDLE), device="cpu",
                     tta=True, keep_largest_component=True, quiet=True)  # fmt: skip
    assert report.exit_code == 0
    assert report.settings["tta_mirror"] is True and report.settings["keep_largest_component"] is True
    for case in ("hippocampus_003", "hippocampus_007"):
        ours = np.asarray(nib.load(tmp_path / "seg" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(ours, np.asarray(nib.load(tmp_path / "on" / f"{case}.nii.gz").dataobj))


@pytest.mark.parametrize("names", [("inference.json",), ("train.json", "evaluate.json")])
def test_configs_build_the_options(names):
    from .helpers import CONFIGS

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    parser["device"] = "$torch.device('cpu')"
    # the defaults are what fold-0 validation kept (benchmarks/inference_options.py): no mirroring, cleaning on
    assert len(parser.get_parsed_content("inferer").flips) == 1
    assert parser.get_parsed_content("keep_largest_component") is True
    parser["tta_mirror"] = True
    inferer = parser.get_parsed_content("inferer")
    assert inferer.flips == [(), (2,)]  # left-right only: mirroring A-P would swap anterior and posterior
    cleaning = [t for t in parser.get_parsed_content("postprocessing").transforms if hasattr(t, "connectivity")]
    assert len(cleaning) == 1 and cleaning[0].enabled
    assert isinstance(parser.get_parsed_content("prediction_network"), AveragedPrediction)


def test_mirroring_leaves_a_mirror_symmetric_network_unchanged():
    from ic_moe_monai.inference.inferers import SliceContextInferer

    from .helpers import ThresholdNet

    volume = torch.rand(1, 1, 12, 12, 4)  # the network's size: no resizing, whose rounding could tip near-ties
    plain = SliceContextInferer(img_size=12, batch_size=3, argmax=True)(volume, ThresholdNet())
    mirrored = SliceContextInferer(img_size=12, batch_size=3, argmax=True, mirror_axes=(0, 1))(volume, ThresholdNet())
    assert torch.equal(plain, mirrored)
