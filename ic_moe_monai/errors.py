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

__all__ = ["ConfigError", "config_flag", "find_config_error", "one_line_errors"]


class ConfigError(ValueError):
    """A problem with the user's data, configs or checkpoints, in one line that names the file or setting and says
    what to do."""


_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0", "none", ""})


def config_flag(value: object, name: str = "value") -> bool:
    """An on/off setting as a bool, whichever way it came.

    ``python -m monai.bundle run ... --amp false`` hands the config the *string* ``"false"`` (fire keeps lowercase
    words as text), which Python would take as true. Bools, 0 / 1, None and the usual words (true/false, yes/no,
    on/off) are accepted, in any case.

    Raises:
        ConfigError: for anything else, naming the setting and the value.
    """
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor or numpy bool
        return bool(value.item())
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name} is an on/off setting (true or false), got {value!r}.")


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
