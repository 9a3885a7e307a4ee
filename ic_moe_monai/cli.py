"""Command line of the package (``python -m ic_moe_monai COMMAND --help`` lists each command's options):

- ``segment INPUT OUTPUT [options]``: segment folders of studies with a bundle;
- ``init_bundle DATASET_DIR OUT_BUNDLE [--profile lite] [--from BUNDLE|none] [--label_names ...] [--modality ...]
  [--ct_window ...]``: a bundle of its own for a dataset (:mod:`ic_moe_monai.bundles.initialize`);
- ``export_bundle BUNDLE OUT [--metrics FILE] [--weights_url URL]``: a copy that runs with MONAI only
  (:mod:`ic_moe_monai.bundles.export`).

Exit codes of ``segment``: 0 when every case succeeded, 1 when any case failed, an input was rejected or the report
could not be written, 2 for usage errors: a bad or unknown option, a missing input, a bundle that cannot be used
(configs, network, weights), an output folder that cannot be created or written, or outputs that would replace
inputs. ``init_bundle`` and ``export_bundle``: 0 when done, 2 for usage errors. A usage error is one line on stderr,
``error: ...``, and nothing is written.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Sequence

import fire

from ic_moe_monai.bundles.export import export_bundle
from ic_moe_monai.bundles.initialize import init_bundle
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.inference.predictor import BundleError
from ic_moe_monai.segment import UsageError, segment

__all__ = ["export_bundle_command", "init_bundle_command", "main", "segment_command"]

# Errors that mean "the command cannot run as asked"; anything else is a bug and keeps its traceback.
USAGE_ERRORS = (UsageError, BundleError, ConfigError, FileNotFoundError, ValueError, TypeError)
# Options spelled differently on the command line: ``from`` is a Python keyword.
ALIASES = {"--from": "--from_bundle"}


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


@functools.wraps(init_bundle)
def init_bundle_command(*args, **kwargs) -> None:
    """The ``init_bundle`` command: :func:`ic_moe_monai.bundles.initialize.init_bundle`, then the commands to run
    next."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = init_bundle(*args, **kwargs)
    except USAGE_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(result.lines()))
    bundle, data = result.bundle, (args[0] if args else kwargs.get("dataset_dir"))
    print(f"next: python -m monai.bundle run training --config_file {bundle}/configs/train.json --bundle_root {bundle} "
          f"--dataset_dir {data}")  # fmt: skip


@functools.wraps(export_bundle)
def export_bundle_command(*args, **kwargs) -> None:
    """The ``export_bundle`` command: :func:`ic_moe_monai.bundles.export.export_bundle`."""
    try:
        out = export_bundle(*args, **kwargs)
    except USAGE_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}: run its commands from that folder (python -m monai.bundle run inference "
          "--config_file configs/inference.json --bundle_root . --dataset_dir IMAGES --output_dir OUT).")  # fmt: skip


COMMANDS = {"segment": (segment_command, segment), "init_bundle": (init_bundle_command, init_bundle),
            "export_bundle": (export_bundle_command, export_bundle)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    argv = [_aliased(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    unknown = _unknown_options(argv)
    if unknown:
        # fire would run the command with the options it knows and only then complain about the rest
        print(f"error: unknown option {unknown} (python -m ic_moe_monai {argv[0]} --help lists them).", file=sys.stderr)
        sys.exit(2)
    fire.Fire({name: command for name, (command, _) in COMMANDS.items()}, command=argv)


def _aliased(arg: str) -> str:
    """``--from X`` / ``--from=X`` → ``--from_bundle``; everything else as it is."""
    name, sep, value = arg.partition("=")
    return ALIASES.get(name, name) + sep + value


def _unknown_options(argv: list[str]) -> str | None:
    """The first option of a command that is none of its parameters (``--name``, ``--noname`` for flags, ``-n``
    where one parameter starts with n, as fire reads them)."""
    if not argv or argv[0] not in COMMANDS:
        return None
    names = set(inspect.signature(COMMANDS[argv[0]][1]).parameters)
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
