"""Case locks: a case is held by the one run that loads, segments and writes it; a rerun skips finished cases."""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import ExitStack
from pathlib import Path

from ic_moe_monai.io import Case
from ic_moe_monai.io.atomic import NAME_MAX, exclusive_lock
from ic_moe_monai.segment.errors import OutputError, os_reason
from ic_moe_monai.segment.report import SKIPPED_BUSY, SKIPPED_EXISTS, CaseResult
from ic_moe_monai.segment.run_state import JobContext

logger = logging.getLogger(__package__)


CASE_LOCK = ".case~{}.lock"  # hidden, so discovery never takes it for an input


REPORT_LOCK = ".{}.lock"  # of the report's name: held by the run that writes it


class CaseLock:
    """The lock of one case in the output folder (:func:`~ic_moe_monai.io.writers.exclusive_lock`, removed when
    released), held by this run from before the case loads until its outputs are written or removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stack = ExitStack()

    def acquire(self) -> bool:
        """Whether the lock is now held (False: another run holds it)."""
        held = self._stack.enter_context(exclusive_lock(self.path, remove=True))
        if not held:
            self._stack.close()
        return held

    def release(self) -> None:
        """Let the lock go (again: nothing happens)."""
        self._stack.close()


def claim_case(job: JobContext, case: Case, result: CaseResult) -> CaseLock | None:
    """Lock ``case`` for this run; None, with the case's status set, when another run writes it or (without
    ``overwrite``) finished it meanwhile.

    Raises:
        OutputError: the lock file cannot be created.
    """
    lock = CaseLock(job.out_dir / _lock_name(case.name))
    try:
        held = lock.acquire()
    except OSError as err:
        raise OutputError(f"{case.path}: cannot lock the case in {job.out_dir} ({os_reason(err)})") from err
    if not held:
        result.status = SKIPPED_BUSY
        logger.info("%s: %s", case.name, SKIPPED_BUSY)
        return None
    if not job.overwrite and is_finished(result):  # another run wrote it since the outputs were first looked at
        lock.release()
        result.status = SKIPPED_EXISTS
        return None
    return lock


def _lock_name(case_name: str) -> str:
    name = CASE_LOCK.format(case_name)
    if len(os.fsencode(name)) > NAME_MAX:  # a case named after a very long file name
        name = CASE_LOCK.format(hashlib.sha1(os.fsencode(case_name)).hexdigest()[:16])
    return name


def is_finished(result: CaseResult) -> bool:
    return all(Path(p).is_file() for p in result.outputs.values())  # a folder in an output's place is no output
