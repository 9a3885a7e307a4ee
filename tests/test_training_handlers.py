"""The training's own handlers on small ignite engines: resumable checkpoints (retention, finished runs, another
task's checkpoint, the best metric), Ctrl-C, validation by steps or minutes, the clock that the time limit and the
learning-rate schedule share, the end-of-training line, MLflow parameters and one-line errors."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointSaver

import ic_moe_monai.training.handlers as handlers
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks.checkpoints import StampedWeights, checkpoint_info
from ic_moe_monai.training.engines import WarmupCosineSchedule
from ic_moe_monai.training.handlers import MLflowRunSettings, TrainingClock, TrainingSummary, TrainingTimeLimit
from ic_moe_monai.training.resume import INTERRUPTED_NAME, BestMetric, TrainingCheckpoints, checkpoint_files

from .conftest import REPO_ROOT

NAMES = {0: "background", 1: "liver"}


class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.steps = torch.nn.Parameter(torch.zeros(()))


def _trainer(net: Counter, max_epochs: int, on_iteration=None) -> Engine:
    """An engine counting its steps in ``net``, with ``max_epochs`` set when it is made (as MONAI's trainers)."""

    def step(engine: Engine, batch: int) -> None:
        with torch.no_grad():
            net.steps += 1
        if on_iteration is not None:
            on_iteration(engine)

    engine = Engine(step)
    engine.state.max_epochs = max_epochs
    return engine


def _checkpoints(folder: Path, net: Counter, trainer: Engine, **kwargs) -> TrainingCheckpoints:
    info = checkpoint_info(NAMES)
    clock = TrainingClock()
    clock.attach(trainer)
    saves = {"model": StampedWeights(net, info), "trainer": trainer, "clock": clock}
    checkpoints = TrainingCheckpoints(folder, saves, **kwargs)
    checkpoints.attach(trainer)
    return checkpoints


def test_epoch_checkpoints_kept_newest_and_resumed(tmp_path):
    net = Counter()
    trainer = _trainer(net, 4)
    torch.save({}, tmp_path / "checkpoint_epoch=40.pt")  # an older run's, written before this one
    os.utime(tmp_path / "checkpoint_epoch=40.pt", (1, 1))
    _checkpoints(tmp_path, net, trainer, keep=2, resume=False)
    trainer.run([0] * 3, max_epochs=4)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["checkpoint_epoch=4.pt", "checkpoint_epoch=3.pt"]

    resumed_net = Counter()
    resumed = _trainer(resumed_net, 6)
    checkpoints = _checkpoints(tmp_path, resumed_net, resumed)
    resumed.run([0] * 3, max_epochs=6)
    assert checkpoints.loaded == tmp_path / "checkpoint_epoch=4.pt"
    assert resumed.state.iteration == 18 and float(resumed_net.steps) == 18  # epochs 5 and 6 only


def test_a_finished_run_is_not_resumed_and_another_tasks_checkpoint_is_refused(tmp_path):
    net = Counter()
    trainer = _trainer(net, 2)
    _checkpoints(tmp_path, net, trainer, resume=False)
    trainer.run([0] * 2, max_epochs=2)
    again = _trainer(Counter(), 2)
    assert _checkpoints(tmp_path, Counter(), again).loaded is None  # epoch 2 of 2: the same command trains anew

    timed = _trainer(Counter(), 5)
    clock = TrainingClock()
    limit = TrainingTimeLimit(max_minutes=1e-9, clock=clock)
    limit.attach(timed)
    TrainingCheckpoints(tmp_path / "timed", {"model": Counter(), "trainer": timed, "clock": clock}).attach(timed)
    timed.run([0] * 2, max_epochs=5)
    assert timed.state.epoch == 1 and clock.time_limit_reached
    later = TrainingCheckpoints(tmp_path / "timed", {"trainer": _trainer(Counter(), 5)})
    later.attach(_trainer(Counter(), 5))
    assert later.loaded is None  # the time limit ended that run: it is finished

    later_run = _trainer(Counter(), 5)
    other = {"model": StampedWeights(Counter(), checkpoint_info({0: "background", 1: "spleen"})), "trainer": later_run}
    with pytest.raises(ConfigError, match=r"checkpoint_epoch=2\.pt was trained for 1 class \(liver\)"):
        TrainingCheckpoints(tmp_path, other).attach(later_run)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tmp_path, caplog):
    def press_ctrl_c(engine: Engine) -> None:
        if engine.state.iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)

    net = Counter()
    trainer = _trainer(net, 4, press_ctrl_c)
    previous = signal.getsignal(signal.SIGINT)
    checkpoints = _checkpoints(tmp_path, net, trainer, resume=False)
    with caplog.at_level("WARNING"):
        trainer.run([0] * 3, max_epochs=4)
    assert trainer.state.iteration == 5 and checkpoints.interrupted
    assert signal.getsignal(signal.SIGINT) is previous  # given back
    lines = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert len(lines) == 1 and INTERRUPTED_NAME in lines[0] and "run the same command to resume" in lines[0]
    with pytest.raises(SystemExit) as leaving:
        checkpoints.exit_if_interrupted()
    assert leaving.value.code == 130

    resumed_net = Counter()
    resumed = _trainer(resumed_net, 4)
    loader = _checkpoints(tmp_path, resumed_net, resumed)
    resumed.run([0] * 3, max_epochs=4)
    assert loader.loaded == tmp_path / INTERRUPTED_NAME
    assert float(resumed_net.steps) == 12 and resumed.state.iteration == 12  # iterations 6 … 12
    assert not (tmp_path / INTERRUPTED_NAME).exists()  # superseded by the next epoch's checkpoint


