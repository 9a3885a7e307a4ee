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
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from ic_moe_monai._moved import moved_name
from ic_moe_monai.data.transforms import ct_window, modality_name
from ic_moe_monai.errors import ConfigError

__all__ = [
    "INFO_KEY",
    "BundleCheckpointLoader",
    "CheckpointMismatchError",
    "StampedWeights",
    "check_checkpoint",
    "checkpoint_info",
    "class_count_from_shapes",
    "describe_info",
    "describe_preprocessing",
    "info_mismatch",
    "read_info",
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
    folder = Path(__file__).resolve().parents[2] / "bundle"  # networks/ -> package -> repository
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


def __getattr__(name: str) -> Any:
    # configs written before fine-tuning had a module of its own name it here (``networks.fine_tuning``)
    return moved_name(__name__, name)

