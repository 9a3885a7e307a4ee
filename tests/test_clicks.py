"""Simulated clicks for prompt training, and starting a training from pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ic_moe_monai.clicks import ClickPromptBatch, simulate_clicks
from ic_moe_monai.handlers import load_pretrained_weights
from ic_moe_monai.networks import ICMoE


def _square_label(batch: int = 4, size: int = 32) -> torch.Tensor:
    label = torch.zeros(batch, 1, size, size, dtype=torch.int64)
    label[:, 0, 8:20, 10:22] = 1
    label[:, 0, 22:28, 4:12] = 2
    return label


def _at(label: torch.Tensor, i: int, point: torch.Tensor) -> int:
    col, row = (int(v) for v in point)
    return int(label[i, 0, row, col])


def test_clicks_from_labels_lie_inside_or_near_one_class():
    label = _square_label()
    points, point_labels = simulate_clicks(label, max_clicks=3, rng=np.random.default_rng(0))
    assert points.shape == (4, 3, 2) and point_labels.shape == (4, 3)
    for i in range(4):
        real = point_labels[i] >= 0
        assert real.any() and (point_labels[i][~real] == -1).all()
        assert point_labels[i, 0] == 1  # without a prediction, the first click is on the object
        target = _at(label, i, points[i, 0])
        assert target in (1, 2)
        for point, positive in zip(points[i][real], point_labels[i][real], strict=True):
            value = _at(label, i, point)
            assert (value == target) if positive == 1 else (value != target)


def test_first_click_corrects_the_larger_error():
    label = _square_label(batch=1)
    missed = torch.zeros_like(label)  # nothing predicted: the first click is a foreground click on the object
    points, point_labels = simulate_clicks(label, missed, rng=np.random.default_rng(1))
    assert point_labels[0, 0] == 1 and _at(label, 0, points[0, 0]) != 0

    only_one = torch.zeros_like(label)
    only_one[label == 1] = 1
    over = only_one.clone()
    over[0, 0, 0:6, 24:32] = 1  # a false positive of class 1, larger than nothing missed
    for seed in range(5):
        points, point_labels = simulate_clicks(only_one.clone(), over, rng=np.random.default_rng(seed))
        assert point_labels[0, 0] == 0
        col, row = (int(v) for v in points[0, 0])
        assert 0 <= row < 6 and 24 <= col < 32


def test_empty_slice_gets_one_background_click():
    _, point_labels = simulate_clicks(torch.zeros(2, 1, 16, 16, dtype=torch.int64), max_clicks=2)
    assert (point_labels[:, 0] == 0).all() and (point_labels[:, 1] == -1).all()
    with pytest.raises(ValueError, match="max_clicks"):
        simulate_clicks(torch.zeros(1, 1, 8, 8), max_clicks=0)


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


def test_load_pretrained_weights(tmp_path):
    net = ICMoE(num_classes=2, img_size=32, encoder="lite")
    state = net.state_dict()
    other = ICMoE(num_classes=2, img_size=32, encoder="lite")
    assert load_pretrained_weights(other, None) is False
    for name, saved in (("plain.pt", state), ("checkpoint.pt", {"model": state}),
                        ("ddp.pt", {f"module.{k}": v for k, v in state.items()})):  # fmt: skip
        torch.save(saved, tmp_path / name)
        fresh = ICMoE(num_classes=2, img_size=32, encoder="lite")
        assert load_pretrained_weights(fresh, tmp_path / name) is True
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    torch.save(ICMoE(num_classes=1, img_size=32, encoder="lite").state_dict(), tmp_path / "one_class.pt")
    with pytest.raises(ValueError, match=r"one_class\.pt"):
        load_pretrained_weights(other, tmp_path / "one_class.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_pretrained_weights(other, tmp_path / "missing.pt")
