"""Resumable training: checkpoints written after every epoch and on Ctrl-C, the newest few kept, the newest one
loaded when the same command runs again, with the best validation metric so far.

- :class:`TrainingCheckpoints`: the training's checkpoint folder. After each epoch it writes
  ``checkpoint_epoch=N.pt`` (network with its :func:`~ic_moe_monai.networks.checkpoints.checkpoint_info`, optimiser,
  schedule, trainer state, best metric, training time) and deletes all but the ``keep`` newest; on Ctrl-C it finishes
  the current step, writes ``checkpoint_interrupted.pt`` and stops with one line; when training starts it loads the
  newest checkpoint, unless that run had finished (``max_epochs`` or the time limit reached): then the same command
  trains anew, as MONAI Label's ``/train`` expects.
- :class:`BestMetric`: the best validation metric (value and epoch) of the evaluator and of MONAI's key-metric
  ``CheckpointSaver`` as a state dict, so that a resumed run replaces ``model.pt`` only with something better.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ic_moe_monai.errors import config_flag
from ic_moe_monai.networks.checkpoints import check_checkpoint

__all__ = ["INTERRUPTED_NAME", "BestMetric", "TrainingCheckpoints", "checkpoint_files", "latest_checkpoint"]

logger = logging.getLogger(__name__)

EPOCH_PATTERN = "checkpoint_epoch=*.pt"
INTERRUPTED_NAME = "checkpoint_interrupted.pt"
INTERRUPTED_EXIT_CODE = 130  # as a shell reports a process stopped by SIGINT


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The training checkpoints of a folder (``checkpoint_epoch=N.pt`` and ``checkpoint_interrupted.pt``), newest
    first (by modification time, then by the epoch in the name)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    files = [*folder.glob(EPOCH_PATTERN), *([folder / INTERRUPTED_NAME] if (folder / INTERRUPTED_NAME).is_file()
                                            else [])]  # fmt: skip
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, _epoch_in_name(p)), reverse=True)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The most recently written training checkpoint of ``ckpt_dir``, or None."""
    files = checkpoint_files(ckpt_dir)
    return files[0] if files else None


def _epoch_in_name(path: Path) -> int:
    """The epoch in a checkpoint's name (``checkpoint_epoch=N.pt``), or -1."""
    digits = "".join(ch if ch.isdigit() else " " for ch in path.stem).split()
    return int(digits[-1]) if digits else -1


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BestMetric:
    """The best validation metric so far as a state dict, for the training checkpoints.

    Saves the evaluator's ``best_metric`` and ``best_metric_epoch``; restores them into the evaluator and, as its
    tracking list, into MONAI's key-metric ``CheckpointSaver`` (which writes ``model.pt`` only for a better score),
    so that a resumed run does not replace the best model with a worse one.

    Args:
        evaluator: the validation evaluator (MONAI's ``SupervisedEvaluator``).
        saver: the key-metric ``CheckpointSaver`` of the evaluator, or None.
        filename: the file the saver writes (its ``key_metric_filename``).
    """

    def __init__(self, evaluator: Engine, saver: Any = None, filename: str = "model.pt") -> None:
        self.evaluator, self.saver, self.filename = evaluator, saver, filename

    @property
    def value(self) -> float | None:
        best = float(getattr(self.evaluator.state, "best_metric", -1))
        return None if best == -1 else best

    @property
    def epoch(self) -> int | None:
        epoch = int(getattr(self.evaluator.state, "best_metric_epoch", -1))
        return None if epoch == -1 else epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": float(self.evaluator.state.best_metric),
                "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best, epoch = float(state["best_metric"]), int(state["best_metric_epoch"])
        self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = best, epoch
        tracking = getattr(self.saver, "_key_metric_checkpoint", None)  # MONAI keeps ignite's Checkpoint there
        if tracking is not None and epoch != -1:
            # the saver's list of (score, file): with it, only a better score replaces the file. Its key is
            # ignite's own ("saved", "_saved", depending on the version), so take the saver's state and fill it in
            state = {key: [(best, self.filename)] for key in tracking.state_dict()}
            self.saver.load_state_dict(state)


