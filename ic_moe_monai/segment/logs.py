"""Reader libraries' log lines (nibabel, highdicom) collected per case as notes of the report, not on the console."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__package__)


class ReaderNotes(logging.Handler):
    """What readers log while a case loads (nibabel's header fix-ups and complaints, which name no file), kept as
    notes on that case instead of bare lines on the console. Errors are left out: they come back as the load's
    exception, which names the file."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def collecting(self, case_name: str, notes: list[str]) -> Iterator[None]:
        """Collect this thread's reader messages into ``notes`` for the block."""
        self._local.target = (case_name, notes)
        try:
            yield
        finally:
            self._local.target = None

    def emit(self, record: logging.LogRecord) -> None:
        target = getattr(self._local, "target", None)
        if target is None or record.levelno >= logging.ERROR:
            return
        name, notes = target
        note = f"while reading: {record.getMessage()}"
        if note not in notes:
            notes.append(note)
            logger.info("%s: %s", name, note)


@contextmanager
def library_logs() -> Iterator[ReaderNotes]:
    """For the run: nibabel's messages go to the case they concern, highdicom's INFO lines (every module it copies)
    are left out; both loggers are restored afterwards."""
    from nibabel import imageglobals  # its logger gets a console handler at import: import it before the swap

    notes = ReaderNotes()
    nibabel_log, highdicom_log = imageglobals.logger, logging.getLogger("highdicom")
    saved = (nibabel_log.handlers[:], nibabel_log.propagate, highdicom_log.level)
    nibabel_log.handlers, nibabel_log.propagate = [notes], False
    highdicom_log.setLevel(logging.WARNING)
    try:
        yield notes
    finally:
        nibabel_log.handlers, nibabel_log.propagate = saved[0], saved[1]
        highdicom_log.setLevel(saved[2])
