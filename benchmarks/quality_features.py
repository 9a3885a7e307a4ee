"""Which cheap signals of a finished labelmap would improve the quality score's ranking? Leave-one-out on the
validation fold, against the true Dice.

    python -m ic_moe_monai segment VAL_IMAGES OUT --bundle bundle      # VAL_IMAGES: the fold's validation images
    python benchmarks/quality_features.py --dataset_dir DIR --segmented OUT [--fold 0]

For each case: the shipped score (``report.json``), the number of connected components per label, the share of
the largest one, the slice-to-slice agreement of each label's mask (Dice of neighbouring slices, mean over the
three axes) and the log of the predicted volume. Each set of features is fitted by least squares (ridge 1e-3) on
all cases but one and scored on that one; printed: Spearman and mean absolute error of those estimates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from ic_moe_monai.data.datasets import datalist

FEATURE_SETS = (["score"], ["score", "components"], ["score", "largest"], ["score", "slice_agreement"],
                ["score", "log_volume"], ["score", "slice_agreement", "largest"])  # fmt: skip


def case_features(pred: np.ndarray, label: np.ndarray, classes: int) -> dict[str, float]:
    dice, components, largest, agreement, volume = [], [], [], [], 0
    for k in range(1, classes + 1):
        p, g = pred == k, label == k
        dice.append(2 * (p & g).sum() / max(p.sum() + g.sum(), 1))
        parts, n = ndimage.label(p, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(parts.ravel())[1:] if n else np.zeros(1)
        components.append(n)
        largest.append(sizes.max() / max(sizes.sum(), 1))
        per_axis = []
        for axis in range(3):
            a = np.moveaxis(p, axis, 0)
            per_axis.append(2 * (a[1:] & a[:-1]).sum() / max(a[1:].sum() + a[:-1].sum(), 1))
        agreement.append(np.mean(per_axis))
        volume += int(p.sum())
    return {"dice": float(np.mean(dice)), "components": float(np.mean(components)), "largest": float(np.mean(largest)),
            "slice_agreement": float(np.mean(agreement)), "log_volume": float(np.log(volume + 1))}  # fmt: skip


def leave_one_out(rows: list[dict], features: list[str]) -> tuple[float, float]:
    y = np.array([r["dice"] for r in rows])
    x = np.column_stack([np.ones(len(rows))] + [np.array([r[f] for r in rows]) for f in features])
    estimates = []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        w = np.linalg.solve(x[keep].T @ x[keep] + 1e-3 * np.eye(x.shape[1]), x[keep].T @ y[keep])
        estimates.append(float(x[i] @ w))
    return float(stats.spearmanr(estimates, y)[0]), float(np.abs(np.array(estimates) - y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--segmented", required=True, help="the output folder of `segment` on the validation images")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--classes", type=int, default=2)
    args = parser.parse_args()
    report = json.loads((Path(args.segmented) / "report.json").read_text())
    by_name = {c["name"]: c for c in report["cases"]}
    rows = []
    for case in datalist(args.dataset_dir, "validation", args.fold):
        name = Path(case["image"]).name.removesuffix(".nii.gz")
        result = by_name[name]
        pred = np.asarray(nib.load(result["outputs"]["nifti"]).dataobj).astype(np.uint8)
        label = np.asarray(nib.load(case["label"]).dataobj).astype(np.uint8)
        rows.append({**case_features(pred, label, args.classes), "score": result["quality"]["score"]})
    print(f"{len(rows)} cases, mean Dice {np.mean([r['dice'] for r in rows]):.4f}")
    for features in FEATURE_SETS:
        constant = [f for f in features if len({r[f] for r in rows}) == 1]
        if constant:
            print(f"{'+'.join(features)}: {', '.join(constant)} constant over the cases (keep_largest_component?)")
            continue
        rho, mae = leave_one_out(rows, features)
        print(f"{'+'.join(features)}: leave-one-out Spearman {rho:.3f}, MAE {mae:.4f}")


if __name__ == "__main__":
    main()
