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
import re
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
    "check_label_names",
    "datalist",
    "dataset_info",
    "find_cases",
    "find_images",
    "one_line_text",
    "read_dataset_json",
    "split_folds",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# dataset.json is a small description of the task: a bigger file is refused before it is read.
MAX_DATASET_JSON_BYTES = 64 * 1024 * 1024
# Label names reach DICOM SEG segment labels (at most 64 characters, no backslash), table headers and model cards.
MAX_LABEL_NAME_LENGTH = 64
# Labelmaps are written as uint8.
MAX_LABEL_VALUE = 255
# Evaluation columns are "<name>_dice"; "mean_dice" is the mean over the labels.
RESERVED_LABEL_NAMES = {"mean"}


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


def read_dataset_json(manifest: str | Path) -> dict[str, Any]:
    """The JSON object of a ``dataset.json`` (UTF-8, a byte order mark allowed).

    Raises:
        DatasetError: one line naming the file: too big, unreadable, not JSON, or not a JSON object.
    """
    manifest = Path(manifest)
    try:
        size = manifest.stat().st_size
        data = manifest.read_bytes() if size <= MAX_DATASET_JSON_BYTES else b""
    except OSError as err:
        raise DatasetError(f"{manifest}: cannot be read ({err.strerror or err}).") from err
    if size > MAX_DATASET_JSON_BYTES:
        raise DatasetError(f"{manifest}: {size / 2**20:.0f} MiB is too big for a dataset.json (at most "
                           f"{MAX_DATASET_JSON_BYTES // 2**20} MiB).")  # fmt: skip
    try:
        content = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{manifest}: not a UTF-8 text file ({err.reason} at byte {err.start}).") from err
    except RecursionError as err:
        raise DatasetError(f"{manifest}: not a readable JSON file (nested too deeply).") from err
    except ValueError as err:  # JSONDecodeError, or a number too long to convert
        raise DatasetError(f"{manifest}: not a readable JSON file ({str(err).splitlines()[0]}).") from err
    if not isinstance(content, dict):
        raise DatasetError(f"{manifest}: not a JSON object (it holds a {type(content).__name__}).")
    return content


def _cases_from_manifest(manifest: Path) -> list[dict[str, str]]:
    content = read_dataset_json(manifest)
    root = manifest.parent
    entries = content.get("training")
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
    content = read_dataset_json(manifest)
    info = DatasetInfo(manifest=manifest)
    labels = content.get("labels")
    if labels:
        info.label_names = check_label_names(_label_names(labels, manifest), str(manifest))
    channels = content.get("modality") or content.get("channel_names")
    if isinstance(channels, Mapping) and channels:
        info.modalities = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k) if str(k).isdigit() else 0)]
    elif isinstance(channels, str):
        info.modalities = [channels]
    info.name = _text(content, "name", manifest)
    info.description = _text(content, "description", manifest)
    info.reference = _text(content, "reference", manifest)
    info.licence = _text(content, "licence", manifest) or _text(content, "license", manifest)
    return info


def one_line_text(text: str) -> str:
    """``text`` on one line: control characters and runs of white space become one space."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _text(content: Mapping[str, Any], key: str, manifest: Path) -> str:
    """A free-text field of dataset.json on one line ("" when absent or null)."""
    value = content.get(key)
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DatasetError(f"{manifest}: {key!r} must be text, not a {type(value).__name__}.")
    return one_line_text(str(value))


def _label_names(labels: Any, manifest: Path) -> dict[int, str]:
    """MSD's ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}`` → ``{1: "liver"}`` (regions are refused)."""
    if not isinstance(labels, Mapping):
        raise DatasetError(f"{manifest}: 'labels' must map label values to names.")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if re.fullmatch(r"\s*\d+\s*", str(key), re.ASCII):
            if not isinstance(value, str):
                raise DatasetError(f"{manifest}: label {key}: the name {value!r} is not text.")
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):
            number, name = value, str(key)
        else:
            raise DatasetError(f"{manifest}: label {key!r}: {value!r} is not a label value and name (nnU-Net region "
                               "labels are not supported).")  # fmt: skip
        if number in names:
            raise DatasetError(f"{manifest}: label value {number} is given twice ({names[number]!r}, {name!r}).")
        names[number] = name
    return dict(sorted(names.items()))


def check_label_names(names: Mapping[int, str], where: str) -> dict[int, str]:
    """Label names that every output can carry: text of at most 64 printable characters without a backslash,
    different from each other (whatever the case), values 0 … 255; surrounding spaces are dropped.

    Raises:
        DatasetError: one line naming ``where`` (a file or an option) and the first bad name.
    """
    checked: dict[int, str] = {}
    seen: dict[str, int] = {}
    for value, raw in names.items():
        name = raw.strip() if isinstance(raw, str) else raw
        problem = _name_problem(name)
        if problem is None and not 0 <= value <= MAX_LABEL_VALUE:
            problem = f"its value is not in 0 … {MAX_LABEL_VALUE} (labelmaps are 8-bit)"
        if problem is None and name.lower() in seen:
            problem = f"label {seen[name.lower()]} has the same name"
        if problem is not None:
            raise DatasetError(f"{where}: label {value} {_shown(raw)}: {problem}.")
        seen[name.lower()] = value
        checked[value] = name
    return checked


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return "the name is not text"
    if not name:
        return "the name is empty"
    if len(name) > MAX_LABEL_NAME_LENGTH:
        return f"the name is {len(name)} characters long (at most {MAX_LABEL_NAME_LENGTH})"
    if not name.isprintable() or "\\" in name:
        return "the name holds a control character or a backslash"
    if name.lower() in RESERVED_LABEL_NAMES:
        return "the name is reserved (the evaluation's mean_dice column)"
    return None


def _shown(name: Any) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "…"


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
