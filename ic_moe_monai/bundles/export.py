"""A copy of a bundle that stands alone: ``python -m ic_moe_monai export_bundle BUNDLE OUT``.

The copy runs with MONAI and the packages its ``metadata.json`` lists, without this package installed, in the
MONAI model zoo's layout:

- ``scripts/``: the package code the configs need (the modules they name, and what those import), generated now
  from the installed package, with ``ic_moe_monai`` renamed ``scripts``; the configs refer to ``scripts.…``.
  As for every zoo bundle with ``scripts/``, the bundle's folder must be on Python's path: run the commands from the
  bundle's folder (``python -m`` puts the current folder first), or put it on ``PYTHONPATH``. MONAI Label adds it
  itself.
- ``configs/``: the bundle's configs; machine paths (``dataset_dir``) become placeholders, and the fine-tuning start
  (``pretrained_ckpt``) is dropped.
- ``configs/metadata.json``: numeric ``eval_metrics`` (from the bundle's evaluation, ``eval/metrics_summary.json``,
  or ``--metrics``), ``required_packages_version`` with the third-party packages ``scripts/`` imports (at the
  installed versions) instead of this package, and ``torchscript``: trace only (``torch.jit.script`` is not
  supported by Segment Anything's modules).
- ``models/model.pt`` (checked to load with ``torch.load(weights_only=True)``) and ``large_files.yml`` listing it
  with its MD5 (and the profile's SAM checkpoint); ``docs/`` (the model card, with the performance table filled in
  where it has the markers, its pictures and text files), ``LICENSE``, ``sample_data/`` (images and notes).

Nothing else is copied (no ``eval/``, training checkpoints, logs or hidden files), nor anything a link leads to
outside the bundle: such a link is refused. The copy is written beside ``OUT`` under a hidden name and renamed
when complete; ``OUT`` must be new or an empty folder outside the bundle.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import math
import re
import shutil
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ic_moe_monai
from ic_moe_monai._moved import current_paths
from ic_moe_monai.bundles.card import PERFORMANCE_START, fill_performance, missing_headings, performance_table
from ic_moe_monai.bundles.folders import check_new_folder, staged_folder
from ic_moe_monai.data.datasets import IMAGE_SUFFIXES
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks.fine_tuning import read_state_dict

__all__ = ["PACKAGE", "VENDORED_NAME", "export_bundle", "package_modules", "third_party_requirements"]

PACKAGE = "ic_moe_monai"
VENDORED_NAME = "scripts"  # the model zoo's folder for a bundle's own code
PACKAGE_DIR = Path(ic_moe_monai.__file__).resolve().parent
_REFERENCE = re.compile(r"\bic_moe_monai(?:\.[A-Za-z_]\w*)*")
# Imported only for optional features of the bundle: not required to run it.
OPTIONAL_IMPORTS = {"mlflow": "--tracking mlflow", "highdicom": "DICOM SEG output of the segment command"}
# Packages the bundle uses through MONAI rather than by import in scripts/.
CONFIG_REQUIREMENTS = ("itk", "tensorboard")  # ITK: MONAI's reader of NRRD and MHA files
# Listed by metadata.json's own keys (monai_version, pytorch_version, numpy_version).
LISTED_APART = {"monai", "torch", "numpy"}
# What the export takes of these folders: the card and its pictures, sample images and their notes.
DOCUMENTS = {
    "docs": (".md", ".txt", ".png", ".jpg", ".jpeg", ".gif", ".svg"),
    "sample_data": (*IMAGE_SUFFIXES, ".md", ".txt"),
}
TORCHSCRIPT = {
    "script": False,
    "trace": True,
    "note": "torch.jit.script is not supported (Segment Anything's encoder and decoder do not script; in the model "
    "zoo's CI the bundle belongs in exclude_verify_torchscript_list); export by tracing: python -m monai.bundle "
    "ckpt_export network_def --filepath model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json "
    '--config_file configs/inference.json --use_trace true --input_shape "[1, 3, S, S]" (S: the input size)',
}


def export_bundle(
    bundle: str | Path,
    out: str | Path,
    metrics: str | Path | None = None,
    weights_url: str = "",
) -> Path:
    """Write the stand-alone copy of ``bundle`` to ``out`` (see the module docstring).

    Args:
        bundle: the bundle (``configs/``, ``models/model.pt``).
        out: the new folder; must not exist, or be empty, and lie outside ``bundle``.
        metrics: an evaluation's ``metrics_summary.json`` (default: the bundle's ``eval/metrics_summary.json``;
            without one, the numeric ``eval_metrics`` already in its metadata).
        weights_url: where ``models/model.pt`` will be downloadable from, for ``large_files.yml``.

    Raises:
        ConfigError: in one line, when the bundle lacks something the copy needs (configs, weights, numbers), a file
            of it cannot be read, a link in it leads outside it, or ``out`` cannot be used.
    """
    bundle, out = Path(bundle), Path(out)
    for needed in ("configs/inference.json", "configs/metadata.json", "models/model.pt"):
        if not (bundle / needed).is_file():
            raise ConfigError(f"bundle {bundle}: no {needed}" + (" (train it first)." if "model" in needed else "."))
    check_new_folder(out, "the export", {"the bundle": bundle})
    metadata = _read_json_object(bundle / "configs" / "metadata.json")
    eval_metrics, summary = _eval_metrics(bundle, metrics, metadata)
    configs = sorted(p for p in (bundle / "configs").iterdir() if _shipped(p, bundle, (".json", ".conf")))
    # a bundle made before the package was arranged by stage names the old module paths: export the current ones
    contents = {p.name: current_paths(_read_text(p)) for p in configs}
    exported = {name: _exported_config(text, bundle / "configs" / name) for name, text in contents.items()}
    read_state_dict(_inside(bundle / "models" / "model.pt", bundle), mmap=True)
    modules = package_modules(_references(contents.values()))
    with staged_folder(out) as stage:
        _vendor(modules, stage / VENDORED_NAME)
        (stage / "configs").mkdir()
        for name, text in exported.items():
            if name != "metadata.json":
                (stage / "configs" / name).write_text(text)
        metadata["eval_metrics"] = eval_metrics
        metadata["required_packages_version"] = third_party_requirements(stage / VENDORED_NAME)
        metadata["torchscript"] = TORCHSCRIPT
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")
        (stage / "models").mkdir()
        shutil.copyfile(bundle / "models" / "model.pt", stage / "models" / "model.pt")
        quality = bundle / "models" / "quality.json"  # the quality score's calibration, when evaluated
        if _shipped(quality, bundle, (".json",)):
            shutil.copyfile(quality, stage / "models" / "quality.json")
        _copy_documents(bundle, stage)
        _write_large_files(bundle, stage, weights_url)
        _finish_card(stage, bundle, metadata, summary)
    return out


# ------------------------------------------------------------------------------------------------ what is copied
def _inside(path: Path, bundle: Path) -> Path:
    """``path``, when it is in the bundle also after its links are followed.

    Raises:
        ConfigError: it leads outside the bundle (nothing from elsewhere on disk is copied into an export).
    """
    target = path.resolve()
    if bundle.resolve() not in target.parents:
        raise ConfigError(f"{path} is a link to {target}, outside the bundle: copy the file into the bundle.")
    return path


def _shipped(path: Path, bundle: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether an export carries ``path``: a visible file with one of ``suffixes`` (a link only within the bundle)."""
    if path.name.startswith(".") or not path.name.lower().endswith(suffixes) or not path.is_file():
        return False
    return _inside(path, bundle) == path


