"""Finding cases in a dataset folder and splitting them into deterministic folds.

Two layouts are understood:

- an MSD task folder: ``dataset.json`` whose ``training`` list gives ``image`` / ``label`` paths
  (``imagesTr/``, ``labelsTr/``), as the Medical Segmentation Decathlon and nnU-Net v1 ship them;
- a plain pair of folders, ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/`` without a dataset.json, or
  with an nnU-Net v2 dataset.json, which has no ``training`` list), matched by file name; nnU-Net's channel suffix
  ``_0000`` on image names is understood.

:func:`dataset_info` reads what ``dataset.json`` says about the task (label names, modality, name, licence) in
either format: MSD's ``{"labels": {"1": "liver"}, "modality": {"0": "CT"}}`` and nnU-Net v2's
``{"labels": {"liver": 1}, "channel_names": {"0": "CT"}}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ic_moe_monai.errors import ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "DatasetInfo",
    "case_name",
    "check_dataset_labels",
    "datalist",
    "dataset_info",
    "find_cases",
    "find_images",
    "split_folds",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class DatasetError(ConfigError):
    """A dataset folder that cannot be used; the message names the folder and the problem."""


def case_name(path: str | Path) -> str:
    """File name without its image suffix (and without nnU-Net's ``_0000`` channel suffix)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = name.removesuffix("_0000")
    return stem or name  # a file named just "_0000.nii.gz" keeps its name rather than becoming empty


def find_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (NIfTI, NRRD, MHA/MHD), sorted; hidden files are ignored."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


def find_cases(dataset_dir: str | Path) -> list[dict[str, str]]:
    """All labelled cases of a dataset folder as ``[{"image": path, "label": path}, ...]`` sorted by case name."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root}: no such folder.")
    manifest = root / "dataset.json"
    cases = _cases_from_manifest(manifest) if manifest.is_file() else _cases_from_folders(root)
    missing = [c["image"] for c in cases if not Path(c["image"]).is_file()]
    missing += [c["label"] for c in cases if not Path(c["label"]).is_file()]
    if missing:
        raise DatasetError(f"dataset folder {root}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}.")
    return sorted(cases, key=lambda c: case_name(c["image"]))


def _cases_from_manifest(manifest: Path) -> list[dict[str, str]]:
    try:
        content = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{manifest}: not a readable JSON file ({err}).") from err
    root = manifest.parent
    entries = content.get("training") if isinstance(content, dict) else None
    if entries is None:
        return _cases_from_folders(root)  # nnU-Net v2: no list, the cases are the folders' files
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"image", "label"} <= set(e) for e in entries):
        raise DatasetError(f"{manifest}: not an MSD dataset.json with a 'training' list of image / label entries.")
    cases = [
        {"image": str((root / e["image"]).resolve()), "label": str((root / e["label"]).resolve())} for e in entries
    ]
    if not cases:
        raise DatasetError(f"{manifest}: the 'training' list is empty.")
    return cases


def _cases_from_folders(root: Path) -> list[dict[str, str]]:
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / images).is_dir() and (root / labels).is_dir():
            break
    else:
        raise DatasetError(
            f"dataset folder {root}: expected dataset.json, or images/ + labels/ (or imagesTr/ + labelsTr/) folders."
        )
    labels_by_name = {case_name(p): p for p in find_images(root / labels)}
    cases, unlabelled = [], []
    for image in find_images(root / images):
        label = labels_by_name.get(case_name(image))
        if label is None:
            unlabelled.append(image.name)
        else:
            cases.append({"image": str(image.resolve()), "label": str(label.resolve())})
    if unlabelled:
        raise DatasetError(
            f"dataset folder {root}: {len(unlabelled)} image(s) have no label of the same name in {labels}/, "
            f"e.g. {unlabelled[0]}."
        )
    if not cases:
        raise DatasetError(f"dataset folder {root}: no image files in {images}/.")
    return cases


def split_folds(
    cases: list[dict[str, str]], fold: int = 0, num_folds: int = 5, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic (train, validation) split: cases sorted by name, shuffled with ``seed``, dealt into folds.

    The same dataset, seed and ``num_folds`` always give the same folds, whatever the file order on disk.
    """
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}.")
    if len(cases) < num_folds:
        raise DatasetError(f"{len(cases)} case(s) cannot be split into {num_folds} folds.")
    ordered = sorted(cases, key=lambda c: case_name(c["image"]))
    random.Random(seed).shuffle(ordered)
    validation = [c for i, c in enumerate(ordered) if i % num_folds == fold]
    training = [c for i, c in enumerate(ordered) if i % num_folds != fold]
    return training, validation


