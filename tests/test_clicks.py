"""Simulated clicks for prompt training, and starting a training from pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.clicks import ClickPromptBatch, device_boxes, device_clicks, simulate_clicks
from tests.test_slice_sampling import NoHostSyncOrData


def _square_label(batch: int = 4, size: int = 32) -> torch.Tensor:
    label = torch.zeros(batch, 1, size, size, dtype=torch.int64)
    label[:, 0, 8:20, 10:22] = 1
    label[:, 0, 22:28, 4:12] = 2
    return label


def _at(label: torch.Tensor, i: int, point: torch.Tensor) -> int:
    col, row = (int(v) for v in point)
    return int(label[i, 0, row, col])


def _numpy_clicks(label, pred=None, max_clicks=3, seed=0):
    return simulate_clicks(label, pred, max_clicks, rng=np.random.default_rng(seed))


def _device_clicks(label, pred=None, max_clicks=3, seed=0):
    return device_clicks(
        label, pred, num_classes=2, max_clicks=max_clicks, generator=torch.Generator().manual_seed(seed)
    )


BOTH = pytest.mark.parametrize("clicks", [_numpy_clicks, _device_clicks], ids=["numpy", "device"])


@BOTH
def test_clicks_from_labels_lie_inside_or_near_one_class(clicks):
    label = _square_label(batch=16)
    points, point_labels = clicks(label, max_clicks=3)
    assert points.shape == (16, 3, 2) and point_labels.shape == (16, 3)
    for i in range(16):
        real = point_labels[i] >= 0
        assert real[0] and (point_labels[i][~real] == -1).all()
        assert point_labels[i, 0] == 1  # without a prediction, the first click is on the object
        target = _at(label, i, points[i, 0])
        assert target in (1, 2)
        for point, positive in zip(points[i][real], point_labels[i][real], strict=True):
            value = _at(label, i, point)
            assert (value == target) if positive == 1 else (value != target)
            if positive == 0:  # a background click lies in the 3-pixel band around the object
                col, row = (int(v) for v in point)
                near = label[i, 0, max(row - 3, 0) : row + 4, max(col - 3, 0) : col + 4] == target
                assert near.any()
    assert (point_labels >= 0).sum(1).float().mean() > 1.5  # further clicks are drawn


@BOTH
def test_first_click_corrects_the_larger_error(clicks):
    label = _square_label(batch=1)
    missed = torch.zeros_like(label)  # nothing predicted: the first click is a foreground click on the object
    points, point_labels = clicks(label, missed, seed=1)
    assert point_labels[0, 0] == 1 and _at(label, 0, points[0, 0]) != 0

    only_one = torch.zeros_like(label)
    only_one[label == 1] = 1
    over = only_one.clone()
    over[0, 0, 0:6, 24:32] = 1  # a false positive of class 1, larger than nothing missed
    for seed in range(5):
        points, point_labels = clicks(only_one.clone(), over, seed=seed)
        assert point_labels[0, 0] == 0
        col, row = (int(v) for v in points[0, 0])
        assert 0 <= row < 6 and 24 <= col < 32


@BOTH
def test_empty_slice_gets_one_background_click(clicks):
    _, point_labels = clicks(torch.zeros(2, 1, 16, 16, dtype=torch.int64), max_clicks=2)
    assert (point_labels[:, 0] == 0).all() and (point_labels[:, 1] == -1).all()
    with pytest.raises(ValueError, match="max_clicks"):
        clicks(torch.zeros(1, 1, 8, 8), max_clicks=0)


def test_device_clicks_favour_the_interior_and_never_sync():
    """Clicks land in proportion to the distance to the region's edge (capped), with no host read: they can be
    part of a CUDA graph."""
    label = torch.zeros(512, 1, 40, 40, dtype=torch.int64)
    label[:, :, 5:35, 5:35] = 1
    with NoHostSyncOrData():
        points, point_labels = device_clicks(label, num_classes=1, max_clicks=1, max_depth=16)
    rows, cols = points[:, 0, 1], points[:, 0, 0]
    edge_distance = torch.minimum(torch.minimum(rows - 5, 34 - rows), torch.minimum(cols - 5, 34 - cols)) + 1
    assert (point_labels[:, 0] == 1).all() and (edge_distance >= 1).all()
    # uniform over the square gives a mean distance of about 5.5; weighting by the distance about 8
    assert edge_distance.float().mean() > 7


def test_prompt_batch_probability_and_same_draws_on_every_rank():
    batch = {"image": torch.rand(4, 3, 32, 32), "label": _square_label()}
    assert len(ClickPromptBatch(prob=0.0)(batch, "cpu")) == 2
    image, _, args, kwargs = ClickPromptBatch(prob=1.0)(batch, "cpu")
    assert image.shape == (4, 3, 32, 32) and args == () and set(kwargs) == {"points", "point_labels"}
    a, b = ClickPromptBatch(prob=0.5, seed=3), ClickPromptBatch(prob=0.5, seed=3)
    draws_a = [len(a(batch, "cpu")) for _ in range(20)]
    assert draws_a == [len(b(batch, "cpu")) for _ in range(20)]
    assert 2 in draws_a and 4 in draws_a


def test_prompt_batch_uses_the_network_prediction_and_feeds_it():
    net = ICMoE(num_classes=2, img_size=32, encoder="lite").train()
    batch = {"image": torch.rand(2, 3, 32, 32), "label": _square_label(batch=2)}
    image, _, args, kwargs = ClickPromptBatch(net, prob=1.0)(batch, "cpu")
    out = net(image, *args, **kwargs)
    assert out["logits"].shape == (2, 3, 32, 32)
    out["logits"].sum().backward()  # the prompted path is differentiable end to end
    assert net.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad is not None


def test_device_boxes_enclose_one_class_with_jittered_sides():
    label = torch.zeros(3, 1, 32, 32, dtype=torch.long)
    label[0, 0, 4:10, 6:20] = 1  # rows 4..9, columns 6..19
    label[1, 0, 12:30, 2:8] = 2
    tight = device_boxes(label, num_classes=2, jitter=0.0)
    assert tight[0].tolist() == [6.0, 4.0, 19.0, 9.0] and tight[1].tolist() == [2.0, 12.0, 7.0, 29.0]
    assert tight[2].tolist() == [0.0, 0.0, 31.0, 31.0]  # nothing to segment: the whole slice, a box that says nothing
    torch.manual_seed(0)
    loose = torch.stack([device_boxes(label, num_classes=2, jitter=0.2)[0] for _ in range(200)])
    assert (loose[:, :2] <= loose[:, 2:]).all() and (loose >= 0).all() and (loose <= 31).all()
    shift = (loose - tight[0]).abs()
    assert shift.max() > 1.0  # the sides move
    assert (shift[:, [0, 2]] <= 0.2 * 14 + 1e-4).all() and (shift[:, [1, 3]] <= 0.2 * 6 + 1e-4).all()


def test_prompt_batch_gives_boxes_to_its_box_share_and_the_network_takes_them():
    net = ICMoE(num_classes=2, img_size=32, encoder="lite").train()
    batch = {"image": torch.rand(2, 3, 32, 32), "label": _square_label(batch=2)}
    image, _, args, kwargs = ClickPromptBatch(net, prob=1.0, box_prob=1.0)(batch, "cpu")
    assert set(kwargs) == {"boxes"} and kwargs["boxes"].shape == (2, 4)
    assert net(image, *args, **kwargs)["logits"].shape == (2, 3, 32, 32)
    mixed = ClickPromptBatch(prob=1.0, box_prob=0.5, num_classes=2, seed=1)
    kinds = {tuple(sorted(mixed(batch, "cpu")[3])) for _ in range(20)}
    assert kinds == {("boxes",), ("point_labels", "points")}
    with pytest.raises(ValueError, match="box_prob"):
        ClickPromptBatch(box_prob=1.5)
