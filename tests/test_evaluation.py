"""Dice / HD95 conventions, reports, and the engine handlers."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from ic_moe_monai.inference.evaluation import case_metrics, summarize
from ic_moe_monai.training.handlers import LossTermsAverager, TrainingTimeLimit, iteration_log_filter
from tests.sync_check import NoHostSync


def _cube(shape, lo, hi, value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return out


def test_identical_masks():
    gt = _cube((20, 20, 20), (5, 5, 5), (12, 12, 12))
    m = case_metrics(gt, gt, [1], spacing=(1.0, 1.0, 1.0))
    assert m[1]["dice"] == 1.0 and m[1]["hd95"] == 0.0


def test_hd95_in_millimetres_follows_spacing():
    gt = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    pred = _cube((30, 30, 30), (8, 5, 5), (18, 15, 15))  # shifted 3 voxels along x
    in_voxels = case_metrics(pred, gt, [1], spacing=(1.0, 1.0, 1.0))[1]["hd95"]
    in_mm = case_metrics(pred, gt, [1], spacing=(2.0, 1.0, 1.0))[1]["hd95"]
    assert in_voxels == pytest.approx(3.0)
    assert in_mm == pytest.approx(6.0)
    assert case_metrics(pred, gt, [1])[1]["dice"] == pytest.approx(2 * 700 / 2000)


def test_empty_mask_rules_of_both_conventions():
    gt = _cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    empty = np.zeros_like(gt)
    # class present in the ground truth, nothing predicted
    assert case_metrics(empty, gt, [1])[1]["dice"] == 0.0 and math.isnan(case_metrics(empty, gt, [1])[1]["hd95"])
    assert case_metrics(empty, gt, [1], convention="samed")[1] == {"dice": 0.0, "hd95": 0.0}
    # class absent from the ground truth but predicted
    m = case_metrics(gt, empty, [1])[1]
    assert math.isnan(m["dice"]) and math.isnan(m["hd95"])
    assert case_metrics(gt, empty, [1], convention="samed")[1] == {"dice": 1.0, "hd95": 0.0}
    with pytest.raises(ValueError, match="convention"):
        case_metrics(gt, gt, [1], convention="nnunet")
    with pytest.raises(ValueError, match="differ in shape"):
        case_metrics(gt, gt[:5], [1])


def test_samed_hd95_pools_both_directions_in_voxels():
    gt = _cube((40, 40, 40), (10, 10, 10), (20, 20, 20))
    pred = _cube((40, 40, 40), (10, 10, 10), (26, 20, 20))  # one side extends 6 voxels
    samed = case_metrics(pred, gt, [1], spacing=(5.0, 5.0, 5.0), convention="samed")[1]["hd95"]
    monai = case_metrics(pred, gt, [1], spacing=(1.0, 1.0, 1.0))[1]["hd95"]
    assert samed <= monai  # pooling both directions can only lower the 95th percentile of the worse direction
    assert samed < 10  # in voxels: the 5 mm spacing is ignored


def test_summary_leaves_out_undefined_values():
    rows = [
        {"case": "a", "x_dice": 0.8, "x_hd95": 2.0},
        {"case": "b", "x_dice": math.nan, "x_hd95": math.nan},
        {"case": "c", "x_dice": 0.6, "x_hd95": 4.0},
    ]
    s = summarize(rows, {1: "x"})
    assert s["x_dice"]["mean"] == pytest.approx(0.7)
    assert s["x_dice"]["cases"] == 2 and s["x_dice"]["undefined"] == 1
    assert s["mean_dice"]["mean"] == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------ handlers
def test_loss_terms_averaged_per_epoch():
    class FakeLoss:
        def __init__(self) -> None:
            self.last_terms: dict[str, float] = {}

    loss = FakeLoss()
    values = iter([1.0, 3.0, 5.0, 7.0])

    def step(engine, batch):
        loss.last_terms = {"dice_ce": next(values)}

    engine = Engine(step)
    LossTermsAverager(loss).attach(engine)
    epochs = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.metrics["loss_dice_ce"]))
    engine.run([0, 1], max_epochs=2)
    assert epochs == [2.0, 6.0]


def test_loss_terms_accumulate_on_the_device_without_host_sync():
    """ICMoELoss's terms are summed on the device during the epoch and read once at its end."""
    from ic_moe_monai.training.losses import ICMoELoss

    torch.manual_seed(0)
    loss_fn = ICMoELoss(num_classes=2)
    logits = torch.randn(2, 3, 8, 8)
    targets = [torch.randint(0, 3, (2, 1, 8, 8)) for _ in range(3)]
    engine = Engine(lambda e, batch: loss_fn(logits, targets[batch]))
    LossTermsAverager(loss_fn).attach(engine)
    mode, seen = NoHostSync(), []

    def leave(engine: Engine) -> None:
        mode.__exit__(None, None, None)
        seen.append(loss_fn.last_terms)  # read outside the check

    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: mode.__enter__())
    engine.add_event_handler(Events.ITERATION_COMPLETED, leave)  # after the averager: it ran inside the check
    engine.run([0, 1, 2], max_epochs=1)
    for name in ("dice_ce", "total"):
        assert engine.state.metrics[f"loss_{name}"] == pytest.approx(np.mean([t[name] for t in seen]), rel=1e-6)


def test_iteration_log_filter_every_n_and_each_epochs_last():
    engine = Engine(lambda e, b: None)
    logged = []
    engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=iteration_log_filter(4)),
                             lambda e: logged.append(e.state.iteration))  # fmt: skip
    engine.run(range(3), max_epochs=3)
    assert logged == [3, 4, 6, 8, 9]


def test_time_limit_stops_before_the_budget():
    engine = Engine(lambda e, b: time.sleep(0.05))
    TrainingTimeLimit(max_minutes=0.35 / 60).attach(engine)  # 0.35 s: room for 3 epochs of ~0.1 s, not 4
    engine.run([0, 1], max_epochs=20)
    assert 2 <= engine.state.epoch <= 3
    unlimited = Engine(lambda e, b: None)
    TrainingTimeLimit(max_minutes=None).attach(unlimited)
    unlimited.run([0], max_epochs=5)
    assert unlimited.state.epoch == 5


def test_time_limit_does_not_plan_with_a_first_epoch_that_paid_one_off_costs():
    """A first epoch that fills a cache (0.3 s) must not make every later estimate that long (they take ~0.02 s)."""
    engine = Engine(lambda e, b: time.sleep(0.3 if e.state.epoch == 1 else 0.02))
    TrainingTimeLimit(max_minutes=0.7 / 60).attach(engine)  # planned with 0.3 s per epoch it would stop at epoch 3
    engine.run([0], max_epochs=30)
    assert engine.state.epoch >= 6


def test_reports_are_valid_json_with_null_for_undefined(tmp_path):
    """metrics_summary.json holds null, never NaN (not JSON), where a value is undefined."""
    import json

    from ic_moe_monai.inference.evaluation import write_reports

    rows = [{"case": "a", "liver_dice": 0.9, "liver_hd95": math.nan}, {"case": "b", "liver_dice": math.nan,
                                                                       "liver_hd95": math.nan}]  # fmt: skip
    write_reports(rows, {1: "liver"}, tmp_path, "monai")
    text = (tmp_path / "metrics_summary.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))["summary"]
    assert summary["liver_hd95"]["mean"] is None and summary["liver_dice"]["mean"] == pytest.approx(0.9)
