"""The interactive engine under hostile requests: click floods, extreme coordinates, images that must not be read."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from ic_moe_monai.io import ImageError
from ic_moe_monai.label import ClickError, InteractiveSegmenter, parse_clicks

from .helpers import BUNDLE

IMAGE = BUNDLE / "sample_data" / "hippocampus_003.nii.gz"


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    return InteractiveSegmenter(BUNDLE, max_images=2, max_clicks=20000)


def test_extreme_coordinates_are_refused_not_crashed():
    shape = (34, 52, 35)
    with pytest.raises(ClickError, match="outside the image"):
        parse_clicks([[10**30, 2, 3]], shape, "foreground")  # an integer numpy cannot hold (was a TypeError)
    with pytest.raises(ClickError, match="three numbers"):
        parse_clicks([[10**400, 2, 3]], shape, "foreground")  # one float cannot hold
    with pytest.raises(ClickError, match="outside the image"):
        parse_clicks([[1e30, 2, 3]], shape, "foreground")


def test_click_at_minus_half_on_a_mirrored_axis(engine, tmp_path):
    """-0.5 is the edge of voxel 0; on an axis the network's (RAS) grid mirrors it used to land one past the end."""
    ras = nib.load(IMAGE)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1
    nib.save(nib.Nifti1Image(np.asarray(ras.dataobj)[::-1, ::-1], ras.affine @ flip), tmp_path / "lps.nii.gz")
    last = [s - 0.5 - 1e-6 for s in ras.shape]
    labels, info = engine(tmp_path / "lps.nii.gz", foreground=[[-0.5, -0.5, 5], last], label=1)
    labels = np.asarray(labels[0])
    assert labels[0, 0, 5] == 1 and labels[ras.shape[0] - 1, ras.shape[1] - 1, ras.shape[2] - 1] == 1
    assert info["refined_slices"] == [5, ras.shape[2] - 1]


def test_click_flood_is_capped_and_costs_linear_time(engine, monkeypatch):
    capped = InteractiveSegmenter.__new__(InteractiveSegmenter)
    capped.max_clicks = 256
    with pytest.raises(ClickError, match="257 clicks in one request; at most 256 are taken"):
        capped.check_click_count([[0, 0, 0]] * 200, [[0, 0, 0]] * 57)

    seen = []
    decode = engine.network.predict_from_embedding

    def recording(*args, points=None, point_labels=None, **kwargs):
        if points is not None:
            seen.append(points.shape[1])
        return decode(*args, points=points, point_labels=point_labels, **kwargs)

    monkeypatch.setattr(engine.network, "predict_from_embedding", recording)
    engine(IMAGE)  # embeddings cached: what follows is the clicks' own cost
    rng = np.random.default_rng(0)
    timings = {}
    for count in (200, 12000):
        xy = rng.uniform(-0.5, 33.4, (count, 2))
        clicks = np.concatenate([xy, np.full((count, 1), 10.0)], axis=1).tolist()
        start = time.perf_counter()
        _, info = engine(IMAGE, foreground=clicks[: count // 2], background=clicks[count // 2 :], label=1)
        timings[count] = time.perf_counter() - start
        assert info["refined_slices"] == [10]
    assert max(seen) <= engine.max_prompts  # SAM's decoder never sees the flood
    assert timings[12000] < 3.0 and timings[12000] < 20 * timings[200] + 1.0, timings  # 60× the clicks


def test_images_are_checked_before_they_are_read(engine, tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1000))
    header.set_data_dtype(np.float32)
    (tmp_path / "bomb.nii").write_bytes(header.binaryblock + bytes(4))
    with pytest.raises(ImageError, match="truncated or forged header"):
        engine(tmp_path / "bomb.nii")
    data = np.random.default_rng(1).random((40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "cut.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "cut.nii.gz").read_bytes()[:30000])
    with pytest.raises(ImageError, match=r"cut\.nii\.gz: cannot read the image"):
        engine(tmp_path / "cut.nii.gz")
    nib.save(nib.Nifti1Image(data[..., :1], np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ImageError, match="a single slice"):
        engine(tmp_path / "flat.nii.gz")
    small = InteractiveSegmenter.__new__(InteractiveSegmenter)
    small.__dict__.update(engine.__dict__, max_image_bytes=1000, _cache=type(engine._cache)())
    with pytest.raises(ImageError, match="over the limit of 1000 B"):
        small(IMAGE)
