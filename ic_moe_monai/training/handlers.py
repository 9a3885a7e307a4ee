"""Ignite / MONAI engine handlers used by the bundle's configs."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

from ic_moe_monai.data.datasets import case_name
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.inference.evaluation import case_metrics, write_reports
from ic_moe_monai.inference.quality import (
    cross_validated_report,
    file_sha256,
    geometry_signals,
    label_dice,
    write_quality_report,
)
from ic_moe_monai.networks.fine_tuning import load_pretrained_weights

__all__ = [
    "CaseMetricsWriter",
    "LossTermsAverager",
    "MLflowRunSettings",
    "QualityCalibrationWriter",
    "TrainingClock",
    "TrainingSummary",
    "TrainingTimeLimit",
    "ValidationSchedule",
    "iteration_log_filter",
    "load_pretrained_weights",
]

logger = logging.getLogger(__name__)


class LossTermsAverager:
    """Average each term of :class:`~ic_moe_monai.training.losses.ICMoELoss` over an epoch into ``engine.state.metrics``
    as ``loss_<term>``, so MONAI's StatsHandler, TensorBoardStatsHandler and MLFlowHandler log every term.

    The sums stay on the device (the loss's ``last_values``, added after every iteration) and are read once, when
    the epoch completes, so the training loop never waits for the device to log. A loss that offers only a
    ``last_terms`` dict of floats is averaged on the host. Attach it before the logging handlers (handlers run in
    attach order).

    Args:
        loss: the loss object; its ``last_values`` / ``term_names`` (or ``last_terms``) are read after every
            iteration.
        prefix: metric name prefix.
    """

    def __init__(self, loss: Any, prefix: str = "loss_") -> None:
        self.loss = loss
        self.prefix = prefix
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}
        self._counts: dict[tuple[str, ...], int] = defaultdict(int)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._counts.clear()

    def _accumulate(self, engine: Engine) -> None:
        values = getattr(self.loss, "last_values", None)
        if values is not None:
            names = tuple(self.loss.term_names)
        else:
            terms = getattr(self.loss, "last_terms", {})
            if not terms:
                return
            names, values = tuple(terms), torch.tensor(list(terms.values()), dtype=torch.float64)
        total = self._sums.get(names)
        if total is None:
            self._sums[names] = values.detach().clone()
        else:
            total.add_(values.detach())
        self._counts[names] += 1

    def _publish(self, engine: Engine) -> None:
        for names, total in self._sums.items():
            means = (total / self._counts[names]).tolist()  # the epoch's one host sync
            for name, value in zip(names, means, strict=True):
                engine.state.metrics[f"{self.prefix}{name}"] = value


def iteration_log_filter(every: int) -> Callable[[Engine, int], bool]:
    """An ignite event filter for the ``iteration_log`` of MONAI's StatsHandler / TensorBoardStatsHandler: every
    ``every``-th iteration and the last of each epoch. Logging the loss reads it on the host, which waits for the
    device; doing it every iteration would keep a GPU from running ahead of the host.
    """
    every = max(1, int(every))

    def _filter(engine: Engine, iteration: int) -> bool:
        length = engine.state.epoch_length
        return iteration % every == 0 or bool(length and iteration % length == 0)

    return _filter


class TrainingClock:
    """Training time across resumed runs, for the time limit and the learning-rate schedule.

    Counts from the engine's start (``attach`` it before the handlers that read it); a resumed run adds the time of
    the runs before it (its state dict is part of the training checkpoints). ``time_limit_reached`` is set by
    :class:`TrainingTimeLimit` when it ends the run, so that the run counts as finished.
    """

    def __init__(self) -> None:
        self._before = 0.0
        self._start: float | None = None
        self.time_limit_reached = False
        self._engines: set[int] = set()

    def attach(self, engine: Engine) -> None:
        if id(engine) not in self._engines:  # several handlers share one clock
            self._engines.add(id(engine))
            engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def seconds(self) -> float:
        """Training seconds so far, earlier runs included."""
        return self._before + (time.monotonic() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "time_limit_reached": self.time_limit_reached}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._before = float(state.get("seconds", 0.0))
        self._start = time.monotonic() if self._start is not None else None
        self.time_limit_reached = bool(state.get("time_limit_reached", False))


class TrainingTimeLimit:
    """Stop training cleanly, at the end of an epoch, before a wall-clock budget runs out.

    Attach it after the validation handler, so the last epoch is still validated. After each epoch it compares the
    training time so far plus the longest epoch so far with ``max_minutes``, and terminates when the next epoch would
    not fit (under torch.distributed: when it would not fit on some rank, so all ranks stop together). The first epoch
    of a run counts only until a second one is done: it also pays one-off costs (warm-up, filling a cache of
    frozen-encoder features) that later epochs do not. Validation and checkpoints of the finished epochs are kept.
    With a shared :class:`TrainingClock` the budget covers resumed runs too (the clock's time is saved with the
    checkpoints), and the learning-rate schedule can follow the same clock.

    Args:
        max_minutes: the budget; ``None`` or a value ≤ 0 means no limit.
        clock: the training clock (default: one of its own, counting this run only).
    """

    def __init__(self, max_minutes: float | None, clock: TrainingClock | None = None) -> None:
        self.max_seconds = None if not max_minutes or max_minutes <= 0 else float(max_minutes) * 60
        self.clock = clock if clock is not None else TrainingClock()
        self._epoch_start = 0.0
        self._first = 0.0
        self._longest = 0.0

    def attach(self, engine: Engine) -> None:
        self.clock.attach(engine)
        if self.max_seconds is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.monotonic()

    def _check(self, engine: Engine) -> None:
        took = time.monotonic() - self._epoch_start
        if not self._first:
            self._first = took
        else:
            self._longest = max(self._longest, took)
        used = self.clock.seconds()
        stop = torch.tensor(float(used + (self._longest or self._first) > self.max_seconds))
        if dist.is_available() and dist.is_initialized():  # every rank must stop at the same epoch
            stop = stop.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            logger.info(
                "time limit: %.1f of %.1f min used, the next epoch would not fit; stopping after epoch %d.",
                used / 60,
                self.max_seconds / 60,
                engine.state.epoch,
            )
            self.clock.time_limit_reached = True
            engine.terminate()


class ValidationSchedule(ValidationHandler):
    """MONAI's ``ValidationHandler`` with the interval in epochs, in training steps or in minutes.

    - ``interval`` epochs (default, as MONAI's): after every ``interval``-th epoch;
    - ``interval_steps``: after every ``interval_steps``-th iteration;
    - ``interval_minutes``: after the first iteration that ends ``interval_minutes`` after the previous validation
      (or the start); the clock is read on the host only (no device sync); under torch.distributed the ranks agree
      on it every ``sync_every`` iterations.

    With steps or minutes, the last epoch (``max_epochs``) is validated at its end too, when steps ran since the
    last validation, and so is the end of a run the time limit stops (seen on the shared :class:`TrainingClock`).
    Each validation runs the evaluator with the trainer's epoch.

    Args:
        validator: the evaluator.
        interval: epochs between validations (used when neither of the others is set).
        interval_steps: iterations between validations.
        interval_minutes: minutes between validations.
        clock: the training clock (to validate the end of a run the time limit stops).
        sync_every: iterations between the ranks' agreement on the minutes.
        exec_at_start: also validate before training starts.
    """

    def __init__(
        self,
        validator: Any,
        interval: int = 1,
        interval_steps: int | None = None,
        interval_minutes: float | None = None,
        clock: TrainingClock | None = None,
        sync_every: int = 10,
        exec_at_start: bool = False,
    ) -> None:
        super().__init__(interval=max(1, int(interval)), validator=validator, epoch_level=True,
                         exec_at_start=exec_at_start)  # fmt: skip
        if interval_steps and interval_minutes:
            raise ConfigError("give at most one of val_interval_steps and val_interval_minutes.")
        self.interval_steps = int(interval_steps) if interval_steps else None
        self.interval_seconds = float(interval_minutes) * 60 if interval_minutes else None
        self.clock = clock
        self.sync_every = max(1, int(sync_every))
        self._last_time = 0.0
        self._last_iteration = 0

    def attach(self, engine: Engine) -> None:
        if self.interval_steps is None and self.interval_seconds is None:
            super().attach(engine)
            return
        engine.add_event_handler(Events.STARTED, self._started)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self._validate)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.TERMINATE, self._terminated)

    def _started(self, engine: Engine) -> None:
        self._last_time, self._last_iteration = time.monotonic(), engine.state.iteration

    def _validate(self, engine: Engine) -> None:
        self(engine)
        self._last_time, self._last_iteration = time.monotonic(), engine.state.iteration

    def _iteration_completed(self, engine: Engine) -> None:
        if self.interval_steps is not None:
            due = engine.state.iteration % self.interval_steps == 0
        else:
            due = time.monotonic() - self._last_time >= self.interval_seconds
            if dist.is_available() and dist.is_initialized():  # every rank validates at the same step
                if engine.state.iteration % self.sync_every:
                    return
                flag = torch.tensor(float(due), device="cuda" if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                due = flag.item() > 0
        if due:
            self._validate(engine)

    def _epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs and engine.state.iteration > self._last_iteration:
            self._validate(engine)

    def _terminated(self, engine: Engine) -> None:
        stopped_by_time = self.clock is not None and self.clock.time_limit_reached
        if stopped_by_time and engine.state.iteration > self._last_iteration:
            self._validate(engine)


class TrainingSummary:
    """One line when training ends (also when the time limit ends it): the best validation metric, its epoch, and
    where the model is.

    Args:
        evaluator: the validation evaluator (its ``best_metric`` / ``best_metric_epoch``), or None.
        model_path: the model file the training writes (the best validated weights, or the last ones without
            validation cases).
        metric_name: how to call the metric.
    """

    def __init__(self, evaluator: Any, model_path: str | Path, metric_name: str = "val_mean_dice") -> None:
        self.evaluator, self.model_path, self.metric_name = evaluator, Path(model_path), metric_name
        self.message = ""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = getattr(self.evaluator, "state", None)
        best = float(getattr(state, "best_metric", -1)) if state is not None else -1
        where = self.model_path if self.model_path.is_file() else f"{self.model_path} (not written)"
        if best == -1:
            self.message = f"training finished after epoch {engine.state.epoch}, without validation; model: {where}"
        else:
            epoch = int(getattr(state, "best_metric_epoch", -1))
            self.message = (f"training finished after epoch {engine.state.epoch}: best {self.metric_name} "
                            f"{best:.4f} at epoch {epoch}; model: {where}")  # fmt: skip
        logger.info(self.message)


class MLflowRunSettings:
    """Log the run's settings as parameters of the MLflow run that MONAI's ``MLFlowHandler`` (``--tracking
    mlflow``) opens for the trainer: MONAI's handler records only ``max_epochs`` and ``epoch_length``.

    Attach it after the trainer's handlers (the configs do, in ``initialize``): when the run starts it finds the
    ``MLFlowHandler`` attached to the trainer and logs ``params`` through its client; without one it does nothing.

    Args:
        params: ``{name: value}``; values are logged as text (dicts and lists as JSON).
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for handler in _attached_handlers(engine, Events.STARTED):
            if type(handler).__name__ == "MLFlowHandler" and getattr(handler, "cur_run", None) is not None:
                self.log(handler.client, handler.cur_run.info.run_id)

    def log(self, client: Any, run_id: str) -> None:
        """Log the parameters into run ``run_id`` with an ``mlflow.MlflowClient``."""
        from mlflow.entities import Param

        params = [Param(str(k), _param_text(v)) for k, v in self.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run_id, params=params[start : start + 100])


def _attached_handlers(engine: Engine, event: Events) -> list[Any]:
    """The objects whose bound methods handle ``event`` on ``engine`` (ignite keeps no other registry)."""
    owners = []
    for handler, _, _ in engine._event_handlers.get(event, []):
        owner = getattr(handler, "__self__", None) or getattr(getattr(handler, "func", None), "__self__", None)
        if owner is not None:
            owners.append(owner)
    return owners


def _param_text(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str)[:6000]
    return str(value)[:6000]


class CaseMetricsWriter:
    """Per-case, per-class Dice and HD95 of an evaluation run, written as CSV and JSON when the run ends.

    Reads ``pred`` and ``label`` (one-hot ``(K+1, ...)`` or label maps ``(1, ...)``) from each decollated item of
    ``engine.state.output``; the case name and voxel spacing come from the label's metadata. Under
    ``torch.distributed``, rows are gathered and rank 0 writes.

    Args:
        output_dir: where ``metrics_per_case.csv``, ``metrics_summary.csv`` and ``metrics_summary.json`` go.
        class_names: ``{class_id: name}`` of the foreground classes.
        convention: ``"monai"`` (HD95 in mm) or ``"samed"`` (TransUNet / SAMed rules, HD95 in voxels).
    """

    def __init__(self, output_dir: str | Path, class_names: Mapping[int | str, str], convention: str = "monai") -> None:
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): v for k, v in class_names.items() if int(k) != 0}
        self.convention = convention
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, dict[str, float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            pred, label = _label_map(item["pred"]), _label_map(item["label"])
            meta = getattr(item["label"], "meta", {})
            affine = np.asarray(meta.get("affine", np.eye(4)))
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).tolist()
            name = case_name(str(meta.get("filename_or_obj", f"case_{len(self.rows)}")))
            metrics = case_metrics(pred, label, list(self.class_names), spacing, self.convention)
            row: dict[str, Any] = {"case": name}
            for c, cname in self.class_names.items():
                row[f"{cname}_dice"] = metrics[c]["dice"]
                row[f"{cname}_hd95"] = metrics[c]["hd95"]
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, rows)
            if dist.get_rank() != 0:
                return
            rows = [r for part in gathered for r in part]
        rows = sorted(rows, key=lambda r: r["case"])
        self.summary = write_reports(rows, self.class_names, self.output_dir, self.convention)
        logger.info("per-case metrics of %d case(s) written to %s", len(rows), self.output_dir)


