"""Weights that know what they were trained for, and fine-tuning from one label set to another.

A bundle's weights fit only the classes and the preprocessing they were trained with, and their shapes do not
always tell (two labels renamed, or the same labels under another CT window, fit the network alike). So every
checkpoint the bundle writes carries its :func:`checkpoint_info`: the class count, the label names and the
preprocessing (modality, CT window or MR percentiles, slice context, input size).

Where it is stored: ``models/model.pt`` stays a plain state dict of the network, which MONAI's ``CheckpointLoader``,
``ckpt_export``, MONAI Label and the model zoo load as they are; the info rides in the state dict's
``_metadata[""]["ic_moe"]``, PyTorch's own per-module metadata, which ``torch.save`` and
``torch.load(weights_only=True)`` keep and ``load_state_dict`` ignores. Plain state dicts without it (older
checkpoints, the shipped model) still load; only their class count is checked, from their shapes.

- :class:`StampedWeights`: the network as the savers and loaders of the training configs see it: its state dict
  with the info, and a ``load_state_dict`` that refuses weights trained for something else.
- :class:`BundleCheckpointLoader`: MONAI's ``CheckpointLoader`` for evaluation and inference, checking the file and
  its info as soon as it is attached, so that a mismatch is one line before anything runs.
- :func:`load_pretrained_weights`: fine-tuning. Every tensor whose shape fits is loaded; the class-specific parts
  (mask tokens, hypernetworks, expert class heads, prototypes, the IoU head's output) are copied only for the
  classes both label sets share by name (background always) and re-initialised for the others. The report lists
  what was loaded and what starts afresh.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.transforms import ct_window, modality_name

__all__ = [
    "INFO_KEY",
    "BundleCheckpointLoader",
    "CheckpointMismatchError",
    "FineTuneReport",
    "StampedWeights",
    "check_checkpoint",
    "checkpoint_info",
    "class_count_from_shapes",
    "describe_info",
    "describe_preprocessing",
    "info_mismatch",
    "load_pretrained_weights",
    "read_info",
    "read_state_dict",
    "refuse_shipped_model",
    "shipped_bundle",
    "with_info",
]

logger = logging.getLogger(__name__)

INFO_KEY = "ic_moe"  # the entry of the state dict's root metadata that holds the info
INFO_FORMAT = 1
# What to do when weights do not fit the config; appended to mismatch messages.
MISMATCH_HINT = (
    "use these weights with the bundle they were trained in (its configs say the same), or make a bundle for "
    "your labels with `python -m ic_moe_monai init_bundle` and train it"
)


class CheckpointMismatchError(ConfigError):
    """Weights trained for other classes or another preprocessing than the config's (one line, naming the file)."""


# ------------------------------------------------------------------------------------------------ the info
def checkpoint_info(
    label_names: Mapping[Any, str],
    modality: str = "mr",
    ct_window_setting: str | Sequence[float] = "abdomen",
    context: str = "neighbors",
    img_size: int | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
) -> dict[str, Any]:
    """What a bundle's weights are trained for, as stored with its checkpoints (JSON-safe).

    Args:
        label_names: ``{value: name}`` with values 0 (background), 1, …, K.
        modality: ``"ct"`` or ``"mr"``.
        ct_window_setting: the CT window (name or ``[level, width]``); ignored for MR.
        context: ``"neighbors"`` or ``"repeat"`` (the 2.5D input).
        img_size: the network's in-plane input size.
        percentiles: the MR normalisation's percentiles; ignored for CT.

    Raises:
        ConfigError: label values that are not 0 … K, an unknown modality or CT window.
    """
    names = {int(k): str(v) for k, v in label_names.items()}
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise ConfigError(f"label_names {dict(label_names)!r}: the labels must be numbered 0 (background), 1, …, K "
                          "with at least one foreground label.")  # fmt: skip
    modality = modality_name(modality)
    preprocessing: dict[str, Any] = {"modality": modality}
    if modality == "ct":
        preprocessing["ct_window"] = list(ct_window(ct_window_setting))
    else:
        preprocessing["percentiles"] = [float(p) for p in percentiles]
    preprocessing["context"] = str(context)
    preprocessing["img_size"] = None if img_size is None else int(img_size)
    return {
        "format": INFO_FORMAT,
        "num_classes": len(names) - 1,
        "label_names": {str(k): names[k] for k in sorted(names)},
        "preprocessing": preprocessing,
    }


