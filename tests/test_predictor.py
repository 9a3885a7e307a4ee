"""The bundle runtime on the CPU: the inferer's device arguments (MONAI's meanings), progress per call, bounded
argmax, no host syncs; the predictor built once from the bundle; inference.json's device-dependent settings; and
``run inference``'s evaluator under CUDA autocast's casting policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.inference.predictor import BundleSegmenter, label_names, load_case, read_metadata
from ic_moe_monai.io import Case
from tests.amp_emulation import CudaAutocastEmulation
from tests.sync_check import NoHostSync

from .helpers import BUNDLE, CONFIGS, ThresholdNet, expected_threshold_labels

SAMPLES = sorted((BUNDLE / "sample_data").glob("*.nii.gz"))


class _Recorder(torch.nn.Module):
    """ThresholdNet that records the device, shape and extra arguments of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ThresholdNet()
        self.calls: list[tuple] = []

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls.append((x.device.type, tuple(x.shape), args, kwargs))
        return self.net(x)


# ------------------------------------------------------------------------------------------------ inferer
def test_sw_device_runs_the_network_and_device_holds_the_output():
    """As in MONAI's SlidingWindowInferer. Only a CPU here: the meta device stands in for a second device."""
    volume = torch.rand(1, 1, 16, 16, 5)
    net = _Recorder()
    out = SliceContextInferer(img_size=16, batch_size=2, argmax=True, device="meta")(volume, net)
    assert out.device.type == "meta" and out.shape == (1, 1, 16, 16, 5) and out.dtype == torch.uint8
    assert {c[0] for c in net.calls} == {"cpu"}  # the network ran where the input was
    devices = []

    def on_meta(x: torch.Tensor) -> torch.Tensor:
        devices.append(x.device.type)
        return x * 2.0

    meta_out = SliceContextInferer(img_size=16, batch_size=2, sw_device="meta", device="meta")(volume, on_meta)
    assert devices == ["meta"] * 3 and meta_out.device.type == "meta"  # the slice batches went to sw_device
    default = SliceContextInferer(img_size=16)(volume, ThresholdNet())
    assert default.device == volume.device and default.dtype == torch.float32 and default.shape == (1, 3, 16, 16, 5)


def test_progress_per_call_and_network_arguments():
    volume = MetaTensor(torch.rand(1, 1, 16, 16, 7))
    inferer = SliceContextInferer(img_size=16, batch_size=3, argmax=True)
    net, seen = _Recorder(), []
    inferer(volume, net, "extra", flag=True, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert [c[1][0] for c in net.calls] == [3, 3, 1] and net.calls[0][2:] == (("extra",), {"flag": True})
    default_seen = []
    with_default = SliceContextInferer(img_size=16, batch_size=4, progress=lambda d, t: default_seen.append(d))
    with_default(volume, ThresholdNet())
    assert default_seen == [4, 7]
    with_default(volume, ThresholdNet(), progress=lambda d, t: None)  # the call's own callback wins
    assert default_seen == [4, 7]
    with pytest.raises(ValueError, match="amp_dtype"):
        SliceContextInferer(img_size=16, amp_dtype="float8")


def test_argmax_in_bounded_chunks_equals_whole_batch_argmax():
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 40, 36, 9)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()  # smooth logits, 4 classes, resized
    with torch.no_grad():
        logits = SliceContextInferer(img_size=16, batch_size=9)(volume, net)
        whole = SliceContextInferer(img_size=16, batch_size=9, argmax=True)(volume, net)
        chunked = SliceContextInferer(img_size=16, batch_size=9, argmax=True, chunk_bytes=1)(volume, net)  # 1 slice
    assert torch.equal(whole, chunked)
    assert torch.equal(whole, logits.argmax(dim=1, keepdim=True).to(torch.uint8))
    labels = whole[0, 0]
    assert labels.permute(2, 1, 0).is_contiguous()  # NIfTI's order: written to a file without a transpose


def test_inferer_has_no_host_sync():
    """Nothing in the slice loop waits for the device: stacking, resizing, network, argmax and stitching queue up."""
    volume = torch.rand(1, 1, 24, 20, 6)
    inferer = SliceContextInferer(img_size=16, batch_size=4, argmax=True)
    with torch.no_grad(), NoHostSync() as mode:
        labels = inferer(volume, ThresholdNet())
    assert mode.ops > 10 and labels.shape == (1, 1, 24, 20, 6)


# ------------------------------------------------------------------------------------------------ predictor
@pytest.fixture(scope="module")
def segmenter():
    return BundleSegmenter(BUNDLE)


def test_predictor_builds_its_parts_once(segmenter):
    inferer = segmenter.inferer
    assert isinstance(inferer, SliceContextInferer) and inferer.argmax and inferer.batch_size == 32
    assert segmenter.label_names == {0: "background", 1: "anterior", 2: "posterior"}
    assert segmenter.version == read_metadata(BUNDLE)["version"]
    assert label_names({}, {"0": "bg", "1": "liver"}) == {0: "bg", 1: "liver"}
    image = load_case(Case(name="x", kind="image", path=SAMPLES[0]))
    seen = []
    labels = segmenter(image, progress=lambda done, total: seen.append(done))
    assert seen[-1] == image.shape[-1] and segmenter.inferer is inferer and segmenter.inferer.progress is None
    assert labels.shape == (1, *image.shape) and labels.dtype == torch.uint8 and labels.device.type == "cpu"
    np.testing.assert_allclose(labels.affine, image.affine)
    assert set(np.unique(labels.numpy())) == {0, 1, 2}
    assert BundleSegmenter(BUNDLE, batch_size=5).inferer.batch_size == 5


