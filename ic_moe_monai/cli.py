"""Command line of the package: ``python -m ic_moe_monai segment INPUT OUTPUT [options]`` (``--help`` lists them).

Exit codes: 0 when every case succeeded, 1 when any case failed or an input was rejected, 2 for usage errors.
"""

from __future__ import annotations

import functools
import sys

import fire

from ic_moe_monai.segment import segment

__all__ = ["main", "segment_command"]


@functools.wraps(segment)
def segment_command(*args, **kwargs) -> None:
    """The ``segment`` command: :func:`ic_moe_monai.segment.segment` with exit codes."""
    try:
        report = segment(*args, **kwargs)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(report.exit_code)


def main() -> None:
    fire.Fire({"segment": segment_command})