def _copy_documents(bundle: Path, out: Path) -> None:
    """``LICENSE``, the card and its pictures under ``docs/``, the images and notes of ``sample_data/``: what a zoo
    bundle has there, nothing else (no logs, checkpoints or hidden files)."""
    if (bundle / "LICENSE").is_file():
        shutil.copyfile(_inside(bundle / "LICENSE", bundle), out / "LICENSE")
    for folder, suffixes in DOCUMENTS.items():
        source = bundle / folder
        if not source.is_dir():
            continue
        _inside(source, bundle)
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if any(part.startswith((".", "__")) for part in relative.parts) or not _shipped(path, bundle, suffixes):
                continue
            (out / folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / folder / relative)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({getattr(err, 'strerror', None) or err}).") from err


def _read_json_object(path: Path) -> OrderedDict:
    """A JSON object from a bundle's file.

    Raises:
        ConfigError: one line naming the file: not readable, not JSON, not an object.
    """
    try:
        content = json.loads(_read_text(path), object_pairs_hook=OrderedDict)
    except (ValueError, RecursionError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid JSON ({(str(err).splitlines() or ['nested too deeply'])[0]}).") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: not a JSON object.")
    return content


# ------------------------------------------------------------------------------------------------ scripts/
def _references(texts: Iterable[str]) -> set[str]:
    """Dotted names under the package that config texts use (``ic_moe_monai.training.handlers.TrainingClock``, …)."""
    return {match.group(0) for text in texts for match in _REFERENCE.finditer(text)}


