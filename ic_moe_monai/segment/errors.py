"""A case's failure as one line naming the file and the problem."""

from __future__ import annotations

import re

from ic_moe_monai.io import Case
from ic_moe_monai.io.guards import ImageError


class OutputError(RuntimeError):
    """An output of a case that cannot be written; the message names the case's input and the reason."""


def case_error(case: Case, err: BaseException) -> str:
    """One line naming the case's file and the problem.

    MONAI wraps a transform's error in ``RuntimeError("applying transform <object at 0x…>")``: the transform's
    class and the original error are shown instead.
    """
    step = ""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        match = re.search(r"\.(\w+) object at 0x", str(err))
        step = step or (match.group(1) if match else "")
        err = err.__cause__
    where, message = str(case.path), first_line(err)
    if not isinstance(err, (ImageError, OutputError)) and where not in message:  # not one of our own messages
        message = f"{type(err).__name__}: {message}"
    if step:
        message = f"preprocessing ({step}) failed: {message}"
    return message if where in message else f"{where}: {message}"


def os_reason(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) and err.strerror else None) or one_line(err)


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__
