"""Calibrate the bundle's quality score on the validation fold and show how it does, on real cases and on inputs it
must flag.

    python benchmarks/quality_check.py --dataset_dir DIR [--bundle bundle] [--fold 0] [--ct CT.nii.gz]
        [--other_mr MR.nii.gz] [--other_series DICOM_FOLDER] [--work runs/quality]
        [--out benchmarks/results/quality.json]

1. ``run evaluating`` on the fold's validation cases (the bundle's own command): it writes the calibration into the
   bundle (``models/quality.json``) and the leave-one-out scores against true Dice (``quality_summary.json``:
   Spearman, mean absolute error, share of the worst 10 % caught, share flagged).
2. Inputs the score must flag, made from the first validation images (pure noise, heavy noise, heavy blur, the
   axes in the wrong order, front and back swapped) and, where given, a CT, an MR of another body region and
   another DICOM series, all run through ``python -m ic_moe_monai segment``; their scores, flags and reasons come
   from its ``report.json``.
3. The cost: ``segment``'s inference seconds per case with and without the quality signals, on the same 10 cases
   (the median of three alternating runs of each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info

CONFIGS = REPO / "bundle" / "configs"


def run(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def validation_images(dataset_dir: Path, fold: int) -> list[Path]:
    sys.path.insert(0, str(REPO))
    from ic_moe_monai.data.datasets import datalist

    return [Path(d["image"]) for d in datalist(str(dataset_dir), "validation", fold, 5, 0, None)]


def corrupted_cases(images: list[Path], folder: Path, rng: np.random.Generator) -> None:
    """Inputs the hippocampus model must flag, each made from a real validation image."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(images):
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        spread = float(data.std())
        variants = {
            "pure_noise": rng.uniform(data.min(), data.max(), data.shape),
            "heavy_noise": data + rng.normal(0, 0.6 * spread, data.shape),
            "heavy_blur": ndimage.gaussian_filter(data, sigma=3.0),
            "wrong_axes": np.ascontiguousarray(data.transpose(1, 0, 2)),  # the header still says the old order
            "flipped_ap": np.ascontiguousarray(data[:, ::-1]),  # front and back swapped, the header unchanged
        }
        for name, array in variants.items():
            nib.save(nib.Nifti1Image(array.astype(np.float32), img.affine), folder / f"{name}_{i}.nii.gz")


def segment(input: Path, output: Path, bundle: Path, log: Path, extra: list[str] = ()) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "ic_moe_monai", "segment", str(input), str(output), "--bundle", str(bundle), *extra]
    with log.open("w") as f:
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    return json.loads((output / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True, type=Path)
    parser.add_argument("--bundle", default=REPO / "bundle", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--ct", type=Path, help="a CT volume (not what an MR model was trained on)")
    parser.add_argument("--other_mr", type=Path, help="an MR volume of another body region")
    parser.add_argument("--other_series", type=Path, help="a DICOM study or series folder of another region")
    parser.add_argument(
        "--in_distribution",
        nargs="*",
        default=[],
        help="case names of --other_series that are of the model's kind (not to be flagged)",
    )
    parser.add_argument("--cases", type=int, default=3, help="validation images each corruption is made from")
    parser.add_argument("--work", default=REPO / "runs" / "quality", type=Path)
    parser.add_argument("--out", default=REPO / "benchmarks" / "results" / "quality.json", type=Path)
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = args.bundle.resolve()

    configs = "[" + ",".join(f"'{bundle / 'configs' / n}'" for n in ("train.json", "evaluate.json")) + "]"
    start = time.monotonic()
    run([sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", configs,
         "--bundle_root", str(bundle), "--dataset_dir", str(args.dataset_dir), "--fold", str(args.fold),
         "--output_dir", str(work / "eval")], work / "eval.log")  # fmt: skip
    eval_s = time.monotonic() - start
    summary = json.loads((work / "eval" / "quality_summary.json").read_text())
    metrics = json.loads((work / "eval" / "metrics_summary.json").read_text())

    images = validation_images(args.dataset_dir, args.fold)
    ood = work / "ood"
    corrupted_cases(images[: args.cases], ood, np.random.default_rng(0))
    for path in (args.ct, args.other_mr):
        if path is not None:
            shutil.copy(path, ood / f"{'ct' if path is args.ct else 'other_mr'}_{path.name}")
    if args.other_series is not None:
        shutil.copytree(args.other_series, ood / "other_series")
    report = segment(ood, work / "ood_out", bundle, work / "ood.log")
    flagged_inputs = {
        c["name"]: {k: c["quality"][k] for k in ("score", "flagged", "reasons")} if c["quality"] else None
        for c in report["cases"]
        if c["status"] == "done"
    }
    failed_inputs = {c["name"]: c["error"] for c in report["cases"] if c["status"] == "failed"}

    real = work / "real"
    real.mkdir()
    for path in images[:10]:
        shutil.copy(path, real / path.name)
    (work / "no_quality.json").write_text(json.dumps({"quality_calibration": None}))
    runs: dict[str, list[float]] = {"with_quality": [], "without_quality": []}
    for _ in range(3):  # alternating runs: the machine's drift falls on both alike
        for label, extra in (("with_quality", []), ("without_quality", ["--config", str(work / "no_quality.json")])):
            r = segment(real, work / f"real_{label}", bundle, work / f"real_{label}.log", extra)
            runs[label].append(
                sum(c["seconds"]["inference"] for c in r["cases"] if c["status"] == "done") / len(r["cases"])
            )
    timings = {label: float(np.median(values)) for label, values in runs.items()}

    result = {
        "benchmark": "quality score: calibration on the validation fold (leave-one-out), inputs it must flag, cost",
        "command": " ".join(Path(a).name if "/" in a else a for a in sys.argv),  # file names, no local paths
        "dataset_dir": args.dataset_dir.name,
        "fold": args.fold,
        "validation": summary,
        "validation_mean_dice": metrics["summary"]["mean_dice"]["mean"],
        "evaluating_wall_s": round(eval_s, 1),
        "must_flag": flagged_inputs,
        "must_flag_all_flagged": all(
            v is not None and v["flagged"] for k, v in flagged_inputs.items() if k not in args.in_distribution
        ),
        "in_distribution_flagged": {k: flagged_inputs.get(k, {}).get("flagged") for k in args.in_distribution},
        "must_flag_failed_to_load": failed_inputs,
        "inference_s_per_case": {k: round(v, 3) for k, v in timings.items()},
        "quality_overhead": round(timings["with_quality"] / timings["without_quality"] - 1, 4),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("validation", "must_flag_all_flagged", "quality_overhead")}, indent=2))
    for name, q in flagged_inputs.items():
        print(f"{name}: {q}")


if __name__ == "__main__":
    main()