def test_load_case_keeps_the_file_type_and_order(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).integers(-1000, 1000, (12, 10, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ct.nii.gz")
    image = load_case(Case(name="ct", kind="image", path=tmp_path / "ct.nii.gz"))
    assert image.dtype == torch.int16 and image.stride() == (1, 12, 120)
    np.testing.assert_array_equal(image.numpy(), data)
    floats = data.astype(np.float32)
    floats[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(floats, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        load_case(Case(name="nan", kind="image", path=tmp_path / "nan.nii.gz"))


def test_predictor_with_threshold_network_on_an_lps_volume(tmp_path):
    """The labels come back in the input's own geometry: LPS storage, a preset on int16 values."""
    import nibabel as nib

    from .helpers import threshold_bundle_config

    config = threshold_bundle_config(tmp_path, img_size=16)
    data = np.random.default_rng(1).integers(0, 1000, (16, 16, 9)).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii")
    predictor = BundleSegmenter(BUNDLE, [str(config)])
    labels = predictor(load_case(Case(name="lps", kind="image", path=tmp_path / "lps.nii")))
    np.testing.assert_array_equal(labels[0].numpy(), expected_threshold_labels(data))
    np.testing.assert_allclose(labels.affine, affine)


# ------------------------------------------------------------------------------------------------ inference.json
def _parser(**overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), *overrides.pop("profiles", [])])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_inference_config_chooses_batch_and_amp_by_device():
    cpu = _parser(device="$torch.device('cpu')")
    assert cpu.get_parsed_content("inferer").batch_size == 32 and not cpu.get_parsed_content("amp")
    for device in ("$torch.device('cuda:0')", "cuda"):  # MONAI Label sets the device as a plain string
        cuda = _parser(device=device, profiles=[str(CONFIGS / "sam_vit_b.json")])
        inferer = cuda.get_parsed_content("inferer")
        assert inferer.batch_size == 128 and inferer.amp and inferer.argmax  # not the profile's CPU batch of 8
        assert cuda.get_parsed_content("amp") is True
        assert cuda.get_parsed_content("evaluator#amp_kwargs")["dtype"] in (torch.bfloat16, torch.float16)
    fp16 = _parser(device="cuda", amp_dtype="float16")
    assert fp16.get_parsed_content("evaluator#amp_kwargs")["dtype"] is torch.float16
    profile = _parser(profiles=[str(CONFIGS / "sam_vit_b.json")])
    assert profile.get_parsed_content("sam_checkpoint").endswith(".pth")
    assert profile.get("network_def")["sam_checkpoint"] is None  # model.pt holds every weight: SAM's file is not read


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A slab of 5 slices of a sample volume (float16 matrix products are slow on a CPU)."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("slab")
    image = nib.load(SAMPLES[0])
    nib.save(image.slicer[:, :, 14:19], folder / "slab.nii.gz")
    return folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_run_inference_evaluator_under_cuda_autocast_policy(tmp_path, small_case, dtype):
    """The evaluator with its inferer, inversion and background writer, as CUDA autocast would cast it."""
    import nibabel as nib

    def run(out_dir, emulate):
        parser = _parser(output_dir=str(out_dir), dataset_dir=str(small_case))
        evaluator = parser.get_parsed_content("evaluator")
        parser.get_parsed_content("checkpointloader")(evaluator)
        if emulate:
            with CudaAutocastEmulation(dtype) as mode:
                evaluator.run()
            assert mode.calls["low"] > 0
        else:
            evaluator.run()

    run(tmp_path / "fp32", emulate=False)
    run(tmp_path / "amp", emulate=True)
    reference = np.asarray(nib.load(tmp_path / "fp32" / "slab.nii.gz").dataobj)
    emulated = np.asarray(nib.load(tmp_path / "amp" / "slab.nii.gz").dataobj)
    assert emulated.shape == reference.shape == (34, 52, 5) and len(np.unique(reference)) == 3
    assert (emulated == reference).mean() > 0.99, (emulated == reference).mean()


def test_uncertainty_is_one_minus_the_top_probability_in_the_input_geometry(tmp_path):
    """``predict(uncertainty=True)``: 255 × (1 - max softmax) / (1 - 1/C) per voxel, where the labels are."""
    import nibabel as nib
    import torch

    from ic_moe_monai.data.transforms import IntensityPresetd

    from .helpers import ThresholdNet, threshold_bundle_config

    config = threshold_bundle_config(tmp_path, img_size=16)
    data = np.random.default_rng(2).integers(0, 1000, (16, 16, 7)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([-0.8, -0.8, 2.0, 1.0])), tmp_path / "lps.nii")
    predictor = BundleSegmenter(BUNDLE, [str(config)])
    data_in = predictor.preprocess(load_case(Case(name="lps", kind="image", path=tmp_path / "lps.nii")))
    predictor.predict(data_in)
    assert predictor.last_uncertainty is None  # only on request
    labels = predictor.predict(data_in, uncertainty=True)
    unsure = predictor.last_uncertainty
    assert unsure.dtype == np.uint8 and unsure.shape == tuple(labels.shape[1:])
    scaled = IntensityPresetd("image", modality="mr")({"image": torch.from_numpy(data[None].astype(np.float32))})
    slices = torch.as_tensor(np.asarray(scaled["image"]))[0].permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
    with torch.no_grad():
        logits = ThresholdNet()(slices.repeat(1, 3, 1, 1))
    top = torch.softmax(logits, dim=1).amax(dim=1).permute(1, 2, 0).numpy()
    expected = np.round((1 - top) * 255 * 3 / 2)
    np.testing.assert_allclose(unsure, expected, atol=1)
    assert unsure.max() > 64 and (unsure == 0).mean() > 0.5  # unsure only near the two thresholds
