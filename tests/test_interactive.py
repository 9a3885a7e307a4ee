"""The click-refinement engine behind the interactive MONAI Label model (no MONAI Label needed)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from ic_moe_monai.io import Case
from ic_moe_monai.label import ClickError, InteractiveSegmenter, make_app_folder, parse_clicks
from ic_moe_monai.label.interactive import parse_box
from ic_moe_monai.segment import BundleSegmenter, load_case

from .helpers import BUNDLE

IMAGE = BUNDLE / "sample_data" / "hippocampus_003.nii.gz"


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    return InteractiveSegmenter(BUNDLE, max_images=2, click_radius=6)


@pytest.fixture(scope="module")
def automatic():
    """The bundle's own automatic answer for the image, through the batch segmentation path."""
    segmenter = BundleSegmenter(BUNDLE, [], torch.device("cpu"), batch_size=32)
    return np.asarray(segmenter(load_case(Case(name="x", kind="image", path=IMAGE)))[0])


def test_no_clicks_gives_the_automatic_segmentation(engine, automatic):
    labels, info = engine(IMAGE)
    assert labels.shape[1:] == automatic.shape and labels.dtype == torch.uint8
    np.testing.assert_allclose(np.asarray(labels.affine), np.asarray(load_case(Case("x", "image", IMAGE)).affine))
    agreement = (np.asarray(labels[0]) == automatic).mean()
    assert agreement >= 0.999, agreement  # the cached-embedding path is the inferer's path (float noise aside)
    assert info["refined_slices"] == [] and set(info["label_names"]) == {"background", "anterior", "posterior"}


def test_clicks_change_the_mask_near_them_only(engine, automatic):
    background = np.argwhere(automatic == 0)
    centre = np.array(automatic.shape) / 2
    x, y, z = (int(v) for v in background[np.argmin(np.abs(background - centre).sum(axis=1))])  # a background voxel
    labels, info = engine(IMAGE, foreground=[[x, y, z]], label="posterior")
    labels = np.asarray(labels[0])
    assert labels[x, y, z] == 2  # the click holds at its voxel
    changed = np.argwhere(labels != automatic)
    assert len(changed) > 0
    # the image is stored in RAS, so original and network grids coincide: changes stay on the slice, within reach
    assert set(changed[:, 2]) == {z} and info["refined_slices"] == [z]
    assert (np.hypot(changed[:, 0] - x, changed[:, 1] - y) <= 6).all()
    # a background click removes the label under it
    off, _ = engine(IMAGE, foreground=[[x, y, z]], background=[[x, y, z]], label=2)
    assert np.asarray(off[0])[x, y, z] == 0


def test_a_box_redecodes_its_slices_and_keeps_the_label_inside_it(engine, automatic):
    z = int(np.argmax((automatic == 1).sum(axis=(0, 1))))  # the slice with the most anterior voxels
    xs, ys = np.nonzero(automatic[..., z] == 1)
    box = [[int(xs.min()), int(ys.min()), z], [int(xs.min()) + 3, int(ys.min()) + 3, z]]  # a corner of the label
    labels, info = engine(IMAGE, box=box, label="anterior")
    labels = np.asarray(labels[0])
    assert info["refined_slices"] == [z]
    changed = np.argwhere(labels != automatic)
    assert len(changed) > 0 and set(changed[:, 2]) == {z}  # only the box's slice changes
    inside = np.zeros(labels.shape[:2], dtype=bool)
    inside[box[0][0] : box[1][0] + 1, box[0][1] : box[1][1] + 1] = True
    assert not (labels[..., z][~inside] == 1).any()  # on its slice the label lies inside the box
    assert (labels[..., z][~inside] == 2).sum() == (automatic[..., z][~inside] == 2).sum()  # other labels stay
    # a box over several slices, with a click: every slice of the box is refined, the click holds
    click = [int(xs[0]), int(ys[0]), z]
    labels, info = engine(IMAGE, box=[[0, 0, z - 1], [33, 51, z + 1]], foreground=[click], label=1)
    assert info["refined_slices"] == [z - 1, z, z + 1] and np.asarray(labels[0])[xs[0], ys[0], z] == 1


def test_bad_boxes_are_refused():
    shape = (34, 52, 35)
    assert parse_box(None, shape) is None and parse_box([], shape) is None
    assert parse_box([[1, 2, 3], [4, 5, 3]], shape).shape == (2, 3)
    for bad, message in (("1,2", "two corners"), ([[1, 2, 3]], "two corners"), ([[1, 2], [3, 4]], "three numbers"),
                         ([[1, 2, 3], [40, 5, 3]], "outside the image")):  # fmt: skip
        with pytest.raises(ClickError, match=message):
            parse_box(bad, shape)


