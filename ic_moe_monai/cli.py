"""Command line of the package: ``python -m ic_moe_monai segment INPUT OUTPUT [options]`` (``--help`` lists them).

Exit codes: 0 when every case succeeded, 1 when any case failed, an input was rejected or the report could not be
written, 2 for usage errors: a bad or unknown option, a missing input, a bundle that cannot be used (configs,
network, weights), an output folder that cannot be created or written, or outputs that would replace inputs. A
usage error is one line on stderr, ``error: ...``, and nothing is segmented.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Sequence

import fire

from ic_moe_monai.predictor import BundleError
from ic_moe_monai.segment import UsageError, segment

__all__ = ["main", "segment_command"]

# Errors that mean "the command cannot run as asked"; anything else is a bug and keeps its traceback.
USAGE_ERRORS = (UsageError, BundleError, FileNotFoundError, ValueError, TypeError)


@functools.wraps(segment)
def segment_command(*args, **kwargs) -> None:
    """The ``segment`` command: :func:`ic_moe_monai.segment.segment` with exit codes."""
    try:
        report = segment(*args, **kwargs)
    except USAGE_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; finished cases are kept, a rerun resumes.", file=sys.stderr)
        sys.exit(130)
    sys.exit(report.exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_options(argv)
    if unknown:
        # fire would run the command with the options it knows and only then complain about the rest
        print(f"error: unknown option {unknown} (python -m ic_moe_monai segment --help lists them).", file=sys.stderr)
        sys.exit(2)
    fire.Fire({"segment": segment_command}, command=argv)


def _unknown_options(argv: list[str]) -> str | None:
    """The first option of the ``segment`` command that is none of its parameters (``--name``, ``--noname`` for
    flags, ``-n`` where one parameter starts with n, as fire reads them)."""
    if not argv or argv[0] != "segment":
        return None
    names = set(inspect.signature(segment).parameters)
    for arg in argv[1:]:
        if arg == "--":  # fire's own flags follow
            break
        if not arg.startswith("-") or re.fullmatch(r"-[0-9.]+", arg):  # values, negative numbers included
            continue
        name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        short = len(name) == 1 and sum(n.startswith(name) for n in names) == 1
        if name not in {*names, "h", "help"} and not short and not (name.startswith("no") and name[2:] in names):
            return arg.split("=", 1)[0]
    return None


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if isinstance(err, (UsageError, BundleError)) or text.startswith(("input ", "output ", "bundle ", "config ")):
        return text
    if isinstance(err, OSError) and err.filename is not None:  # e.g. "[Errno 2] No such file ...: 'x'"
        return f"{err.filename}: {err.strerror or text}"
    return text