class TrainingCheckpoints:
    """The resumable state of a training in ``ckpt_dir`` (see the module docstring).

    Attach it after every other handler of the trainer (the configs do, in ``initialize``): the epoch's checkpoint is
    then written after its validation and the time-limit check. Under ``torch.distributed`` every rank resumes, rank 0
    writes, and Ctrl-C is left to the launcher.

    Args:
        ckpt_dir: the folder.
        save_dict: what a checkpoint holds, ``{name: object with state_dict() / load_state_dict()}``; the ``model``
            entry's ``info`` (a :class:`~ic_moe_monai.networks.checkpoints.StampedWeights`) refuses to resume a
            checkpoint trained for other classes or preprocessing. The ``clock`` entry, if any (a
            :class:`~ic_moe_monai.training.handlers.TrainingClock`), tells whether the time limit ended the run.
        keep: epoch checkpoints kept (the newest, by modification time; older runs' included).
        resume: load the newest checkpoint when training starts.
        map_location: for ``torch.load``.
        handle_interrupt: stop cleanly on the first Ctrl-C (main thread of a single process only).
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        save_dict: Mapping[str, Any],
        keep: int = 2,
        resume: bool = True,
        map_location: Any = "cpu",
        handle_interrupt: bool = True,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = dict(save_dict)
        self.keep = max(1, int(keep))
        self.resume = config_flag(resume, "resume")  # "--resume false" arrives as a string
        self.map_location = map_location
        self.handle_interrupt = handle_interrupt
        self.loaded: Path | None = None
        self.interrupted = False
        self._pending: dict[str, Any] | None = None
        self._requested = False
        self._previous_handler: Any = None

    # ------------------------------------------------------------------------------------------------ attach
    def attach(self, engine: Engine) -> None:
        if self.resume:
            self._read_resume(engine)
            engine.add_event_handler(Events.STARTED, self._load_pending)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.handle_interrupt:
            engine.add_event_handler(Events.STARTED, self._install_interrupt)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_stop)
            for event in (Events.COMPLETED, Events.TERMINATE, Events.EXCEPTION_RAISED):
                engine.add_event_handler(event, self._restore_interrupt)

    # ------------------------------------------------------------------------------------------------ resume
    def _read_resume(self, engine: Engine) -> None:
        """Read the newest checkpoint now, so that a checkpoint of another task is refused before anything runs;
        it is loaded when the engine starts."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("resume: no training checkpoint in %s, starting afresh.", self.ckpt_dir)
            return
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        finished = self._finished(checkpoint, engine)
        if finished:  # the same command (e.g. MONAI Label's /train) trains anew
            logger.info("resume: %s ended the last run (%s), starting afresh.", path.name, finished)
            return
        info = getattr(self.save_dict.get("model"), "info", None)
        if "model" in checkpoint:
            check_checkpoint(checkpoint["model"], info, path)
        self._pending, self.loaded = checkpoint, path
        logger.info("resume: loading %s", path)

    @staticmethod
    def _finished(checkpoint: Mapping[str, Any], engine: Engine) -> str | None:
        trainer = checkpoint.get("trainer") or {}
        length, iteration = trainer.get("epoch_length"), trainer.get("iteration")
        done = trainer.get("epoch", iteration // length if iteration is not None and length else 0)
        if engine.state.max_epochs is not None and done >= engine.state.max_epochs:
            return f"epoch {done} of {engine.state.max_epochs}"
        if (checkpoint.get("clock") or {}).get("time_limit_reached"):
            return f"the time limit, after epoch {done}"
        return None

    def _load_pending(self, engine: Engine) -> None:
        if self._pending is None:
            return
        checkpoint, self._pending = self._pending, None
        present = {k: v for k, v in self.save_dict.items() if k in checkpoint}
        missing = sorted(set(self.save_dict) - set(present))
        if missing:
            logger.info("resume: %s has no %s; those start afresh.", self.loaded.name, ", ".join(missing))
        prior_max_epochs = engine.state.max_epochs  # this command's max_epochs, not the checkpoint's
        Checkpoint.load_objects(to_load=present, checkpoint=checkpoint)
        engine.state.max_epochs = prior_max_epochs
        logger.info("resume: continuing after epoch %d, iteration %d.", engine.state.epoch, engine.state.iteration)

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, path: Path) -> Path:
        """Write a checkpoint of ``save_dict`` to ``path`` (under a temporary name, renamed when complete)."""
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _epoch_completed(self, engine: Engine) -> None:
        if _is_rank0():
            self.save(self.ckpt_dir / f"checkpoint_epoch={engine.state.epoch}.pt")
            self._prune()
        if self._requested:  # Ctrl-C during the epoch's last step or its validation: this epoch is saved
            self._stop(engine, self.ckpt_dir / f"checkpoint_epoch={engine.state.epoch}.pt")

    def _prune(self) -> None:
        """Keep the ``keep`` newest epoch checkpoints; an interrupted one is superseded by any newer epoch's."""
        files = checkpoint_files(self.ckpt_dir)
        epochs = [p for p in files if p.name != INTERRUPTED_NAME]
        stale = epochs[self.keep :]
        interrupted = self.ckpt_dir / INTERRUPTED_NAME
        if interrupted in files and files[0] != interrupted:
            stale.append(interrupted)
        for path in stale:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ Ctrl-C
    def _install_interrupt(self, engine: Engine) -> None:
        if threading.current_thread() is not threading.main_thread() or _distributed():
            return
        self._requested = False
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_interrupt(self, engine: Engine, *args: Any) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:  # a second Ctrl-C: stop at once
            print("interrupted again: stopping now; the last epoch's checkpoint is kept.", file=sys.stderr)
            os._exit(INTERRUPTED_EXIT_CODE)
        self._requested = True

    def _maybe_stop(self, engine: Engine) -> None:
        if self._requested:
            path = self.save(self.ckpt_dir / INTERRUPTED_NAME)
            self._stop(engine, path)

    def _stop(self, engine: Engine, path: Path) -> None:
        self.interrupted, self._requested = True, False
        best = next((v for v in self.save_dict.values() if isinstance(v, BestMetric)), None)
        so_far = ""
        if best is not None and best.value is not None:
            so_far = f"; best validation metric so far {best.value:.4f} (epoch {best.epoch})"
        logger.warning("interrupted at epoch %d, iteration %d: checkpoint %s saved; run the same command to resume%s.",
                       engine.state.epoch, engine.state.iteration, path, so_far)  # fmt: skip
        engine.terminate(skip_completed=True)

    def exit_if_interrupted(self) -> None:
        """After the run: leave with exit code 130 when Ctrl-C stopped it (so that a chain of commands stops too)."""
        if self.interrupted:
            raise SystemExit(INTERRUPTED_EXIT_CODE)
