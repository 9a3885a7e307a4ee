"""Ignite / MONAI engine handlers used by the bundle's configs."""

from __future__ import annotations

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
from monai.handlers import CheckpointLoader

from ic_moe_monai.data import case_name
from ic_moe_monai.evaluation import case_metrics, write_reports

__all__ = [
    "CaseMetricsWriter",
    "LossTermsAverager",
    "ResumeCheckpointLoader",
    "iteration_log_filter",
    "latest_checkpoint",
    "load_pretrained_weights",
]

logger = logging.getLogger(__name__)


class LossTermsAverager:
    """Average each term of :class:`~ic_moe_monai.losses.ICMoELoss` over an epoch into ``engine.state.metrics``
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


class TrainingTimeLimit:
    """Stop training cleanly, at the end of an epoch, before a wall-clock budget runs out.

    Attach it after the ValidationHandler, so the last epoch is still validated. After each epoch it compares the
    time used since the engine started plus the longest epoch so far with ``max_minutes``, and terminates when the
    next epoch would not fit (under torch.distributed: when it would not fit on some rank, so all ranks stop
    together). Validation and checkpoints of the finished epochs are kept; a resumed run gets a fresh budget.

    Args:
        max_minutes: the budget; ``None`` or a value ≤ 0 means no limit.
    """

    def __init__(self, max_minutes: float | None) -> None:
        self.max_seconds = None if not max_minutes or max_minutes <= 0 else float(max_minutes) * 60
        self._start = 0.0
        self._epoch_start = 0.0
        self._longest = 0.0

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.monotonic()

    def _check(self, engine: Engine) -> None:
        now = time.monotonic()
        self._longest = max(self._longest, now - self._epoch_start)
        stop = torch.tensor(float(now - self._start + self._longest > self.max_seconds))
        if dist.is_available() and dist.is_initialized():  # every rank must stop at the same epoch
            stop = stop.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            logger.info(
                "time limit: %.1f of %.1f min used, the next epoch would not fit; stopping after epoch %d.",
                (now - self._start) / 60,
                self.max_seconds / 60,
                engine.state.epoch,
            )
            engine.terminate()


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The newest ``<prefix>*.pt`` in ``ckpt_dir`` (by the epoch in its name, then modification time)."""
    candidates = list(Path(ckpt_dir).glob(f"{prefix}*.pt")) if Path(ckpt_dir).is_dir() else []
    if not candidates:
        return None

    return max(candidates, key=lambda path: (_epoch_in_name(path), path.stat().st_mtime))


def _epoch_in_name(path: Path) -> int:
    """The epoch CheckpointSaver put in a checkpoint's name (``checkpoint_epoch=N.pt``), or -1."""
    digits = "".join(ch if ch.isdigit() else " " for ch in path.stem).split()
    return int(digits[-1]) if digits else -1


def load_pretrained_weights(network: torch.nn.Module, path: str | Path | None) -> bool:
    """Start a training from a model's weights (fine-tuning), e.g. the shipped ``models/model.pt``.

    Accepts a plain state dict or a training checkpoint with a ``"model"`` entry, and a network wrapped in
    DistributedDataParallel. A resumed checkpoint (:class:`ResumeCheckpointLoader`) is loaded later, when the
    engine starts, so an interrupted fine-tuning continues from its own last epoch.

    Returns:
        False when ``path`` is empty (nothing to load), True once loaded.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no weights that fit the network (the message names the file).
    """
    if not path:
        return False
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    target = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    try:
        target.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except (RuntimeError, AttributeError) as err:
        raise ValueError(f"pretrained weights {path} do not fit the network: {str(err).splitlines()[0]}") from err
    logger.info("fine-tuning from %s", path)
    return True


class ResumeCheckpointLoader:
    """Resume an interrupted training: load the newest training checkpoint of ``ckpt_dir`` when the engine starts.

    Training checkpoints are written by MONAI's ``CheckpointSaver(save_interval=..., file_prefix="checkpoint")``
    with the network, optimiser, scheduler and trainer state; the trainer's epoch and iteration are restored, so
    ``max_epochs`` counts from the start of the first run. Nothing happens when there is no checkpoint, or when the
    newest one already reached ``max_epochs`` (that run finished: training starts afresh).
    Loading goes through MONAI's ``CheckpointLoader`` (``torch.load(weights_only=True)``).

    Args:
        ckpt_dir: folder of the training checkpoints.
        load_dict: objects to restore, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer}``.
        enabled: set False to always start afresh.
        map_location: passed to ``torch.load``.
    """

    def __init__(
        self, ckpt_dir: str | Path, load_dict: Mapping[str, Any], enabled: bool = True, map_location: Any = "cpu"
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = dict(load_dict)
        self.enabled = enabled
        self.map_location = map_location
        self.loaded: Path | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("resume: no training checkpoint in %s, starting afresh.", self.ckpt_dir)
            return
        finished = _epoch_in_name(path)
        if finished >= engine.state.max_epochs:
            # a finished run is not resumed: the same command (e.g. MONAI Label's /train) trains anew
            logger.info("resume: %s ended the last run (epoch %d of %d), starting afresh.", path.name, finished,
                        engine.state.max_epochs)  # fmt: skip
            return
        logger.info("resume: loading %s", path)
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location).attach(engine)
        self.loaded = path


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
