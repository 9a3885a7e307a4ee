"""Model cards in the MONAI model zoo's layout (the headings of its bundles' ``docs/README.md``).

:func:`model_card` writes the card of a bundle made by ``init_bundle``; :func:`fill_performance` puts evaluation
results between the card's performance markers (``export_bundle`` does); :func:`missing_headings` checks a card
against the zoo's headings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PERFORMANCE_END", "PERFORMANCE_START", "ZOO_HEADINGS", "fill_performance", "markdown_text",
           "missing_headings", "model_card", "performance_table"]  # fmt: skip

# The headings of model zoo cards (e.g. spleen_ct_segmentation's docs/README.md), in order.
ZOO_HEADINGS = ("# Model Overview", "## Data", "## Training configuration", "## Input", "## Output", "## Performance",
                "## MONAI Bundle Commands", "## References", "# License")  # fmt: skip
PERFORMANCE_START = "<!-- performance:start -->"
PERFORMANCE_END = "<!-- performance:end -->"

TORCHSCRIPT_NOTE = (
    "TorchScript: the network exports by tracing only. `torch.jit.script` is not supported (Segment Anything's "
    "encoder and decoder do not script), so in the model zoo's CI the bundle belongs in "
    '`exclude_verify_torchscript_list`; export with `ckpt_export ... --use_trace true --input_shape "[1, 3, S, S]"`.'
)


# Characters that would start Markdown or HTML markup (or end a table cell) in text from a dataset.json.
_MARKUP = re.compile(r"([\\`*_\[\]|#])")


def markdown_text(text: Any) -> str:
    """``text`` on one line, shown as it is in Markdown (markup characters escaped, ``<`` and ``>`` as entities)."""
    line = " ".join(str(text).split())
    return _MARKUP.sub(r"\\\1", line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def missing_headings(card: str) -> list[str]:
    """The zoo headings a card lacks (as whole lines), in order."""
    lines = {line.strip() for line in card.splitlines()}
    return [h for h in ZOO_HEADINGS if h not in lines]


def performance_table(metrics: Mapping[str, Any], label_names: Mapping[int, str], source: str) -> str:
    """A Markdown table of per-label Dice and HD95 from ``metrics_summary.json``'s ``summary``."""
    rows = ["| label | Dice (mean) | HD95 (mean) | cases |", "|---|---|---|---|"]
    for value, name in sorted(label_names.items()):
        if value == 0:
            continue
        dice = metrics.get(f"{name}_dice", {})
        hd95 = metrics.get(f"{name}_hd95", {})
        numbers = f"{_number(dice.get('mean'))} | {_number(hd95.get('mean'))} | {dice.get('cases', '')}"
        rows.append(f"| {markdown_text(name)} | {numbers} |")
    rows.append(f"| **mean** | **{_number(metrics.get('mean_dice', {}).get('mean'))}** | | |")
    return "\n".join(rows) + f"\n\n{source}\n"


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.4f}"


def fill_performance(card: str, table: str) -> str:
    """The card with ``table`` between its performance markers (unchanged when it has none)."""
    pattern = re.compile(re.escape(PERFORMANCE_START) + r".*?" + re.escape(PERFORMANCE_END), re.S)
    return pattern.sub(lambda _: f"{PERFORMANCE_START}\n{table}{PERFORMANCE_END}", card, count=1)


