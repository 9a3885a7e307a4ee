"""How much clicks improve the automatic segmentation: a simulated annotator on the validation fold.

    python benchmarks/click_refinement.py --dataset_dir DIR [--fold 0] [--clicks 5] [--max_cases N]
        [--weights shipped=bundle/models/model.pt other=path/to/model.pt] [--out results.json]

For each validation case and each label, the interactive engine (the one the MONAI Label app serves) first answers
without clicks; then the simulated annotator clicks, one at a time, on the voxel deepest inside the larger error of
that label (a foreground click where the label is missed, a background click where it is over-segmented; depth by
the Euclidean distance transform), sending every click so far, as a MONAI Label client does. Dice of the label
against the ground truth, in the image's own geometry, is recorded after 0, 1, ..., ``--clicks`` clicks. This is
the usual click-simulation protocol of interactive segmentation (e.g. DeepEdit, SAM's evaluation); it is
deterministic. Several checkpoints can be compared in one run (``--weights name=path``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info

REPO = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def next_click(labels: np.ndarray, truth: np.ndarray) -> tuple[list[int], bool] | None:
    """The voxel deepest inside the larger error of one label, and whether it is a foreground click."""
    missed, extra = truth & ~labels, labels & ~truth
    if not missed.any() and not extra.any():
        return None
    region, foreground = (missed, True) if missed.sum() >= extra.sum() else (extra, False)
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    return [int(v) for v in np.unravel_index(int(depth.argmax()), region.shape)], foreground


def annotate(engine, image: Path, truth: np.ndarray, value: int, clicks: int) -> list[float]:
    """Dice of label ``value`` after 0..clicks simulated clicks."""
    labels = np.asarray(engine(image)[0][0])
    if labels.shape != truth.shape:
        raise ValueError(f"{image.name}: the engine answered shape {labels.shape}, the label is {truth.shape}.")
    fg: list[list[int]] = []
    bg: list[list[int]] = []
    curve = [dice(labels == value, truth == value)]
    for _ in range(clicks):
        click = next_click(labels == value, truth == value)
        if click is None:
            curve.append(curve[-1])
            continue
        (fg if click[1] else bg).append(click[0])
        labels = np.asarray(engine(image, foreground=fg, background=bg, label=value)[0][0])
        curve.append(dice(labels == value, truth == value))
    return curve


def evaluate(weights: Path, cases: list[dict[str, str]], clicks: int) -> dict:
    from ic_moe_monai.label import InteractiveSegmenter

    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "weights.json"
        override.write_text(json.dumps({"ckpt_path": str(weights.resolve())}))
        engine = InteractiveSegmenter(REPO / "bundle", configs=[str(override)], max_images=2)
        values = {name: v for v, name in engine.label_names.items() if v != 0}
        curves: dict[str, list[list[float]]] = {name: [] for name in values}
        start = time.perf_counter()
        for case in cases:
            truth = np.rint(np.asarray(nib.load(case["label"]).dataobj)).astype(np.int64)
            for name, value in values.items():
                curves[name].append(annotate(engine, Path(case["image"]), truth, value, clicks))
        seconds = time.perf_counter() - start
    per_label = {name: [round(statistics.mean(c[k] for c in cs), 4) for k in range(clicks + 1)]
                 for name, cs in curves.items()}  # fmt: skip
    mean = [round(statistics.mean(per_label[n][k] for n in per_label), 4) for k in range(clicks + 1)]
    return {
        "weights": weights.name,
        "weights_md5": hashlib.md5(weights.read_bytes()).hexdigest(),
        "cases": len(cases),
        "mean_dice_after_clicks": mean,
        "dice_after_clicks": per_label,
        "wall_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True, help="an MSD-style task folder (the bundle's training data)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--max_cases", type=int, default=None)
    parser.add_argument("--weights", nargs="+", default=["shipped=bundle/models/model.pt"], help="name=checkpoint")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "click_refinement.json"))
    args = parser.parse_args()

    from ic_moe_monai.data.datasets import datalist

    cases = datalist(args.dataset_dir, "validation", args.fold, 5, 0, args.max_cases)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report["benchmark"] = "simulated annotator on the validation fold: Dice per label after 0..N clicks"
    report["dataset_dir"], report["fold"] = Path(args.dataset_dir).name, args.fold
    results = report.setdefault("results", {})
    for item in args.weights:
        name, path = item.split("=", 1)
        results[name] = evaluate(Path(path), cases, args.clicks) | {"date": time.strftime("%Y-%m-%d"),
                                                                    "machine": machine_info()}  # fmt: skip
        print(name, json.dumps(results[name]["mean_dice_after_clicks"]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
