"""The inference pipeline's data path on the CPU: NIfTI read in the file's order, percentiles and intensity presets
equal to MONAI's, collation without a copy, background saving and the NIfTI writer."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImage,
    LoadImaged,
    Orientationd,
    SaveImage,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from ic_moe_monai.data.transforms import IntensityPresetd, percentile
from ic_moe_monai.inference.predictor import one_case_collate
from ic_moe_monai.io.readers import LoadVolume, LoadVolumed
from ic_moe_monai.io.saving import BackgroundSaveImaged, BackgroundWriter, NiftiWriter

from .helpers import BUNDLE

SAMPLE = BUNDLE / "sample_data" / "hippocampus_003.nii.gz"


def _fortran(x: torch.Tensor) -> torch.Tensor:
    """The same values with NIfTI's memory order (first axis fastest)."""
    dims = tuple(range(x.ndim))
    return x.permute(dims[::-1]).contiguous().permute(dims[::-1])


# ------------------------------------------------------------------------------------------------ intensity
@pytest.mark.parametrize("shape", [(1, 30, 40, 20), (1, 120, 110, 90)])  # torch.quantile, then NumPy's path
def test_presets_equal_monai_bit_for_bit(shape):
    torch.manual_seed(0)
    image = torch.randn(shape) * 300 + 100
    mr = ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True)({"image": image})["image"]
    ct = ScaleIntensityRanged("image", -160.0, 240.0, 0.0, 1.0, clip=True)({"image": image.round()})["image"]
    for layout in (image, _fortran(image)):
        out = IntensityPresetd("image", modality="mr")({"image": layout})["image"]
        assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.stride() == layout.stride()
        assert torch.equal(out.as_tensor(), mr.as_tensor())
        int16 = IntensityPresetd("image", modality="ct")({"image": layout.round().to(torch.int16)})["image"]
        assert torch.equal(int16.as_tensor(), ct.as_tensor())  # int16 input: converted exactly, same answer
    assert torch.equal(layout, image)  # the input is left as it was


def test_percentile_of_a_large_volume_is_sampled_in_memory_order():
    torch.manual_seed(0)
    volume = _fortran(torch.randn(1, 64, 48, 40))
    exact = np.percentile(volume.numpy(), [0.5, 99.5])
    sampled = percentile(volume, (0.5, 99.5), max_samples=10_000)  # 12 times fewer values than the volume
    np.testing.assert_allclose(sampled.numpy(), exact, atol=0.1)
    np.testing.assert_allclose(percentile(volume, (0.5, 99.5)).numpy(), exact, rtol=1e-6)  # under the cap: exact
    slabs = torch.zeros(1, 10, 10, 7)  # one value per slice: a stride sharing a factor with 7 would miss slices
    slabs[..., :] = torch.arange(7.0)
    assert percentile(slabs, (0, 100), max_samples=50).tolist() == [0.0, 6.0]


def test_mr_preset_on_a_512x512x300_volume():
    """torch.quantile alone refuses or sorts all 78M values; MONAI's percentile copies the volume to NumPy."""
    volume = torch.randint(-100, 1000, (1, 512, 512, 300), dtype=torch.int16)
    start = time.perf_counter()
    out = IntensityPresetd("image", modality="mr")({"image": volume})["image"]
    seconds = time.perf_counter() - start
    assert out.shape == volume.shape and out.dtype == torch.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert seconds < 30, seconds  # a shared 2-core CPU: what matters is that it finishes


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, None])
def test_load_volume_equals_load_image_in_file_order(tmp_path, suffix, dtype):
    data = np.random.default_rng(0).integers(-1000, 1000, (20, 30, 12)).astype(np.int16)
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    path = tmp_path / f"ct{suffix}"
    nib.save(nib.Nifti1Image(data, affine), path)
    reference = LoadImage(image_only=True, dtype=dtype)(path)
    image = LoadVolume(image_only=True, dtype=dtype)(path)
    assert image.dtype == reference.dtype == (torch.int16 if dtype is None else torch.float32)
    assert torch.equal(image.as_tensor(), reference.as_tensor())
    assert image.stride() == (1, 20, 600)  # Fortran order, as stored: each axial slice contiguous
    torch.testing.assert_close(image.affine, reference.affine)
    assert set(image.meta) == set(reference.meta) and image.meta["filename_or_obj"] == str(path)
    loaded = LoadVolumed("image", dtype=None, image_only=False)({"image": str(path)})
    assert isinstance(LoadVolumed("image"), LoadImaged) and "image_meta_dict" in loaded
    other = tmp_path / "ct.npy"  # formats other than NIfTI: MONAI's own reading
    np.save(other, data)
    assert torch.equal(LoadVolume(image_only=True)(other).as_tensor(), LoadImage(image_only=True)(other).as_tensor())