def test_second_click_on_a_slice_reuses_the_embeddings(engine):
    engine._cache.clear()
    start = time.perf_counter()
    _, first = engine(IMAGE, foreground=[[10, 20, 12]])
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    _, second = engine(IMAGE, foreground=[[10, 20, 12], [12, 22, 12]])
    second_s = time.perf_counter() - start
    assert first["embedding_cache"] == "miss" and second["embedding_cache"] == "hit"
    assert first_s / second_s >= 5, (first_s, second_s)
    # the automatic answer's quality score (the shipped calibration) travels with every answer, for the viewer
    assert first["quality"] == second["quality"] and 0.0 <= first["quality"]["score"] <= 1.0
    assert set(first["quality"]["labels"]) == {"anterior", "posterior"}


def test_bad_clicks_and_labels_are_refused(engine):
    shape = (34, 52, 35)
    assert parse_clicks(None, shape, "foreground").shape == (0, 3)
    assert parse_clicks([[1, 2.5, 3]], shape, "foreground").tolist() == [[1.0, 2.5, 3.0]]
    for bad, message in (
        ("1,2,3", "must be a list"),
        ([[1, 2]], "three numbers"),
        ([[1, 2, "a"]], "three numbers"),
        ([[1, 2, float("nan")]], "three numbers"),
        ([[True, 2, 3]], "three numbers"),
        ([[34, 2, 3]], "outside the image"),
        ([[-1, 2, 3]], "outside the image"),
    ):
        with pytest.raises(ClickError, match=message):
            parse_clicks(bad, shape, "foreground")
    with pytest.raises(ClickError, match="not one of the model's labels"):
        engine(IMAGE, foreground=[[1, 2, 3]], label="liver")
    with pytest.raises(FileNotFoundError):
        engine(BUNDLE / "sample_data" / "missing.nii.gz")


def test_new_weights_invalidate_the_cache(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    os.symlink(BUNDLE / "configs", bundle / "configs")
    weights = bundle / "models" / "model.pt"
    weights.write_bytes((BUNDLE / "models" / "model.pt").read_bytes())
    engine = InteractiveSegmenter(bundle)
    engine(IMAGE)
    assert engine(IMAGE)[1]["embedding_cache"] == "hit"
    state = torch.load(weights, weights_only=True)
    torch.save({k: v * 0 if v.is_floating_point() else v for k, v in state.items()}, weights)  # "retrained"
    os.utime(weights, (time.time() + 5, time.time() + 5))
    labels, info = engine(IMAGE)
    assert info["embedding_cache"] == "miss"
    assert len(np.unique(np.asarray(labels[0]))) == 1  # zero weights: one constant answer


def test_app_folder(tmp_path):
    folder = make_app_folder(tmp_path / "apps" / "ic_moe")
    assert "from ic_moe_monai.label.app import ICMoEApp" in (folder / "main.py").read_text()


def test_clicks_on_an_image_stored_in_another_orientation(engine, tmp_path):
    """Clicks are voxel indices of the image as stored; the network works in RAS. An LPS copy of the image must
    give the same answer, mirrored, for the mirrored click."""
    import nibabel as nib

    ras = nib.load(IMAGE)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1
    lps = nib.Nifti1Image(np.asarray(ras.dataobj)[::-1, ::-1], ras.affine @ flip)
    nib.save(lps, tmp_path / "lps.nii.gz")
    x, y, z = 9, 14, 11
    nx, ny = ras.shape[0] - 1 - x, ras.shape[1] - 1 - y
    on_ras, _ = engine(IMAGE, foreground=[[x, y, z]], label=1)
    on_lps, info = engine(tmp_path / "lps.nii.gz", foreground=[[nx, ny, z]], label=1)
    assert np.asarray(on_lps[0])[nx, ny, z] == 1 and info["refined_slices"] == [z]
    np.testing.assert_allclose(np.asarray(on_lps.affine), lps.affine, atol=1e-4)
    agreement = (np.asarray(on_lps[0])[::-1, ::-1] == np.asarray(on_ras[0])).mean()
    assert agreement >= 0.999, agreement


def test_automatic_answer_keeps_the_largest_component_as_the_bundle_does(tmp_path):
    """With the bundle's ``keep_largest_component`` on, the engine's automatic labels are the bundle's postprocessed
    answer: a volume holding the same head twice gives one component per label, not two."""
    import json

    import nibabel as nib
    from scipy import ndimage

    image = nib.load(IMAGE)
    twice = np.concatenate([np.asarray(image.dataobj)] * 2, axis=0)
    path = tmp_path / "twice.nii.gz"
    nib.save(nib.Nifti1Image(twice, image.affine), path)
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"keep_largest_component": False}))

    def pieces(labels, value):  # connected as the cleaning connects them: faces, edges and corners
        return ndimage.label(labels == value, structure=np.ones((3, 3, 3)))[1]

    kept = np.asarray(InteractiveSegmenter(BUNDLE, max_images=1)(path)[0][0])
    raw = np.asarray(InteractiveSegmenter(BUNDLE, [str(off)], max_images=1)(path)[0][0])
    assert max(pieces(raw, v) for v in (1, 2)) > 1  # the raw answer has a copy of each label
    assert [pieces(kept, v) for v in (1, 2)] == [1, 1]
    assert ((kept != raw) <= (kept == 0)).all()  # only removals