def describe_info(info: Mapping[str, Any]) -> str:
    """``3 classes (liver, spleen, kidney), CT window level 40 width 400, 64² neighbors input``."""
    names = [n for k, n in sorted(info["label_names"].items(), key=lambda kv: int(kv[0])) if int(k) != 0]
    count = info["num_classes"]
    return f"{count} class{'es' if count != 1 else ''} ({', '.join(names)}), {describe_preprocessing(info)}"


def describe_preprocessing(info: Mapping[str, Any]) -> str:
    """``CT window level 40 width 400, 64² neighbors input``."""
    pre = info.get("preprocessing", {})
    if pre.get("modality") == "ct":
        level, width = pre.get("ct_window", ("?", "?"))
        intensity = f"CT window level {level:g} width {width:g}"
    else:
        low, high = pre.get("percentiles", ("?", "?"))
        intensity = f"MR normalisation (percentiles {low:g}–{high:g})"
    size = pre.get("img_size")
    return intensity + (f", {size}² {pre.get('context', 'neighbors')} input" if size else "")


def info_mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between two infos: ``[]`` when they agree, else the parts that differ (``classes``,
    ``preprocessing``)."""
    parts = []
    if int(found["num_classes"]) != int(expected["num_classes"]) or dict(found["label_names"]) != dict(
        expected["label_names"]
    ):
        parts.append("classes")
    a, b = found.get("preprocessing", {}), expected.get("preprocessing", {})
    for key in sorted(set(a) | set(b)):
        if key == "img_size" and (a.get(key) is None or b.get(key) is None):
            continue
        if not _same(a.get(key), b.get(key)):
            parts.append("preprocessing")
            break
    return parts


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6)
    return x == y


def read_info(state: Any) -> dict[str, Any] | None:
    """The info stored with a state dict (see the module docstring), or None for a plain state dict."""
    metadata = getattr(state, "_metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    for entry in (metadata.get(""), *metadata.values()):  # the root module's first; "module" under DDP
        if isinstance(entry, Mapping) and isinstance(entry.get(INFO_KEY), Mapping):
            return dict(entry[INFO_KEY])
    return None


def with_info(state: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> OrderedDict:
    """``state`` (a network's state dict) carrying ``info`` in its root metadata; the tensors are not copied."""
    out = state if isinstance(state, OrderedDict) else OrderedDict(state)
    metadata = OrderedDict(getattr(state, "_metadata", None) or {})
    root = dict(metadata.get("", {}))
    root[INFO_KEY] = copy.deepcopy(dict(info))
    metadata[""] = root
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def class_count_from_shapes(state: Mapping[str, Any]) -> int | None:
    """Foreground classes K of IC-MoE weights, from the decoder's K + 1 mask tokens; None for other networks."""
    tokens = state.get("mask_decoder.mask_tokens.weight")
    return int(tokens.shape[0]) - 1 if isinstance(tokens, torch.Tensor) else None


def check_checkpoint(state: Mapping[str, Any], expected: Mapping[str, Any] | None, where: str | Path) -> None:
    """Refuse weights trained for other classes or another preprocessing than ``expected`` describes.

    Weights without an info (plain state dicts) are checked for their class count only, and only where their shapes
    tell it (IC-MoE networks).

    Raises:
        CheckpointMismatchError: one line naming ``where``, what the weights and the config are for, and what to do.
    """
    if not expected:
        return
    found = read_info(state)
    if found is not None:
        differs = info_mismatch(found, expected)
        if differs:
            raise CheckpointMismatchError(
                f"checkpoint {where} was trained for {describe_info(found)}; this config is for "
                f"{describe_info(expected)} ({' and '.join(differs)} differ): {MISMATCH_HINT}."
            )
        return
    count = class_count_from_shapes(state)
    if count is not None and count != int(expected["num_classes"]):
        raise CheckpointMismatchError(
            f"checkpoint {where} has {count} classes (from its shapes); this config is for "
            f"{describe_info(expected)}: {MISMATCH_HINT}."
        )


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return network.module if isinstance(network, parallel) else network


class StampedWeights:
    """The network as the training's checkpoint savers and loaders see it: its state dict carrying ``info``, and a
    ``load_state_dict`` that refuses weights trained for other classes or another preprocessing.

    Use it in place of the network in MONAI's ``CheckpointSaver(save_dict=...)`` and ``CheckpointLoader(load_dict=
    ...)``: with a single entry, MONAI writes the plain state dict (``models/model.pt``), the info included.

    Args:
        network: the network (DistributedDataParallel is unwrapped).
        info: :func:`checkpoint_info` of the config.
    """

    def __init__(self, network: torch.nn.Module, info: Mapping[str, Any]) -> None:
        self.network = network
        self.info = dict(info)

    def state_dict(self) -> OrderedDict:
        return with_info(_unwrap(self.network).state_dict(), self.info)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        check_checkpoint(state, self.info, "given")
        return _unwrap(self.network).load_state_dict(state, strict=strict)


class BundleCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that reads and checks the checkpoint when it is attached (or called), not when
    the engine starts: a missing file, or weights trained for other classes or another preprocessing than ``info``
    describes, are one line (:class:`CheckpointMismatchError`) before anything runs. The checkpoint read for the
    check is the one loaded.

    Args:
        load_path: the checkpoint.
        load_dict: as MONAI's, e.g. ``{"model": network}``.
        info: :func:`checkpoint_info` of the config; None skips the check.
        kwargs: further ``CheckpointLoader`` arguments (``map_location``, ``strict``, ``name``).
    """

    def __init__(self, load_path: str, load_dict: dict, info: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.info = info
        self._checkpoint: Any = None

    def read(self) -> Any:
        """Read and check the checkpoint; kept until it is loaded."""
        if self._checkpoint is None:
            path = Path(self.load_path)
            if not path.is_file():
                raise ConfigError(f"checkpoint {path}: no such file (train the bundle first, or pass --ckpt_path).")
            try:
                with warnings.catch_warnings():  # e.g. about the pickle protocol of a file about to be refused
                    warnings.simplefilter("ignore")
                    checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
            except Exception as err:  # torch.load raises many types for files that are not checkpoints
                raise ConfigError(f"checkpoint {path}: not a file that torch.load(weights_only=True) reads: corrupt, "
                                  f"truncated or holding code ({type(err).__name__}).") from err  # fmt: skip
            if not isinstance(checkpoint, Mapping):
                raise ConfigError(f"checkpoint {path}: not a checkpoint (it holds a {type(checkpoint).__name__}).")
            key = next(iter(self.load_dict))
            state = checkpoint.get(key, checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
            check_checkpoint(state, self.info, path)
            self._checkpoint = checkpoint
        return self._checkpoint

    def attach(self, engine: Any) -> None:
        self.read()
        super().attach(engine)

    def __call__(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        checkpoint, self._checkpoint = self.read(), None
        key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and key not in checkpoint:
            checkpoint = {key: checkpoint}
        prior_max_epochs = engine.state.max_epochs  # as MONAI's: the engine's own max_epochs stays
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


# ------------------------------------------------------------------------------------------------ the shipped model
def shipped_bundle() -> Path | None:
    """The bundle shipped with this package (``bundle/`` beside it in the repository), or None when absent."""
    folder = Path(__file__).resolve().parents[1] / "bundle"
    return folder if (folder / "configs" / "inference.json").is_file() else None


def refuse_shipped_model(ckpt_dir: str | Path) -> bool:
    """Refuse a training command that would write its checkpoints and ``model.pt`` into the shipped bundle.

    The bundle's ``training`` run list calls it, the one users type (``python -m monai.bundle run training``);
    MONAI Label's ``/train`` runs the ``run`` list, and keeps writing its own bundle's ``models/model.pt``.

    Returns:
        True (for a config's run list).

    Raises:
        ConfigError: ``ckpt_dir`` is the shipped bundle's ``models`` folder; the message says how to train instead.
    """
    shipped = shipped_bundle()
    if shipped is not None and Path(ckpt_dir).resolve() == (shipped / "models").resolve():
        raise ConfigError(f"training would write over the shipped model in {shipped / 'models'}: train a bundle of "
                          "your own, made by `python -m ic_moe_monai init_bundle DATASET_DIR NEW_BUNDLE` (it starts "
                          "from the shipped weights), or give --ckpt_dir another folder.")  # fmt: skip
    return True


# ------------------------------------------------------------------------------------------------ fine-tuning
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
    (:class:`~ic_moe_monai.resume.TrainingCheckpoints`) is loaded later, when the engine starts, so an interrupted
    fine-tuning continues from its own last epoch.

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
