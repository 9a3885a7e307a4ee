"""New output folders of ``init_bundle`` and ``export_bundle``: checked before anything is done, written whole or
not at all.

:func:`check_new_folder` refuses a folder that exists with something in it, a file, a symbolic link, and a folder
that is, or lies inside, a folder the command must not write into (its input, the shipped bundle).
:func:`staged_folder` gives a hidden sibling folder to write into; it becomes the output folder by one rename when
everything is written, and is removed after a failure, so that no half-made folder is ever left behind.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ic_moe_monai.errors import ConfigError

__all__ = ["check_new_folder", "staged_folder"]


def check_new_folder(out: Path, what: str, protected: Mapping[str, Path]) -> None:
    """Refuse ``out`` as the new ``what`` (e.g. "the bundle") unless it is new or an empty folder, and outside every
    ``protected`` folder (``{description: folder}``).

    Raises:
        ConfigError: one line naming ``out`` and the problem.
    """
    if out.is_symlink():
        raise ConfigError(f"{out} is a symbolic link: give a new folder for {what}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: give a new folder for {what}.")
    target = out.resolve()
    for description, folder in protected.items():
        folder = folder.resolve()
        if target == folder or folder in target.parents:
            place = "is" if target == folder else "is inside"
            raise ConfigError(f"{out} {place} {description} {folder}: give a folder outside it for {what}.")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is a file, not a folder.")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write into; renamed to ``out`` when the block ends without an error,
    removed when it raises.

    Raises:
        ConfigError: the folder cannot be created, written or renamed (naming ``out`` and the reason).
    """
    stage = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        yield stage
        stage.rename(out)  # replaces an empty folder
    except OSError as err:
        raise ConfigError(f"{out}: cannot be written ({err.strerror or err}).") from err
    finally:
        if stage.is_dir():
            shutil.rmtree(stage, ignore_errors=True)
