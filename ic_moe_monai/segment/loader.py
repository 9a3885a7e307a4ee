"""The background loader: the next cases are read (and checked) in a thread while the current one is segmented."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from monai.data import MetaTensor

from ic_moe_monai.inference.predictor import load_case
from ic_moe_monai.io import Case
from ic_moe_monai.segment.locks import CaseLock, claim_case
from ic_moe_monai.segment.report import CaseResult
from ic_moe_monai.segment.run_state import JobContext

try:  # progress bars are a convenience: without tqdm the run is the same, silent
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements.txt
    tqdm = None


class _NoBar:
    """What the loop asks of a tqdm bar, doing nothing (``quiet``, or tqdm not installed)."""

    total = None
    n = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def progress_bar(quiet: bool, **kwargs: Any) -> Any:
    return tqdm(**kwargs) if tqdm is not None and not quiet else _NoBar()


Loaded = tuple[MetaTensor, dict[str, Any], float]


class CaseLoader:
    """Futures of ``(image, preprocessed data, seconds)`` for the cases in order (None for a case this run does not
    write), ``ahead`` of them in flight. Each case is claimed (locked) in the consuming thread just before its load
    is submitted; the locks still held at the end are released."""

    def __init__(self, job: JobContext, todo: list[tuple[Case, CaseResult]], ahead: int) -> None:
        self.job, self.todo, self.ahead = job, todo, ahead
        self.pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="load") if ahead else None
        self.locks: dict[int, CaseLock] = {}

    def lock_of(self, result: CaseResult) -> CaseLock | None:
        """The lock this run holds on the case of ``result``, if any."""
        return self.locks.get(id(result))

    def _load(self, case: Case, result: CaseResult) -> Loaded:
        start = time.monotonic()
        with self.job.reader_notes.collecting(case.name, result.notes):
            image = load_case(case, self.job.max_bytes)
            data = self.job.segmenter.preprocess(image)
        return image, data, round(time.monotonic() - start, 3)

    def _submit(self, case: Case, result: CaseResult) -> Future:
        future: Future = Future()
        try:
            lock = claim_case(self.job, case, result)
        except Exception as err:  # handed to the consumer through the future, as a load error is
            future.set_exception(err)
            return future
        if lock is None:
            future.set_result(None)
            return future
        self.locks[id(result)] = lock
        if self.pool is not None:
            return self.pool.submit(self._load, case, result)
        try:
            future.set_result(self._load(case, result))
        except Exception as err:  # handed to the consumer through the future, as a pool would
            future.set_exception(err)
        return future

    def futures(self) -> Iterator[Future]:
        """One future per case, in order; the current case and up to ``ahead`` after it are in flight."""
        pending = iter(self.todo)
        queue: deque[Future] = deque()
        for _ in self.todo:
            while len(queue) <= self.ahead and (item := next(pending, None)) is not None:
                queue.append(self._submit(*item))
            yield queue.popleft()

    def __enter__(self) -> CaseLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for lock in self.locks.values():  # cases left unwritten by an error or an interruption
                lock.release()