def model_card(task_name: str, about: Any, names: Mapping[int, str], modality: str, window: Any, profile: str,
               cases: int, source: Path | None) -> str:  # fmt: skip
    """The model card of a bundle made by ``init_bundle`` (its commands run from the bundle's parent folder)."""
    foreground = [markdown_text(n) for v, n in names.items() if v != 0]
    kind = "CT" if modality == "ct" else "MR"
    intensity = (f"the CT window `{window}` (HU) mapped to [0, 1]" if modality == "ct"
                 else "the 0.5th–99.5th percentiles mapped to [0, 1]")  # fmt: skip
    start = f"the weights of the bundle {markdown_text(source.name)}" if source else "the profile's own initialisation"
    channel_rows = "\n".join(f"| {v} | {markdown_text(n)} |" for v, n in names.items())
    unstated = "not stated in the dataset's dataset.json: see `docs/data_license.txt`"
    licence = markdown_text(about.licence) if about.licence else unstated
    task_name = markdown_text(task_name)
    description = markdown_text(about.description) if about.description else ""
    reference = markdown_text(about.reference) if about.reference else ""
    return f"""# Model Overview

IC-MoE ({profile} profile) segments **{", ".join(foreground)}** in {kind} volumes, slice by slice with 2.5D context:
the Segment Anything Model (SAM) adapted to medical images by a mixture of experts (basic, semantic and adaptive
experts, fused per token by adaptive voting). This bundle was made by `python -m ic_moe_monai init_bundle` for
the dataset *{task_name}*; training starts from {start} (what fits is loaded; the class-specific parts of labels the
start bundle does not have are re-initialised).

## Data

{task_name}{": " + description if description else ""} ({cases} labelled cases when the bundle was made).
Data licence: {licence}.

## Training configuration

`configs/train.json`: profile `{profile}`, the shipped recipe (AdamW, warm-up and cosine schedule, Dice + CE with
the IC-MoE expert, routing, balance and contrastive terms), a fixed number of steps per epoch (volumes drawn with
replacement), validation every `val_interval` epochs (or `val_interval_steps` / `val_interval_minutes`), the best
validation mean Dice kept as `models/model.pt`. `max_train_minutes` bounds the run; the learning-rate schedule then
ends with the budget.

## Input

One single-channel {kind} volume (NIfTI, NRRD, MHA, or a DICOM series through `ic_moe_monai segment`), reoriented to
RAS; intensities: {intensity}. The network sees `(B, 3, S, S)`: axial slices z-1, z, z+1.

## Output

A labelmap (uint8) with the input's shape and affine:

| value | label |
|---|---|
{channel_rows}

## Performance

{PERFORMANCE_START}
Not measured yet: train, then run evaluating (below); `export_bundle` fills this table from `eval/metrics_summary.json`.
{PERFORMANCE_END}

### Quality score

Every segmentation of this bundle can say how far to trust it: an estimate of the Dice a reviewer would give each
case and label (0 … 1), from the network's own probabilities, and a flag with reasons for a case unlike the ones it
was calibrated on (another modality, body region or orientation, noise, blur). `run evaluating` fits it on the
evaluated cases and writes `models/quality.json`; until then this bundle gives no scores. `segment` writes the
score into `report.json` and `quality.csv` (worst first; `--qc_threshold` sets what is flagged), the `--preview`
image shows it with where the network was unsure, and MONAI Label's answer carries it in its params. Fitted on
few validation cases, the estimate ranks cases only roughly: review the flagged ones and the lowest scores first.

## MONAI Bundle Commands

Run from the folder that holds the bundle (`BUNDLE` is its folder name).

```bash
# train (resumes after an interruption; Ctrl-C stops cleanly with a checkpoint)
python -m monai.bundle run training --config_file BUNDLE/configs/train.json --bundle_root BUNDLE \\
    --dataset_dir DATASET_DIR
tensorboard --logdir BUNDLE/eval                  # training curves (every loss term, validation Dice)
# with --tracking mlflow:  mlflow ui --backend-store-uri sqlite:///BUNDLE/eval/mlruns.db

# evaluate: per-case and per-label Dice and HD95 in BUNDLE/eval
python -m monai.bundle run evaluating --config_file "['BUNDLE/configs/train.json','BUNDLE/configs/evaluate.json']" \\
    --bundle_root BUNDLE --dataset_dir DATASET_DIR

# segment a folder of NIfTI / NRRD / MHA volumes
python -m monai.bundle run inference --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
    --dataset_dir IMAGES --output_dir OUT
# or folders of DICOM studies, with DICOM SEG, statistics and previews
python -m ic_moe_monai segment STUDIES OUT --bundle BUNDLE --formats nifti,dicom_seg --statistics --preview

# a copy that runs with MONAI and its listed requirements only (model zoo layout)
python -m ic_moe_monai export_bundle BUNDLE EXPORTED
```

{TORCHSCRIPT_NOTE}

## References

- Zhang, Chen, Yuan, Tian, Feng. Intelligent Communication Mixture-of-Experts Boosted-Medical Image Segmentation
  Foundation Model. arXiv:2510.17684, 2025.
- Kirillov et al. Segment Anything. ICCV 2023.{chr(10) + "- " + reference if reference else ""}

# License

Code: Apache-2.0 (`LICENSE`). Data: see `docs/data_license.txt`.
"""