def _label_map(value: Any) -> np.ndarray:
    array = torch.as_tensor(value).detach().cpu()
    array = array.argmax(dim=0) if array.shape[0] > 1 else array[0]  # one-hot / probabilities, or a label map
    return array.numpy().astype(np.int64)


class QualityCalibrationWriter:
    """Fit the bundle's quality score on an evaluation run's cases and say how well it predicts their Dice.

    After each case it takes the quality signals the inferer collected (``SliceContextInferer(quality=True)``) and
    the case's true Dice per label; when the run ends it writes ``quality_vs_dice.csv`` and
    ``quality_summary.json`` (leave-one-out scores against true Dice, see
    :func:`~ic_moe_monai.inference.quality.cross_validated_report`) to ``output_dir``, and the calibration fitted on all
    cases to ``calibration_path`` (the bundle's ``models/quality.json``, which ``segment`` and MONAI Label read).

    Args:
        inferer: the evaluator's inferer (its ``last_signals``).
        output_dir: where the reports go.
        class_names: ``{class_id: name}`` of the foreground classes.
        calibration_path: where the calibration goes; ``None`` writes none.
        checkpoint: the evaluated weights file; the calibration records its SHA-256, and is used with it only.
        slice_axis: the inferer's slice axis.
    """

    def __init__(
        self,
        inferer: Any,
        output_dir: str | Path,
        class_names: Mapping[int | str, str],
        calibration_path: str | Path | None = None,
        checkpoint: str | Path | None = None,
        slice_axis: int = 2,
    ) -> None:
        if not getattr(inferer, "quality", False):
            raise ConfigError("QualityCalibrationWriter needs an inferer that collects quality signals (quality=true).")
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): v for k, v in class_names.items() if int(k) != 0}
        self.calibration_path = Path(calibration_path) if calibration_path else None
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.slice_axis = slice_axis
        self.cases: list[tuple[str, dict[str, Any], dict[str, float]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        if len(items) != len(self.inferer.last_signals):
            raise ConfigError("quality signals need the evaluator's inferer (one set of signals per case).")
        for item, signals in zip(items, self.inferer.last_signals, strict=True):
            image = item["image"]
            meta = getattr(item["label"], "meta", {})
            affine = getattr(image, "affine", np.eye(4))
            signals = geometry_signals(signals, affine, image.shape[1:], self.slice_axis)
            dice = label_dice(_label_map(item["pred"]), _label_map(item["label"]), self.class_names)
            name = case_name(str(meta.get("filename_or_obj", f"case_{len(self.cases)}")))
            self.cases.append((name, signals, dice))

    def _write(self, engine: Engine) -> None:
        cases = self.cases
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, cases)
            if dist.get_rank() != 0:
                return
            cases = [c for part in gathered for c in part]
        if not cases:
            return
        cases = sorted(cases, key=lambda c: c[0])
        names, signals, dice = (list(v) for v in zip(*cases, strict=True))
        calibration, rows, summary = cross_validated_report(self.class_names, names, signals, dice)
        write_quality_report(self.output_dir, rows, summary)
        signals_file = self.output_dir / "quality_signals.json"  # what the fit saw, to study or refit it
        signals_file.write_text(json.dumps([{"case": c, "dice": d, "signals": s} for c, s, d in cases]) + "\n")
        if self.calibration_path is not None:
            if self.checkpoint is not None and self.checkpoint.is_file():
                calibration.checkpoint_sha256 = file_sha256(self.checkpoint)
            self.calibration_path.parent.mkdir(parents=True, exist_ok=True)
            calibration.save(self.calibration_path)
        logger.info(
            "quality score on %d case(s): Spearman %.3f with the true Dice, mean error %.3f (leave-one-out); "
            "calibration written to %s", summary["cases"], summary["spearman"], summary["mae"],
            self.calibration_path or "nowhere",
        )  # fmt: skip
