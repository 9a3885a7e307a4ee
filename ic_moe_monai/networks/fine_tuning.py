"""Fine-tuning from one label set to another: load every tensor of a checkpoint that fits, by class name.

- :func:`read_state_dict`: a weights file read safely (``torch.load(weights_only=True)``), one line naming the file
  when it is not a file of tensors.
- :func:`load_pretrained_weights`: every tensor whose shape fits is loaded; the class-specific parts (mask tokens,
  hypernetworks, expert class heads, prototypes, the IoU head's output) are copied only for the classes both label
  sets share by name (background always) and re-initialised for the others.
- :class:`FineTuneReport`: what was loaded and what starts afresh.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks.checkpoints import (
    _unwrap,
    class_count_from_shapes,
    describe_info,
    describe_preprocessing,
    info_mismatch,
    read_info,
)

__all__ = ["FineTuneReport", "load_pretrained_weights", "read_state_dict"]

logger = logging.getLogger(__name__)

# IC-MoE tensors whose first dimension is the class (K + 1 rows), and modules that exist once per class.
_CLASS_ROWS = (
    re.compile(r"mask_decoder\.mask_tokens\.weight"),
    re.compile(r"moe_layers\.\d+\.experts\.\d+\.(classifier\.(weight|bias)|prototypes)"),
)
_CLASS_MODULE = re.compile(r"mask_decoder\.output_hypernetworks_mlps\.(?P<cls>\d+)\.(?P<rest>.+)")
_IOU_HEAD = re.compile(r"mask_decoder\.iou_prediction_head\.layers\.(?P<layer>\d+)\.(weight|bias)")


@dataclass
class FineTuneReport:
    """What :func:`load_pretrained_weights` loaded and what starts afresh.

    Attributes:
        source: the checkpoint.
        source_info: what it was trained for (None for a plain state dict).
        loaded: tensors loaded whole.
        reinitialised: tensors left as the network was built (shape or class set differs), with the reason.
        class_sources: target class → the checkpoint's class its class-specific parts were copied from.
        new_classes: target classes whose class-specific parts start afresh.
        notes: anything else worth knowing (another preprocessing, unused tensors of the checkpoint).
    """

    source: str
    source_info: dict[str, Any] | None
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)
    class_sources: dict[int, int] = field(default_factory=dict)
    new_classes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self, label_names: Mapping[int, str] | None = None) -> list[str]:
        """The report for the log, a few lines."""
        total = len(self.loaded) + len(self.reinitialised)
        groups = Counter(k.split(".")[0] for k in self.loaded)
        what = "" if self.source_info is None else f" (trained for {describe_info(self.source_info)})"
        lines = [f"fine-tuning from {self.source}{what}:",
                 f"  loaded {len(self.loaded)} of {total} tensors: "
                 + ", ".join(f"{name} {n}" for name, n in sorted(groups.items()))]  # fmt: skip
        names = label_names or {}
        if self.class_sources:
            kept = ", ".join(f"{names.get(c, c)}" for c in sorted(self.class_sources))
            lines.append(f"  class-specific parts copied for: {kept}")
        if self.new_classes:
            fresh = ", ".join(f"{names.get(c, c)}" for c in self.new_classes)
            lines.append(f"  class-specific parts re-initialised for: {fresh} (mask tokens, hypernetworks, expert "
                         "class heads, prototypes, IoU head rows)")  # fmt: skip
        others = {k: r for k, r in self.reinitialised.items() if r != "class-specific"}
        if others:
            shown = ", ".join(sorted(others)[:4]) + (", …" if len(others) > 4 else "")
            lines.append(f"  re-initialised (shape differs or missing in the checkpoint): {len(others)}: {shown}")
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def read_state_dict(path: str | Path, mmap: bool = False) -> Mapping[str, torch.Tensor]:
    """The state dict of tensors in a weights file (a training checkpoint's ``"model"`` entry), read with
    ``torch.load(weights_only=True)``: a file that holds code is refused, not run.

    Args:
        path: the file.
        mmap: map the tensors rather than read them (for a check of a big file); files of PyTorch's old format are
            then read whole.

    Raises:
        ConfigError: one line naming the file: it cannot be loaded that way (corrupt, truncated, not PyTorch's, or
            holding code), or holds something else than a state dict of tensors.
    """
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file about to be refused
            warnings.simplefilter("ignore")
            state = _load_weights_only(path, mmap)
    except Exception as err:
        raise ConfigError(f"{path}: not a weights file that torch.load(weights_only=True) reads: corrupt, truncated "
                          f"or holding code ({type(err).__name__}).") from err  # fmt: skip
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors (it holds a {type(state).__name__}).")
    return state


def _load_weights_only(path: str | Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # PyTorch's old format cannot be mapped


def load_pretrained_weights(
    network: torch.nn.Module,
    path: str | Path | None,
    info: Mapping[str, Any] | None = None,
    report_path: str | Path | None = None,
) -> FineTuneReport | bool:
    """Start a training from other weights (fine-tuning), e.g. another bundle's ``models/model.pt``.

    Accepts a plain state dict or a training checkpoint with a ``"model"`` entry, from a network wrapped in
    DistributedDataParallel or not. Every tensor of ``network`` whose name and shape the checkpoint has is loaded.
    The class-specific parts of an IC-MoE network are copied class by class: a class of ``info`` takes the
    checkpoint's class of the same name (background: value 0), and classes the checkpoint does not have keep the
    network's fresh initialisation (for the SAM profiles: SAM's own mask tokens). A checkpoint without label names
    is taken to have the config's classes when its class count is the config's. A resumed training checkpoint
    (:class:`~ic_moe_monai.training.resume.TrainingCheckpoints`) is loaded later, when the engine starts, so an
    interrupted fine-tuning continues from its own last epoch.

    Args:
        network: the network to initialise.
        path: the checkpoint; empty: nothing to load.
        info: :func:`checkpoint_info` of the training config (its label names map the classes).
        report_path: where to write the full report as JSON (optional).

    Returns:
        False when ``path`` is empty, else the report (also logged).

    Raises:
        ConfigError: the file is not a weights file of tensors that loads safely (:func:`read_state_dict`).
        ValueError: none of its tensors fits the network.
    """
    if not path:
        return False
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file.")
    state = read_state_dict(path)
    source_info = read_info(state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = _unwrap(network)
    own = target.state_dict()
    report = FineTuneReport(source=str(path), source_info=source_info)
    class_map = _class_map(source_info, info, class_count_from_shapes(state), class_count_from_shapes(own), report)
    merged = OrderedDict()
    for key, value in own.items():
        merged[key] = _merged_tensor(key, value, state, class_map, own, report)
    if not report.loaded:
        raise ValueError(f"pretrained weights {path} do not fit the network: none of its tensors has a name and shape "
                         f"of the network's (e.g. {next(iter(own), '?')}).")  # fmt: skip
    unused = [k for k in state if k not in own and not _CLASS_MODULE.fullmatch(k)]
    if unused:
        report.notes.append(f"{len(unused)} tensor(s) of the checkpoint are not in the network, e.g. {unused[0]}")
    if source_info is not None and info is not None and "preprocessing" in info_mismatch(source_info, info):
        report.notes.append(f"the checkpoint was trained with {describe_preprocessing(source_info)}; this training "
                            f"uses {describe_preprocessing(info)}")  # fmt: skip
    target.load_state_dict(merged)
    names = {int(k): v for k, v in (info or {}).get("label_names", {}).items()}
    for line in report.lines(names):
        logger.info(line)
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _class_map(
    source_info: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
    source_count: int | None,
    target_count: int | None,
    report: FineTuneReport,
) -> dict[int, int]:
    """Target class → the checkpoint's class whose class-specific parts it takes (by name; background by value)."""
    if target_count is None:  # not an IC-MoE network: its class parts are whatever does not fit by shape
        return {}
    if source_info is not None and info is not None:
        by_name = {str(n).strip().lower(): int(v) for v, n in source_info["label_names"].items()}
        mapping = {0: 0}
        for value, name in info["label_names"].items():
            source = by_name.get(str(name).strip().lower())
            if int(value) != 0 and source not in (None, 0):
                mapping[int(value)] = source
    elif source_count == target_count:
        mapping = {c: c for c in range(target_count + 1)}
        if source_info is None:
            report.notes.append("the checkpoint names no labels: its classes are taken as the config's, in order")
    else:
        mapping = {0: 0}
    report.class_sources = {c: s for c, s in mapping.items() if source_count is None or s <= source_count}
    report.new_classes = [c for c in range(target_count + 1) if c not in report.class_sources]
    return report.class_sources