def datalist(
    dataset_dir: str | Path,
    section: str = "training",
    fold: int = 0,
    num_folds: int = 5,
    seed: int = 0,
    max_cases: int | None = None,
) -> list[dict[str, str]]:
    """Cases of one section of a fold: ``training``, ``validation`` or ``all``; ``max_cases`` keeps the first n."""
    cases = find_cases(dataset_dir)
    if section == "all":
        chosen = cases
    elif section in ("training", "validation"):
        training, validation = split_folds(cases, fold, num_folds, seed)
        chosen = training if section == "training" else validation
    else:
        raise ValueError(f"section must be 'training', 'validation' or 'all', got {section!r}.")
    return chosen[:max_cases] if max_cases else chosen


# ------------------------------------------------------------------------------------------------ dataset.json
@dataclass
class DatasetInfo:
    """What a dataset folder's ``dataset.json`` says about its task (empty fields where it says nothing).

    Attributes:
        label_names: ``{value: name}``, background included, or None.
        modalities: the image channels' modality names (e.g. ``["CT"]``), or None.
        name, description, reference, licence: as given.
        manifest: the dataset.json read, or None when there is none.
    """

    label_names: dict[int, str] | None = None
    modalities: list[str] | None = None
    name: str = ""
    description: str = ""
    reference: str = ""
    licence: str = ""
    manifest: Path | None = None


def dataset_info(dataset_dir: str | Path) -> DatasetInfo:
    """Read the task description of ``dataset_dir/dataset.json`` (MSD or nnU-Net v2 format).

    Raises:
        DatasetError: the folder does not exist, or its dataset.json cannot be read or holds labels that are not
            ``value: name`` pairs.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root}: no such folder.")
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return DatasetInfo()
    try:
        content = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{manifest}: not a readable JSON file ({err}).") from err
    if not isinstance(content, dict):
        raise DatasetError(f"{manifest}: not a JSON object.")
    info = DatasetInfo(manifest=manifest)
    labels = content.get("labels")
    if labels:
        info.label_names = _label_names(labels, manifest)
    channels = content.get("modality") or content.get("channel_names")
    if isinstance(channels, Mapping) and channels:
        info.modalities = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k) if str(k).isdigit() else 0)]
    elif isinstance(channels, str):
        info.modalities = [channels]
    info.name = str(content.get("name", ""))
    info.description = str(content.get("description", ""))
    info.reference = str(content.get("reference", ""))
    info.licence = str(content.get("licence", content.get("license", "")))
    return info


def _label_names(labels: Any, manifest: Path) -> dict[int, str]:
    """MSD's ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}`` → ``{1: "liver"}`` (regions are refused)."""
    if not isinstance(labels, Mapping):
        raise DatasetError(f"{manifest}: 'labels' must map label values to names.")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        else:
            raise DatasetError(f"{manifest}: label {key!r}: {value!r} is not a label value and name (nnU-Net region "
                               "labels are not supported).")  # fmt: skip
    return dict(sorted(names.items()))


def check_dataset_labels(dataset_dir: str | Path, label_names: Mapping[Any, str]) -> bool:
    """Refuse to train a bundle on a dataset whose ``dataset.json`` names other labels than the bundle's.

    Names are compared by value, without regard to case; the background's name is not compared. A folder that does
    not exist (e.g. MONAI Label's training, which gives the cases itself), and datasets without a dataset.json or
    without labels in it, pass.

    Returns:
        True (for a config's ``initialize`` list).

    Raises:
        DatasetError: one line naming both label sets and the command that makes a bundle for the dataset.
    """
    if not Path(dataset_dir).is_dir():
        return True
    given = dataset_info(dataset_dir).label_names
    if not given:
        return True
    ours = {int(k): str(v) for k, v in label_names.items()}
    key = {v: n.strip().lower() for v, n in given.items() if v != 0}
    if key != {v: n.strip().lower() for v, n in ours.items() if v != 0}:
        theirs = ", ".join(f"{v} {n}" for v, n in given.items() if v != 0)
        mine = ", ".join(f"{v} {n}" for v, n in ours.items() if v != 0)
        raise DatasetError(f"{Path(dataset_dir) / 'dataset.json'} names the labels {theirs}; this bundle is for "
                           f"{mine}: make a bundle for the dataset with `python -m ic_moe_monai init_bundle "
                           f"{dataset_dir} <new bundle folder>` and train that one.")  # fmt: skip
    return True
