"""Dataset discovery, folds, intensity presets, 2.5D slice sampling and the slice-context inferer."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from ic_moe_monai.data.datasets import DatasetError, case_name, datalist, find_cases, split_folds
from ic_moe_monai.data.transforms import IntensityPresetd, SliceNeighborsd
from ic_moe_monai.inference.inferers import SliceContextInferer, channel_argmax, neighbor_stack
from ic_moe_monai.networks import ICMoE

from .helpers import CONFIGS, make_msd_folder


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------------ discovery
def test_msd_folder_and_folds(tmp_path, hippocampus_dir):
    root = make_msd_folder(hippocampus_dir, tmp_path / "Task04", 10)
    cases = find_cases(root)
    assert len(cases) == 10
    train, val = split_folds(cases, fold=0, num_folds=5)
    assert len(val) == 2 and len(train) == 8
    assert not {c["image"] for c in train} & {c["image"] for c in val}
    # every case is validated in exactly one fold, and the split does not depend on the listing order
    folds = [split_folds(list(reversed(cases)), fold=f, num_folds=5)[1] for f in range(5)]
    assert sorted(c["image"] for fold in folds for c in fold) == sorted(c["image"] for c in cases)
    assert split_folds(list(reversed(cases)), 0, 5)[1] == val
    assert datalist(root, "validation", fold=0, num_folds=5) == val
    assert datalist(root, "training", max_cases=3) == train[:3]


def test_plain_folder_pair_with_nnunet_names(tmp_path):
    for name in ("a", "b", "c"):
        _touch(tmp_path / "images" / f"{name}_0000.nii.gz")
        _touch(tmp_path / "labels" / f"{name}.nii.gz")
    _touch(tmp_path / "images" / ".hidden.nii.gz")
    _touch(tmp_path / "images" / "notes.txt")
    cases = find_cases(tmp_path)
    assert [case_name(c["image"]) for c in cases] == ["a", "b", "c"]
    assert case_name("/x/liver_0000.nii.gz") == "liver" and case_name("/x/_0000.nii.gz") == "_0000"
    assert all(c["label"].endswith(f"labels/{case_name(c['image'])}.nii.gz") for c in cases)


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        find_cases(tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"expected dataset\.json"):
        find_cases(tmp_path)
    _touch(tmp_path / "images" / "a.nii.gz")
    _touch(tmp_path / "labels" / "b.nii.gz")
    with pytest.raises(
        DatasetError, match=r"1 image\(s\) have no label of the same name in labels/, e\.g\. a\.nii\.gz"
    ):
        find_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "x.nii.gz", "label": "y.nii.gz"}]}))
    with pytest.raises(DatasetError, match="do not exist"):
        find_cases(tmp_path)


# ------------------------------------------------------------------------------------------------ transforms
def test_intensity_presets():
    ct = {"image": torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])}
    out = IntensityPresetd("image", modality="ct", window="abdomen")(ct)["image"]
    torch.testing.assert_close(torch.as_tensor(out), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    mr = {"image": torch.arange(1000.0).reshape(1, 10, 10, 10)}
    out = torch.as_tensor(IntensityPresetd("image", modality="mr")(mr)["image"])
    assert out.min() == 0.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="modality"):
        IntensityPresetd("image", modality="pet")


def test_slice_neighbors():
    crop = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3)
    out = SliceNeighborsd("image", label_keys="label")({"image": crop, "label": crop.clone()})
    assert out["image"].shape == (3, 2, 2)
    assert torch.equal(out["image"][0], crop[0, ..., 0]) and torch.equal(out["image"][2], crop[0, ..., 2])
    assert torch.equal(out["label"], crop[..., 1])
    rep = SliceNeighborsd("image", context="repeat")({"image": crop})["image"]
    assert all(torch.equal(rep[i], crop[0, ..., 1]) for i in range(3))
    with pytest.raises(ValueError, match=r"must be \(1, X, Y, 3\)"):
        SliceNeighborsd("image")({"image": torch.zeros(1, 2, 2, 5)})


def test_training_pipeline_yields_true_neighbour_stacks(hippocampus_dir):
    """The bundle's training loader on real cases: the bank holds the cached preprocessed volumes, and every sample
    (without augmentation) is a slice with its true neighbours and its own label."""
    parser = ConfigParser()
    parser.read_config(CONFIGS / "train.json")
    parser["dataset_dir"] = str(hippocampus_dir)
    parser["max_train_cases"] = 3
    parser["num_workers"] = 0
    parser["train#slice_loader#augmentation"] = None
    loader = parser.get_parsed_content("train#slice_loader")
    preprocessing = parser.get_parsed_content("train#preprocessing")
    cases = parser.get_parsed_content("train#dataset#data")
    volumes = [preprocessing(case) for case in cases]
    bank = loader.bank
    assert bank.num_volumes == 3
    for v, volume in enumerate(volumes):  # padded volumes, (1, 64, 64, Z + 2), slice by slice in the bank
        start, depth = int(bank.start[v]), int(bank.depth[v])
        assert volume["image"].shape == (1, 64, 64, depth)
        torch.testing.assert_close(
            bank.images[start : start + depth], torch.as_tensor(volume["image"])[0].permute(2, 0, 1)
        )
        assert torch.equal(
            bank.labels[start : start + depth].long(), torch.as_tensor(volume["label"])[0].permute(2, 0, 1).long()
        )

    batch = next(iter(loader))
    image, label = batch["image"], batch["label"]
    batch_size = parser.get_parsed_content("slices_per_volume") * parser.get_parsed_content("volumes_per_batch")
    assert image.shape == (batch_size, 3, 64, 64) and image.dtype == torch.float32
    assert label.shape == (batch_size, 1, 64, 64) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {0, 1, 2}
    for stack, slice_label in zip(image, label, strict=True):
        centre = int((bank.images - stack[1]).flatten(1).abs().amax(1).argmin())
        assert torch.equal(bank.images[centre], stack[1])
        assert torch.equal(bank.images[centre - 1], stack[0]) and torch.equal(bank.images[centre + 1], stack[2])
        assert torch.equal(bank.labels[centre].long(), slice_label[0])
    # 3 of 4 samples are drawn on foreground (pos=3, neg=1): most samples contain hippocampus
    assert sum(bool(s.any()) for s in label) >= len(label) // 2


# ------------------------------------------------------------------------------------------------ inferer
def test_neighbor_stack_edges():
    vol = torch.arange(5.0).view(1, 1, 5).expand(2, 2, 5)
    stack = neighbor_stack(vol, torch.tensor([0, 4]))
    assert stack[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert stack[1, :, 0, 0].tolist() == [3.0, 4.0, 4.0]
    assert neighbor_stack(vol, torch.tensor([2]), "repeat")[0, :, 0, 0].tolist() == [2.0, 2.0, 2.0]


def _trained_like_lite(img_size=64):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder="lite")
    for p in model.moe_layers.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


@pytest.mark.parametrize("shape", [(64, 64, 11), (40, 52, 7)])
def test_volume_equals_slice_by_slice(shape):
    model = _trained_like_lite()
    volume = torch.rand(1, 1, *shape)
    inferer = SliceContextInferer(img_size=64, batch_size=4)
    with torch.no_grad():
        result = inferer(volume, model)
        assert result.shape == (1, 3, *shape)
        labels = SliceContextInferer(img_size=64, batch_size=4, argmax=True)(MetaTensor(volume), model)
        assert labels.dtype == torch.uint8 and type(labels) is torch.Tensor
        assert torch.equal(labels, result.argmax(dim=1, keepdim=True).to(torch.uint8))  # per batch = whole volume
        for z in range(shape[2]):
            lo, hi = max(z - 1, 0), min(z + 1, shape[2] - 1)
            stack = volume[0, 0, :, :, [lo, z, hi]].permute(2, 0, 1)[None]  # the true neighbours
            if shape[:2] != (64, 64):
                small = torch.nn.functional.interpolate(stack, size=(64, 64), mode="bilinear", align_corners=False)
                expected = torch.nn.functional.interpolate(
                    model(small), size=shape[:2], mode="bilinear", align_corners=False
                )
            else:
                expected = model(stack)
            assert (result[0, ..., z] - expected[0]).abs().max() <= 1e-4, z


def test_sliding_window_mode_and_axis():
    model = _trained_like_lite()
    volume = torch.rand(1, 1, 5, 96, 80)  # slices along the first spatial axis
    inferer = SliceContextInferer(img_size=64, batch_size=8, mode="sliding_window", slice_axis=0)
    with torch.no_grad():
        out = inferer(volume, model)
        assert out.shape == (1, 3, 5, 96, 80)
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        inferer(torch.rand(1, 3, 4, 4, 4), model)


def test_output_on_device_and_progress_per_batch():
    model = _trained_like_lite()
    inferer = SliceContextInferer(img_size=64, device="cpu", sw_device="cpu")
    seen = []
    with torch.no_grad():
        out = inferer(torch.rand(1, 1, 64, 64, 40), model, progress=lambda done, total: seen.append((done, total)))
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert seen[-1] == (40, 40) and len(seen) == 3  # batches of 16


def test_channel_argmax_matches_torch_with_ties():
    logits = torch.randn(4, 5, 9, 7)
    logits[:, 3] = logits[:, 1]  # exact ties go to the lower channel, as with argmax
    logits[0, :, 0, 0] = 0.0
    assert torch.equal(channel_argmax(logits), logits.argmax(dim=1, keepdim=True).to(torch.uint8))