def _merged_tensor(
    key: str,
    value: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    class_map: Mapping[int, int],
    own: Mapping[str, torch.Tensor],
    report: FineTuneReport,
) -> torch.Tensor:
    """The tensor ``key`` of the fine-tuned network: the checkpoint's, the network's own, or a mix of class rows."""
    module = _CLASS_MODULE.fullmatch(key)
    if module is not None and class_map is not None and "mask_decoder.mask_tokens.weight" in own:
        source = class_map.get(int(module["cls"]))
        source_key = None if source is None else f"mask_decoder.output_hypernetworks_mlps.{source}.{module['rest']}"
        if source_key in state and state[source_key].shape == value.shape:
            report.loaded.append(key)
            return state[source_key].to(value.dtype)
        report.reinitialised[key] = "class-specific"
        return value
    if _is_class_rows(key, own):
        source = state.get(key)
        if source is None or source.shape[1:] != value.shape[1:]:
            report.reinitialised[key] = "class-specific"
            return value
        merged = value.clone()
        copied = [(c, s) for c, s in class_map.items() if c < value.shape[0] and s < source.shape[0]]
        for c, s in copied:
            merged[c] = source[s].to(value.dtype)
        if len(copied) == value.shape[0] and source.shape == value.shape:
            report.loaded.append(key)
        else:
            report.reinitialised[key] = "class-specific"
        return merged
    if key in state and state[key].shape == value.shape:
        report.loaded.append(key)
        return state[key].to(value.dtype)
    report.reinitialised[key] = "missing in the checkpoint" if key not in state else "shape differs"
    return value


def _is_class_rows(key: str, own: Mapping[str, torch.Tensor]) -> bool:
    """IC-MoE tensors with one row per class (the IoU head: its output layer only)."""
    count = class_count_from_shapes(own)
    if count is None:
        return False
    if any(p.fullmatch(key) for p in _CLASS_ROWS):
        return True
    iou = _IOU_HEAD.fullmatch(key)
    if iou is None:
        return False
    last = max(int(m["layer"]) for k in own if (m := _IOU_HEAD.fullmatch(k)))
    return int(iou["layer"]) == last