def _module_file(dotted: str) -> Path | None:
    """The file of module ``dotted`` (a package's ``__init__.py``), or None when it is no module."""
    parts = dotted.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _longest_module(dotted: str) -> str | None:
    """The longest prefix of a dotted name that is a module of the package (``a.b.Cls`` → ``a.b``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _module_file(candidate) is not None:
            return candidate
    return None


def package_modules(references: Iterable[str]) -> dict[str, Path]:
    """The package's modules needed for ``references``: those they name, every package ``__init__`` on their way,
    and everything those import from the package, recursively. ``{dotted name: file}``."""
    todo = [m for r in references if (m := _longest_module(r))]
    todo.append(PACKAGE)
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:end]) for end in range(1, len(parts))]  # the packages on the way
        todo += _imports_of(path, name)
    return dict(sorted(found.items()))


def _imports_of(path: Path, module: str) -> list[str]:
    """Modules of the package that a file imports (anywhere in it), as dotted names."""
    names = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != PACKAGE:
                continue
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}") is not None]
    return [m for n in names if (m := _longest_module(n))]


def _vendor(modules: Mapping[str, Path], target: Path) -> None:
    """Copy the modules under ``target`` (the package renamed ``scripts``), their references renamed too."""
    for path in modules.values():
        relative = path.relative_to(PACKAGE_DIR)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(_renamed(path.read_text()))


def _renamed(text: str) -> str:
    return re.sub(r"\bic_moe_monai\b", VENDORED_NAME, text)


def third_party_requirements(folder: Path) -> dict[str, str]:
    """``{distribution: installed version}`` of the third-party packages the Python files under ``folder`` import
    (the standard library, MONAI, PyTorch, NumPy and optional features left out), and those the configs use through
    MONAI."""
    top_level: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top_level.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                top_level.add(node.module.split(".")[0])
    top_level -= set(sys.stdlib_module_names) | {VENDORED_NAME, PACKAGE, "__future__"}
    distributions = importlib.metadata.packages_distributions()
    required: dict[str, str] = {}
    for module in sorted(top_level - set(OPTIONAL_IMPORTS) - LISTED_APART):
        for dist in _distributions(module, distributions):
            required[dist] = importlib.metadata.version(dist)
    for dist in CONFIG_REQUIREMENTS:
        required[dist] = importlib.metadata.version(dist)
    return dict(sorted(required.items(), key=lambda kv: kv[0].lower()))


def _distributions(module: str, distributions: Mapping[str, list[str]]) -> list[str]:
    """The distribution that installs a top-level module (the one named like it when several do, e.g. ``itk``)."""
    candidates = distributions.get(module, [])
    if not candidates:
        raise ConfigError(f"the bundle's code imports {module!r}, which no installed package provides.")
    same = [d for d in candidates if d.lower().replace("-", "_") == module.lower()]
    return [same[0] if same else candidates[0]]


# ------------------------------------------------------------------------------------------------ configs
def _exported_config(text: str, path: Path) -> str:
    """A config for the copy: references to ``scripts``, no machine paths, no fine-tuning start (``logging.conf``
    only renamed).

    Raises:
        ConfigError: a JSON config that is not valid JSON, naming ``path``.
    """
    if path.suffix != ".json":
        return _renamed(text)
    try:
        config = json.loads(_renamed(text), object_pairs_hook=OrderedDict)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON ({(str(err).splitlines() or ['nested too deeply'])[0]}).") from err
    if not isinstance(config, dict):
        return _renamed(text)
    if isinstance(config.get("dataset_dir"), str) and not config["dataset_dir"].startswith("$"):
        config["dataset_dir"] = "/workspace/data"  # a placeholder, as model zoo bundles have: --dataset_dir sets it
    if "pretrained_ckpt" in config:
        config["pretrained_ckpt"] = None  # models/pretrained.pt (the fine-tuning start) is not part of the copy
    return json.dumps(config, indent=4, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------ metadata
def _eval_metrics(
    bundle: Path, metrics: str | Path | None, metadata: Mapping[str, Any]
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Numeric ``eval_metrics`` (mean Dice, and Dice and HD95 per label) and the evaluation summary they are from."""
    path = Path(metrics) if metrics else bundle / "eval" / "metrics_summary.json"
    if path.is_file():
        report = _read_json_object(path)
        summary = report.get("summary")
        if not isinstance(summary, Mapping):
            raise ConfigError(f"{path}: not a metrics_summary.json of the bundle's evaluation.")
        unit = report.get("hd95_unit", "mm")
        values: dict[str, float] = {}
        for key, stats in summary.items():
            mean = stats.get("mean") if isinstance(stats, Mapping) else None
            if isinstance(mean, (int, float)) and math.isfinite(mean):
                name = f"{key}_{unit}" if key.endswith("_hd95") else key
                values[name] = round(float(mean), 4)
        if "mean_dice" not in values:
            raise ConfigError(f"{path}: no mean Dice in it (did the evaluation find any labelled case?).")
        summary = {**summary, "_source": str(path.name), "_cases": report.get("cases")}
        return dict(sorted(values.items(), key=lambda kv: kv[0] != "mean_dice")), summary
    if metrics:
        raise ConfigError(f"--metrics {path}: no such file.")
    existing = metadata.get("eval_metrics")
    existing = existing if isinstance(existing, Mapping) else {}
    numeric = {k: v for k, v in existing.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numeric:
        raise ConfigError(f"bundle {bundle}: no evaluation results (eval/metrics_summary.json) and no numeric "
                          "eval_metrics in its metadata: run evaluating first, or pass --metrics FILE.")  # fmt: skip
    return numeric, None


def _write_large_files(bundle: Path, out: Path, weights_url: str) -> None:
    """``large_files.yml``: the model with its MD5, then the bundle's own entries (e.g. a SAM checkpoint)."""
    digest = hashlib.md5()
    with open(out / "models" / "model.pt", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 24), b""):
            digest.update(block)
    lines = ["# Large files of this bundle. The weights' url: where models/model.pt is published (empty: not yet;",
             "# a present file whose hash matches is never downloaded).",
             "# Fetch: python -m monai.bundle download_large_files --bundle_path <bundle>",
             "large_files:",
             '  - path: "models/model.pt"',
             f'    url: "{weights_url}"',
             f'    hash_val: "{digest.hexdigest()}"',
             '    hash_type: "md5"']  # fmt: skip
    own = bundle / "large_files.yml"
    if own.is_file():
        entries = _read_text(_inside(own, bundle)).split("large_files:", 1)[-1]
        lines += [line for line in entries.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    (out / "large_files.yml").write_text("\n".join(lines) + "\n")


def _finish_card(out: Path, bundle: Path, metadata: Mapping[str, Any], summary: Mapping[str, Any] | None) -> None:
    """The card must have the zoo's headings; its performance markers get the evaluation's table."""
    card_path = out / "docs" / "README.md"
    if not card_path.is_file():
        raise ConfigError(f"bundle {bundle}: no docs/README.md (the model card).")
    card = card_path.read_text()
    missing = missing_headings(card)
    if missing:
        raise ConfigError(f"{bundle / 'docs' / 'README.md'} lacks the model zoo's headings {', '.join(missing)}.")
    if summary is not None and PERFORMANCE_START in card:
        names = _channel_def(metadata, bundle / "configs" / "metadata.json")
        source = (
            f"From `{summary['_source']}` of the bundle's evaluation ({summary['_cases']} cases, MONAI convention)."
        )
        card = fill_performance(card, performance_table(summary, names, source))
    card_path.write_text(_without_outside_links(card))


# a Markdown link whose target leaves the bundle (the repository's docs/ pages, seen from bundle/docs/)
_OUTSIDE_LINK = re.compile(r"\[([^\]]+)\]\((?:\.\./){2,}([^)\s]+)\)")


def _without_outside_links(card: str) -> str:
    """Links of the card to pages outside the bundle, which the copy does not hold, as plain text naming the page
    (``the project's docs/pacs.md``)."""

    def plain(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        return text if text.strip("`") == target else f"{text} (the project's `{target}`)"

    return _OUTSIDE_LINK.sub(plain, card)


def _channel_def(metadata: Mapping[str, Any], path: Path) -> dict[int, str]:
    """``{value: name}`` of the first output's ``channel_def``.

    Raises:
        ConfigError: the metadata has none, or not as label values and names.
    """
    try:
        outputs = metadata["network_data_format"]["outputs"]
        return {int(k): str(v) for k, v in next(iter(outputs.values()))["channel_def"].items()}
    except (KeyError, TypeError, AttributeError, ValueError, StopIteration) as err:
        raise ConfigError(f"{path}: no network_data_format.outputs with a channel_def of label values.") from err
