"""Per-case, per-class Dice and HD95, and the CSV / JSON reports of an evaluation run.

Two conventions:

- ``"monai"`` (default): HD95 in millimetres from the voxel spacing, as ``monai.metrics.HausdorffDistanceMetric``
  computes it (the larger of the two directed 95th percentiles). A class absent from the ground truth has
  undefined Dice and HD95 (NaN, left out of means); a class present in the ground truth but not predicted has
  Dice 0 and HD95 NaN (counted in ``missed``).
- ``"samed"``: the rules of TransUNet / SAMed's ``calculate_metric_percase``, so numbers compare with those papers:
  HD95 in voxels, the 95th percentile of both directions' surface distances pooled (medpy's ``hd95``);
  prediction and ground truth non-empty → (Dice, HD95); prediction non-empty, ground truth empty → (1, 0);
  prediction empty → (0, 0).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

__all__ = ["CONVENTIONS", "case_metrics", "json_safe", "summarize", "write_reports"]

CONVENTIONS = ("monai", "samed")


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(2.0 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum()))


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    _, distances, _ = get_edge_surface_distance(
        torch.as_tensor(pred), torch.as_tensor(gt), spacing=spacing, symmetric=True, warn_empty=False
    )
    return distances[0].cpu().numpy(), distances[1].cpu().numpy()


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    class_ids: Sequence[int],
    spacing: Sequence[float] | None = None,
    convention: str = "monai",
) -> dict[int, dict[str, float]]:
    """Dice and HD95 of each class in ``class_ids`` for label maps ``pred`` and ``gt`` of equal shape.

    Args:
        spacing: voxel size in mm (``monai`` convention); ignored by ``samed`` (voxels).

    Returns:
        ``{class_id: {"dice": ..., "hd95": ...}}`` with NaN where the convention leaves a value undefined.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape.")
    out = {}
    for c in class_ids:
        p, g = pred == c, gt == c
        if convention == "samed":
            if p.any() and g.any():
                d_pg, d_gp = _surface_distances(p, g, None)
                out[c] = {"dice": _dice(p, g), "hd95": float(np.percentile(np.concatenate([d_pg, d_gp]), 95))}
            elif p.any():
                out[c] = {"dice": 1.0, "hd95": 0.0}
            else:
                out[c] = {"dice": 0.0, "hd95": 0.0}
        elif not g.any():
            out[c] = {"dice": math.nan, "hd95": math.nan}
        elif not p.any():
            out[c] = {"dice": 0.0, "hd95": math.nan}
        else:
            d_pg, d_gp = _surface_distances(p, g, spacing)
            out[c] = {"dice": _dice(p, g), "hd95": float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))}
    return out


def summarize(rows: Sequence[Mapping[str, object]], class_names: Mapping[int, str]) -> dict[str, dict[str, float]]:
    """Mean, std, median and counts per class and metric over per-case rows (NaN values left out)."""
    summary: dict[str, dict[str, float]] = {}
    for _c, name in class_names.items():
        for metric in ("dice", "hd95"):
            values = np.array([float(r[f"{name}_{metric}"]) for r in rows], dtype=float)
            valid = values[~np.isnan(values)]
            summary[f"{name}_{metric}"] = {
                "mean": float(valid.mean()) if valid.size else math.nan,
                "std": float(valid.std()) if valid.size else math.nan,
                "median": float(np.median(valid)) if valid.size else math.nan,
                "cases": int(valid.size),
                "undefined": int(values.size - valid.size),
            }
    dice_means = [summary[f"{name}_dice"]["mean"] for name in class_names.values()]
    summary["mean_dice"] = {"mean": float(np.nanmean(dice_means)) if not all(map(math.isnan, dice_means)) else math.nan}
    return summary


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by None, so that ``json.dumps`` writes valid JSON
    (``null``; the standard has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_reports(
    rows: Sequence[Mapping[str, object]], class_names: Mapping[int, str], output_dir: str | Path, convention: str
) -> dict[str, dict[str, float]]:
    """Write ``metrics_per_case.csv``, ``metrics_summary.csv`` and ``metrics_summary.json``; return the summary.

    Undefined values are ``nan`` in the CSV files and ``null`` in the JSON file (JSON has no NaN).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = ["case"] + [f"{name}_{m}" for name in class_names.values() for m in ("dice", "hd95")]
    with (output_dir / "metrics_per_case.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)
    summary = summarize(rows, class_names)
    with (output_dir / "metrics_summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "mean", "std", "median", "cases", "undefined"])
        for name, stats in summary.items():
            writer.writerow([name, *(stats.get(k, "") for k in ("mean", "std", "median", "cases", "undefined"))])
    hd_unit = "voxels" if convention == "samed" else "mm"
    payload = {"convention": convention, "hd95_unit": hd_unit, "cases": len(rows), "summary": summary}
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False)
    (output_dir / "metrics_summary.json").write_text(text + "\n")
    return summary
