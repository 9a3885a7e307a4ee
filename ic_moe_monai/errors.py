"""Errors a user can fix, and how the bundle's commands show them: one line, not a traceback.

``python -m monai.bundle run ...`` lets every exception reach Python's default handler, which prints the whole chain
of MONAI's wrappers ("Failed to instantiate ..."). The bundle's configs call :func:`one_line_errors` first in their
``initialize`` list: from then on, an uncaught :class:`ConfigError` (anywhere in the chain) is printed as
``error: <message>`` and a Ctrl-C outside the training loop as ``interrupted.``; any other exception keeps its full
traceback, since it is a bug to report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType

__all__ = ["ConfigError", "find_config_error", "one_line_errors"]


class ConfigError(ValueError):
    """A problem with the user's data, configs or checkpoints, in one line that names the file or setting and says
    what to do."""


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The first :class:`ConfigError` in ``err``'s chain of causes and contexts, or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line_errors() -> bool:
    """Install the one-line handler as ``sys.excepthook`` (once; the previous hook handles everything else).

    Returns True, so that a config's ``initialize`` list can call it as an expression.
    """
    if not getattr(sys.excepthook, "_ic_moe_one_line", False):
        sys.excepthook = _make_hook(sys.excepthook)
    return True


def _make_hook(previous: Callable) -> Callable:
    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if isinstance(err, KeyboardInterrupt):
            print("interrupted.", file=sys.stderr)
            return
        found = find_config_error(err)
        if found is None:
            previous(kind, err, tb)
            return
        lines = [line.strip() for line in str(found).strip().splitlines() if line.strip()]
        print(f"error: {lines[0] if lines else type(found).__name__}", file=sys.stderr)

    hook._ic_moe_one_line = True  # type: ignore[attr-defined]
    return hook