def _evaluator(score: float, folder: Path, model: torch.nn.Module) -> tuple[SupervisedEvaluator, CheckpointSaver]:
    """An evaluator whose one validation scores ``score``, with MONAI's key-metric saver writing model.pt."""
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=[0], network=model, iteration_update=lambda e, b: {})
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.state.metrics.update(score=score))
    saver = CheckpointSaver(str(folder), {"model": model}, save_key_metric=True, key_metric_name="score",
                            key_metric_filename="model.pt")  # fmt: skip
    saver.attach(evaluator)
    return evaluator, saver


def test_best_metric_is_restored_so_a_worse_validation_does_not_replace_the_model(tmp_path):
    model = torch.nn.Linear(1, 1)
    evaluator, saver = _evaluator(0.8, tmp_path, model)
    best = BestMetric(evaluator, saver)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 3
    state = best.state_dict()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    before = (tmp_path / "model.pt").stat().st_mtime_ns

    fresh_model = torch.nn.Linear(1, 1)
    evaluator2, saver2 = _evaluator(0.5, tmp_path, fresh_model)
    BestMetric(evaluator2, saver2).load_state_dict(state)
    assert evaluator2.state.best_metric == 0.8 and evaluator2.state.best_metric_epoch == 3
    time.sleep(0.01)
    evaluator2.run()  # scores 0.5 < 0.8: the best model stays
    assert (tmp_path / "model.pt").stat().st_mtime_ns == before


def test_validation_every_n_steps_and_every_n_minutes(monkeypatch):
    runs: list[int] = []
    schedule = handlers.ValidationSchedule(None, interval_steps=4)
    record = lambda self, engine: runs.append(engine.state.iteration)  # noqa: E731 (the validation run, counted)
    monkeypatch.setattr(handlers.ValidationSchedule, "__call__", record)
    trainer = Engine(lambda e, b: None)
    schedule.attach(trainer)
    trainer.run([0] * 3, max_epochs=3)
    assert runs == [4, 8, 9]  # every 4th step, and the end of the last epoch

    clock = {"now": 0.0}
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock["now"])
    runs.clear()
    by_time = handlers.ValidationSchedule(None, interval_minutes=1.0)
    timed = Engine(lambda e, b: clock.__setitem__("now", clock["now"] + 25.0))  # 25 s per step
    by_time.attach(timed)
    timed.run([0] * 5, max_epochs=2)
    assert runs == [3, 6, 9, 10]  # 75 s, 150 s, 225 s after the previous one, and the end
    with pytest.raises(ConfigError, match="at most one"):
        handlers.ValidationSchedule(None, interval_steps=2, interval_minutes=1.0)


