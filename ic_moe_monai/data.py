"""Finding cases in a dataset folder and splitting them into deterministic folds.

Two layouts are understood:

- an MSD task folder: ``dataset.json`` whose ``training`` list gives ``image`` / ``label`` paths
  (``imagesTr/``, ``labelsTr/``), as the Medical Segmentation Decathlon and nnU-Net v1 ship them;
- a plain pair of folders, ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/`` without a dataset.json),
  matched by file name; nnU-Net's channel suffix ``_0000`` on image names is understood.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "case_name",
    "datalist",
    "find_cases",
    "find_images",
    "split_folds",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class DatasetError(ValueError):
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
        entries = json.loads(manifest.read_text())["training"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{manifest}: not an MSD dataset.json with a 'training' list ({err}).") from err
    root = manifest.parent
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
