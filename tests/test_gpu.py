"""Inference on a CUDA GPU: the same labels as on the CPU (bf16 autocast included), the volume kept on the device
from preprocessing to inversion, ``run inference`` and ``segment`` there, peak memory not growing with slices
beyond the volume, MR percentiles of a 512 × 512 × 300 volume on the device.

Skipped where CUDA is absent. Nothing here needs ITK.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from ic_moe_monai.data.transforms import IntensityPresetd
from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
from ic_moe_monai.io import Case

from .helpers import BUNDLE, CONFIGS, ThresholdNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SAMPLES = sorted((BUNDLE / "sample_data").glob("*.nii.gz"))
CUDA = torch.device("cuda:0")


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * (x & y).sum() / max(x.sum() + y.sum(), 1)


def _assert_agree(reference: np.ndarray, labels: np.ndarray, name: str, minimum: float = 0.99) -> None:
    assert labels.shape == reference.shape, name
    for value in (1, 2):
        assert _dice(reference, labels, value) >= minimum, (name, value, _dice(reference, labels, value))


@pytest.fixture(scope="module")
def cpu_labels() -> dict[str, np.ndarray]:
    """The shipped model's labels on the CPU (float32): the reference."""
    predictor = BundleSegmenter(BUNDLE, device="cpu")
    return {s.name: predictor(load_case(Case(name=s.name, kind="image", path=s)))[0].numpy() for s in SAMPLES}


@pytest.mark.parametrize("amp_dtype", [None, "bfloat16"])
def test_gpu_labels_match_cpu(cpu_labels, amp_dtype):
    predictor = BundleSegmenter(BUNDLE, device=CUDA, amp=amp_dtype is not None, amp_dtype=amp_dtype)
    assert predictor.inferer.batch_size == 128  # CUDA's batch, not the CPU's
    for sample in SAMPLES:
        image = load_case(Case(name=sample.name, kind="image", path=sample))
        data = predictor.preprocess(image)
        assert data["image"].device.type == "cuda" and data["image"].dtype == torch.float32  # on the device at once
        labels = predictor.predict(data)
        assert labels.device.type == "cpu" and labels.dtype == torch.uint8  # only the labelmap comes back
        np.testing.assert_allclose(labels.affine, image.affine)
        _assert_agree(cpu_labels[sample.name], labels[0].numpy(), f"{sample.name} {amp_dtype}")


def test_run_inference_on_gpu_matches_cpu(tmp_path, cpu_labels):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"], parser["output_dir"] = str(BUNDLE), str(tmp_path)
    parser["device"] = "$torch.device('cuda:0')"
    assert parser.get_parsed_content("amp") and parser.get_parsed_content("inferer").batch_size == 128
    evaluator = parser.get_parsed_content("evaluator")
    parser.get_parsed_content("checkpointloader")(evaluator)
    evaluator.run()  # returns once the background writer has written every file
    for sample in SAMPLES:
        out, ref = nib.load(tmp_path / sample.name), nib.load(sample)
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
        _assert_agree(cpu_labels[sample.name], np.asarray(out.dataobj), f"run inference {sample.name}")


def test_segment_on_gpu(tmp_path, cpu_labels):
    from ic_moe_monai.segment import segment

    report = segment(str(SAMPLES[0]), str(tmp_path), bundle=str(BUNDLE), device="cuda:0", statistics=True, quiet=True)
    assert report.exit_code == 0 and report.device.startswith("cuda:0")
    assert report.settings["batch_size"] == 128
    labels = np.asarray(nib.load(tmp_path / SAMPLES[0].name).dataobj)
    _assert_agree(cpu_labels[SAMPLES[0].name], labels, "segment")


def test_peak_memory_does_not_grow_with_slices_beyond_the_volume():
    """The inferer's peak over its input grows by the uint8 labels only (a quarter of the float32 volume)."""
    network = ThresholdNet().to(CUDA)
    inferer = SliceContextInferer(img_size=256, batch_size=128, argmax=True, amp=True)  # 512² slices resized
    peaks, volumes = [], []
    for slices in (100, 300):
        volume = torch.rand(1, 1, 512, 512, slices, device=CUDA)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            labels = inferer(volume, network)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        volumes.append(volume.numel() * 4)
        assert labels.device == volume.device and labels.dtype == torch.uint8
        del volume, labels
    growth = (peaks[1] - peaks[0]) / (volumes[1] - volumes[0])
    assert growth <= 0.3, (peaks, volumes, growth)


def test_mr_preset_of_a_large_volume_on_gpu_matches_cpu():
    torch.manual_seed(0)
    volume = (torch.randn(1, 512, 512, 300) * 200 + 400).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    on_cpu = IntensityPresetd("image", modality="mr")({"image": volume})["image"]
    on_gpu = IntensityPresetd("image", modality="mr")({"image": volume.to(CUDA)})["image"]
    assert on_gpu.device.type == "cuda" and on_gpu.stride() == volume.stride()
    torch.testing.assert_close(on_gpu.cpu().as_tensor(), on_cpu.as_tensor(), atol=1e-5, rtol=0)
