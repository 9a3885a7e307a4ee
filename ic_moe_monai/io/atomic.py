"""Files written whole or not at all, and the locks that keep two runs apart.

:func:`atomic_output` writes under a hidden temporary name carrying the run's id (host, process id, random token)
and renames when complete; :func:`remove_partial_outputs` removes only the leftovers of runs that are gone;
:func:`exclusive_lock` is a lock file held by one process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "NAME_MAX",
    "PARTIAL_MARK",
    "atomic_output",
    "exclusive_lock",
    "partial_name",
    "remove_partial_outputs",
    "run_id",
]


PARTIAL_MARK = ".partial"


NAME_MAX = 255  # bytes in a file name on common file systems


_RUN: dict[str, str] = {}


_PARTIAL = re.compile(re.escape(PARTIAL_MARK) + r"~(?P<host>[^~/]+)~(?P<pid>[0-9]+)~(?P<token>[0-9a-f]+)")


def run_id() -> str:
    """This process's id in temporary names: ``host~pid~token`` (the token tells apart reused process ids)."""
    pid = str(os.getpid())
    if _RUN.get("pid") != pid:  # a forked child is another run
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
        _RUN.update(pid=pid, id=f"{host}~{pid}~{secrets.token_hex(4)}")
    return _RUN["id"]


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds, delete it otherwise.

    The temporary name starts with a dot, carries this run's id (:func:`run_id`) and keeps the final suffix
    (writers pick their format from it): ``.<name>.partial~<host>~<pid>~<token><suffixes>``.
    """
    path = Path(path)
    tmp = path.with_name(partial_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_name(name: str) -> str:
    """The temporary name of ``name`` for this run: ``.<name>.partial~<run id><suffixes>``.

    A name that would be too long for a file system (255 bytes) is shortened to a digest of ``name``, so a long
    input file name does not make its outputs unwritable.
    """
    full = f".{name}{PARTIAL_MARK}~{run_id()}{''.join(Path(name).suffixes)}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return f".{digest}{PARTIAL_MARK}~{run_id()}{''.join(Path(name).suffixes[-2:])}"


def remove_partial_outputs(folder: str | Path) -> list[Path]:
    """Delete the temporary files that runs which are gone left in ``folder``; return them.

    A leftover is removed when its run ran on this host and its process no longer exists, or when it has no run id
    (older versions). Files of live runs, and of runs on other hosts (a shared folder), are kept.
    """
    stale = []
    for p in Path(folder).glob(f".*{PARTIAL_MARK}*"):
        if not p.is_file():
            continue
        owner = _PARTIAL.search(p.name)
        if owner is None or (owner["host"] == run_id().split("~")[0] and not _process_alive(int(owner["pid"]))):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


@contextmanager
def exclusive_lock(path: str | Path, remove: bool = False) -> Iterator[bool]:
    """Try to hold an advisory lock on ``path`` (created if needed) for the block; yield whether it is held.

    The lock ends with the block or with the process (the OS drops it), so a killed run never leaves a stale lock
    (only, with ``remove``, the file, which the next holder removes). With ``remove`` the file is deleted at the end
    of the block while the lock is still held; every holder checks, once it holds the lock, that the file it locked
    is still the one at ``path`` (and else opens it again), so removing lock files never lets two processes hold the
    same lock. Where the OS has no ``fcntl`` (Windows) or the file system has no locks, the lock is always granted.

    Raises:
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path = Path(path)
    handle = _locked_handle(path, fcntl)
    if handle is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            if remove:  # still held: a process that opened this file before the unlink finds it gone and retries
                path.unlink(missing_ok=True)
        finally:
            handle.close()  # closing the file drops the lock


def _locked_handle(path: Path, fcntl: Any) -> Any | None:
    """An open file on ``path`` holding its exclusive lock, or None when another process holds it."""
    for _ in range(16):  # another holder may remove the file between our open and our lock: open it again
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            return _NoLock()  # no locks on this file system (e.g. ENOLCK): granted, as without fcntl
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
    return None


class _NoLock:
    """Stands for a held lock where the file system cannot lock."""

    def close(self) -> None:
        pass
