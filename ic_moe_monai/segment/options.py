"""The job's options, checked before anything runs: each wrong value is one :class:`UsageError` naming it."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence

import torch

from ic_moe_monai.inference.predictor import BundleSegmenter
from ic_moe_monai.io.guards import MAX_BYTES_ENV, max_image_bytes

FORMATS = ("nifti", "dicom_seg")


class UsageError(ValueError):
    """A wrong option, or an output folder that cannot be used, found before any case is segmented (exit code 2)."""


# ---------------------------------------------------------------------------------------------------- options
def parse_formats(formats: str | Sequence[str]) -> list[str]:
    wanted = [f.lower() for f in parse_list("formats", formats)]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise UsageError(f"formats must be a comma-separated subset of {', '.join(FORMATS)}, got {formats!r}.")
    return list(dict.fromkeys(wanted))


def parse_parts(num_parts: object, part_id: object) -> tuple[int, int]:
    """``num_parts``/``part_id`` as given, else torchrun's ``WORLD_SIZE``/``RANK``, else one part."""
    if num_parts is None and part_id is None:
        num_parts = parse_integer("WORLD_SIZE (environment)", os.environ.get("WORLD_SIZE", 1), 1)
        part_id = parse_integer("RANK (environment)", os.environ.get("RANK", 0), 0)
    num_parts = 1 if num_parts is None else parse_integer("num_parts", num_parts, 1)
    part_id = 0 if part_id is None else parse_integer("part_id", part_id, 0)
    if part_id >= num_parts:
        raise UsageError(f"need 0 ≤ part_id < num_parts, got part_id {part_id} and num_parts {num_parts}.")
    return num_parts, part_id


def parse_integer(name: str, value: object, minimum: int) -> int:
    """``value`` as a whole number ≥ ``minimum`` (ints, and strings or floats holding one)."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value)
    ):
        number = int(value)
    if number is None or number < minimum:
        raise UsageError(f"{name} must be a whole number ≥ {minimum}, got {value!r}.")
    return number


def parse_fraction(name: str, value: object) -> float:
    """``value`` as a number in [0, 1]."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise UsageError(f"{name} must be a number from 0 to 1, got {value!r}.")
    return number


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def parse_flag(name: str, value: object) -> bool:
    """An on/off option: a bool (``--name`` / ``--noname``), 0 / 1, or true / false / yes / no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise UsageError(f"{name} is an on/off option (--{name} or --no{name}), got {value!r}.")


def parse_size_limit(max_image_size: object) -> int:
    """The image size limit in bytes (see :func:`~ic_moe_monai.io.guards.max_image_bytes`)."""
    try:
        return max_image_bytes(max_image_size)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        source = MAX_BYTES_ENV if max_image_size in (None, "") else "max_image_size"
        raise UsageError(f"{source}: {err}") from err


def resolve_device(device: object) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a bare N is ``cuda:N``), checked against this machine."""
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"(?:cuda:)?([0-9]+)|cuda", text)
    if match is None:
        raise UsageError(f"device {device} is not supported: use auto, cpu or cuda:N.")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device}: CUDA is not available on this machine.")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    return torch.device("cuda", index)


def reused_segmenter_device(
    segmenter: BundleSegmenter, configs: list[str], batch_size: int | None, device: object
) -> torch.device:
    """The device of a segmenter passed in place of a bundle folder, after checking nothing asks to rebuild it."""
    if configs or batch_size is not None:
        raise UsageError("config and batch_size cannot change a BundleSegmenter that is already built.")
    if str(device).strip().lower() != "auto" and resolve_device(device) != segmenter.device:
        raise UsageError(f"device {device!r}: the BundleSegmenter given runs on {segmenter.device}.")
    return segmenter.device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_list(name: str, value: object) -> list[str]:
    """A comma-separated string or a sequence of strings, as a list of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise UsageError(f"{name} must be a comma-separated list, got {value!r}.")