def test_learning_rate_schedule_follows_the_time_budget():
    """With a time limit, the cosine reaches its end when the budget does, long before max_epochs would."""

    class Clock:
        now = 0.0

        def seconds(self) -> float:
            return self.now

    clock = Clock()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineSchedule(opt, warmup_steps=2, t_total=1000, clock=clock, max_minutes=1.0)
    steps_only = WarmupCosineSchedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 1000)
    rates = []
    for step in range(10):
        clock.now = 60.0 * step / 9  # the budget is used up at the tenth step
        opt.step()
        schedule.step()
        steps_only.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[-1] == pytest.approx(0.0, abs=1e-9) and all(a >= b for a, b in itertools.pairwise(rates[2:]))
    assert steps_only.optimizer.param_groups[0]["lr"] > 0.99  # by steps alone, barely started
    assert "clock" not in schedule.state_dict()  # the clock's time is saved on its own
    half = WarmupCosineSchedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 1000)
    half.load_state_dict(schedule.state_dict())


def test_clock_counts_earlier_runs_for_the_time_limit():
    clock = TrainingClock()
    clock.load_state_dict({"seconds": 60 * 60.0, "time_limit_reached": False})  # an earlier run used it all
    engine = Engine(lambda e, b: None)
    TrainingTimeLimit(max_minutes=60, clock=clock).attach(engine)
    engine.run([0], max_epochs=10)
    assert engine.state.epoch == 1 and clock.time_limit_reached and clock.state_dict()["seconds"] >= 3600


def test_summary_line_names_best_metric_epoch_and_model(tmp_path, caplog):
    class State:
        best_metric, best_metric_epoch = 0.8123, 7

    class Evaluator:
        state = State()

    (tmp_path / "model.pt").write_bytes(b"x")
    engine = Engine(lambda e, b: None)
    summary = TrainingSummary(Evaluator(), tmp_path / "model.pt")
    summary.attach(engine)
    with caplog.at_level("INFO"):
        engine.run([0], max_epochs=9)
    assert summary.message == f"training finished after epoch 9: best val_mean_dice 0.8123 at epoch 7; model: " \
                              f"{tmp_path / 'model.pt'}"  # fmt: skip
    assert summary.message in caplog.text


def test_mlflow_gets_the_run_settings():
    logged = {}

    class Client:
        def log_batch(self, run_id, params):
            logged.update({p.key: p.value for p in params})
            logged["run"] = run_id

    class MLFlowHandler:  # what MONAI's handler offers: a client and the current run
        client = Client()
        cur_run = type("Run", (), {"info": type("Info", (), {"run_id": "r1"})()})()

        def start(self, engine):
            pass

    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.STARTED, MLFlowHandler().start)
    MLflowRunSettings({"learning_rate": 0.001, "label_names": {"0": "background", "1": "liver"}}).attach(engine)
    engine.run([0], max_epochs=1)
    assert logged == {"learning_rate": "0.001", "label_names": '{"0": "background", "1": "liver"}', "run": "r1"}


def test_unknown_window_or_modality_and_wrapped_config_errors_are_one_line():
    from ic_moe_monai.data.transforms import IntensityPresetd

    with pytest.raises(ConfigError, match="ct_window 'abdomn' is not a known window"):
        IntensityPresetd("image", modality="ct", window="abdomn")
    with pytest.raises(ConfigError, match="modality 'pet' is not one of"):
        IntensityPresetd("image", modality="pet")
    code = ("import ic_moe_monai.errors as e; e.one_line_errors()\n"
            "try:\n    raise e.ConfigError('ct_window x: bad')\nexcept e.ConfigError as err:\n"
            "    raise RuntimeError('Failed to instantiate component') from err\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: ct_window x: bad"
