"""Labels put on their image's grid before anything else in training and evaluation: a DICOM SEG read back from a
PACS covers only the annotated slices, and its label file must still pair with the image voxel by voxel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from ic_moe_monai.data.transforms import LabelToImageGridd, label_to_image_grid

from .helpers import CONFIGS

# The oblique geometry of a real brain MR series (0.6875 mm pixels, 6.5 mm slices, tilted about x), in RAS.
OBLIQUE = np.array([[-0.6875, 0.0, 0.0, 110.0], [0.0, -0.675, -1.216, 95.0], [0.0, 0.1286, -6.385, 40.0],
                    [0.0, 0.0, 0.0, 1.0]])  # fmt: skip
SHAPE = (40, 36, 35)


def _shift(offset) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = offset
    return shift


@pytest.fixture
def pair():
    """An image, a label on its grid, and the same label cropped to its annotated slices and in-plane box."""
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32) * 500
    label = np.zeros(SHAPE, np.uint8)
    label[6:30, 5:28, 5:29] = rng.integers(0, 3, (24, 23, 24))  # 24 of 35 slices annotated
    low, high = (6, 5, 5), (30, 28, 29)
    cropped = label[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    return image, label, cropped, OBLIQUE @ _shift(low)


def _meta(array, affine, name=""):
    return MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine), meta={"filename_or_obj": name})


def test_cropped_shifted_label_lands_on_its_voxels(pair):
    image, label, cropped, crop_affine = pair
    out = label_to_image_grid(_meta(cropped, crop_affine), _meta(image, OBLIQUE))
    assert out.shape == (1, *SHAPE) and out.dtype == torch.uint8
    np.testing.assert_array_equal(np.asarray(out[0]), label)
    np.testing.assert_allclose(np.asarray(out.affine), OBLIQUE)


def test_label_in_another_orientation_and_larger_than_the_image(pair):
    image, label, _, _ = pair
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[:3, 3] = [SHAPE[0] - 1, 0, SHAPE[2] - 1]  # x and z reversed
    bigger = np.zeros((SHAPE[0] + 3, SHAPE[1], SHAPE[2]), np.uint8)  # 3 voxels beyond the image's x = 0 side
    bigger[: SHAPE[0]] = label[::-1, :, ::-1]
    bigger[SHAPE[0] :] = 1
    stored = np.transpose(bigger, (2, 1, 0))  # and axes in the other order
    affine = OBLIQUE @ flip @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    out = LabelToImageGridd("label", "image")({"image": _meta(image, OBLIQUE), "label": _meta(stored, affine)})
    np.testing.assert_array_equal(np.asarray(out["label"][0]), label)


def test_label_on_a_finer_grid_is_resampled_nearest():
    image = _meta(np.zeros((10, 10, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    fine = np.zeros((20, 20, 18), np.uint8)
    fine[4:12, 6:14, 3:12] = 2  # image voxels 2..5, 3..6, 1..3 when sampled at their centres
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-0.5, -0.5, -1.0]  # voxel centres of the fine grid on the coarse grid's
    out = label_to_image_grid(_meta(fine, affine), image)
    expected = np.zeros((10, 10, 6), np.uint8)
    expected[2:6, 3:7, 1:4] = 2
    np.testing.assert_array_equal(np.asarray(out[0]), expected)


def test_label_elsewhere_in_space_names_both_files(pair):
    image, _, cropped, crop_affine = pair
    elsewhere = _meta(cropped, _shift((500, 0, 0)) @ crop_affine, "seg.nrrd")
    with pytest.raises(ValueError, match=r"label seg\.nrrd: none of its foreground lies in the image img\.nii\.gz"):
        label_to_image_grid(elsewhere, _meta(image, OBLIQUE, "img.nii.gz"))


@pytest.mark.parametrize("section", ["train#preprocessing", "validate#preprocessing", "evaluate"])
def test_bundle_pipelines_pair_a_cropped_label_with_its_image(tmp_path, pair, section):
    """train.json's and evaluate.json's preprocessing on a real-geometry pair stored apart: a cropped label file
    gives what the full-size label gives (before, the label kept its 24 slices against the image's 35)."""
    image, label, cropped, crop_affine = pair
    nib.save(nib.Nifti1Image(image, OBLIQUE), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, OBLIQUE), tmp_path / "full.nii.gz")
    nib.save(nib.Nifti1Image(cropped, crop_affine), tmp_path / "cropped.nii.gz")
    parser = ConfigParser()
    configs = [CONFIGS / "train.json"] + ([CONFIGS / "evaluate.json"] if section == "evaluate" else [])
    parser.read_config([str(c) for c in configs])
    parser["device"] = "$torch.device('cpu')"
    key = "preprocessing" if section == "evaluate" else section
    preprocessing = parser.get_parsed_content(key)
    full = preprocessing({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "full.nii.gz")})
    out = preprocessing({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "cropped.nii.gz")})
    assert out["label"].shape[1:] == out["image"].shape[1:]
    np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(full["label"]))