def test_one_case_collate_is_a_view_with_monai_meta():
    pre = Compose([LoadVolumed("image", dtype=None), EnsureChannelFirstd("image"), Orientationd("image", "LPS")])
    case = pre({"image": str(SAMPLE)})
    ours, monai = one_case_collate([case]), list_data_collate([case])
    assert ours["image"].data_ptr() == case["image"].data_ptr()  # no copy of the volume
    assert torch.equal(ours["image"], monai["image"]) and ours["image"].is_batch
    for a, b in zip(decollate_batch(ours), decollate_batch(monai), strict=True):
        assert a["image"].meta["filename_or_obj"] == b["image"].meta["filename_or_obj"]
        torch.testing.assert_close(a["image"].affine, b["image"].affine)
        assert [op["class"] for op in a["image"].applied_operations] == ["Orientation"]
    two = one_case_collate([case, case])  # several cases: MONAI's collation
    assert two["image"].shape[0] == 2


# ------------------------------------------------------------------------------------------------ saving
def test_background_writer_runs_jobs_in_order_and_raises_in_the_caller():
    done, gate = [], threading.Event()
    writer = BackgroundWriter(max_pending=1)
    writer.submit(gate.wait)
    writer.submit(done.append, 1)
    blocked = threading.Thread(target=writer.submit, args=(done.append, 2))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # the queue is full: the third submit waits
    gate.set()
    blocked.join(5)
    writer.flush()
    assert done == [1, 2] and writer._thread is None  # the thread ends with the flush

    def fail(kind):
        raise kind("disk full")

    writer.submit(fail, OSError)
    writer.submit(done.append, 3)  # queued behind the failure: dropped
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert done == [1, 2]
    writer.submit(fail, KeyboardInterrupt)  # even an interrupt in the writing thread reaches the caller
    time.sleep(0.2)
    with pytest.raises(KeyboardInterrupt):
        writer.submit(done.append, 4)
    with pytest.raises(ValueError, match="body"), BackgroundWriter() as scoped:  # a failing body: queued jobs dropped
        scoped.submit(time.sleep, 0.2)
        scoped.submit(done.append, 5)
        raise ValueError("body")
    assert done == [1, 2]


def test_nifti_writer_equals_nibabel_writer(tmp_path):
    labels = _fortran(torch.randint(0, 3, (1, 20, 30, 12), dtype=torch.uint8))
    affine = torch.tensor([[-0.8, 0, 0, 10], [0, 0.9, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], dtype=torch.float64)
    image = MetaTensor(labels, affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    for name, writer in (("ours", NiftiWriter), ("monai", "NibabelWriter")):
        SaveImage(output_dir=tmp_path / name, output_postfix="", output_dtype=np.uint8, separate_folder=False,
                  resample=False, print_log=False, writer=writer)(image)  # fmt: skip
    ours, monai = nib.load(tmp_path / "ours" / "case.nii.gz"), nib.load(tmp_path / "monai" / "case.nii.gz")
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(monai.dataobj))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), labels[0].numpy())
    assert ours.get_data_dtype() == monai.get_data_dtype() == np.uint8
    np.testing.assert_allclose(ours.affine, monai.affine)
    assert ours.header.get_sform(coded=True)[1] == monai.header.get_sform(coded=True)[1] == 1
    assert ours.header.get_qform(coded=True)[1] == monai.header.get_qform(coded=True)[1] == 1


def test_background_save_imaged_writes_after_flush(tmp_path):
    background = BackgroundWriter()
    options = {"output_postfix": "", "separate_folder": False, "resample": False, "print_log": False}
    saver = BackgroundSaveImaged("pred", background=background, output_dir=tmp_path, writer=NiftiWriter, **options)
    for i in range(3):
        pred = MetaTensor(torch.full((1, 4, 5, 6), i, dtype=torch.uint8), meta={"filename_or_obj": f"c{i}.nii.gz"})
        out = saver({"pred": pred, "image": torch.zeros(1)})
        assert out["pred"] is pred  # the data goes on unchanged
    saver.flush()
    for i in range(3):
        assert np.asarray(nib.load(tmp_path / f"c{i}.nii.gz").dataobj).max() == i
