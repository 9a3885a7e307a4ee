"""Train profiles of the bundle with its own training command under one wall-clock budget, evaluate each on the
validation fold with the bundle's evaluation command, and report them side by side.

    python benchmarks/train_compare.py --dataset_dir DIR [--minutes 60] [--profiles lite baseline_unet]
        [--epochs lite=30 baseline_unet=120] [--set click_prob=0] [--name NAME] [--work runs/compare] [--ship]

Every number comes from the commands' own outputs: training time is the wall time of ``run training``,
accuracy is ``metrics_summary.json`` of ``run evaluating`` (MONAI convention, HD95 in mm). ``--ship`` copies the
run's best checkpoint (one profile only) to ``bundle/models/model.pt``. ``--set key=value`` passes overrides to the
training and evaluation commands (e.g. ``click_prob=0`` trains without click prompts, ``network_def#moe_blocks=[]``
builds the network without experts); ``--name`` files a single profile's result under
another name. Results go to ``benchmarks/results/train_compare.json``;
profiles run at another time are merged into it, each with the date and machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def bundle_run(args: list[str], log: Path) -> float:
    """Run ``python -m monai.bundle run ...`` with output to ``log``; return its wall time in seconds."""
    start = time.monotonic()
    with log.open("w") as f:
        subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", *args],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return time.monotonic() - start


def config_list(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def trained_epochs(log: str) -> int:
    """Epochs the trainer completed, from the run's log (the evaluator's epochs are validations, not counted)."""
    finished = re.findall(r"training finished after epoch (\d+)", log)
    if finished:
        return int(finished[-1])
    return len(re.findall(r"Trainer - INFO - Epoch\[\d+\] Complete", log))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--profiles", nargs="+", default=["lite", "baseline_unet"])
    parser.add_argument("--epochs", nargs="*", default=["lite=30", "baseline_unet=120"], help="profile=max_epochs")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--work", default="runs/compare")
    parser.add_argument("--out", default="benchmarks/results/train_compare.json")
    parser.add_argument("--ship", action="store_true", help="copy the trained model to bundle/models/model.pt")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of the training config")
    parser.add_argument("--name", default=None, help="the result's name (one profile only; default the profile)")
    args = parser.parse_args()
    epochs = dict(item.split("=") for item in args.epochs)
    overrides = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    if (args.name or args.ship) and len(args.profiles) != 1:
        parser.error("--name and --ship need exactly one profile")

    results = {}
    for profile in args.profiles:
        name = args.name or profile
        run = Path(args.work).resolve() / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        common = ["--dataset_dir", args.dataset_dir, "--fold", str(args.fold), "--ckpt_dir", str(run / "models")]
        train_s = bundle_run(
            ["training", "--config_file", config_list("train.json", f"{profile}.json"), *common,
             "--output_dir", str(run / "tb"), "--max_train_minutes", str(args.minutes),
             "--max_epochs", epochs.get(profile, "40"), "--resume", "false", *overrides],
            run / "train.log",
        )  # fmt: skip
        eval_s = bundle_run(
            ["evaluating", "--config_file", config_list("train.json", f"{profile}.json", "evaluate.json"), *common,
             "--ckpt_path", str(run / "models" / "model.pt"), "--output_dir", str(run / "eval"),
             "--quality_calibration", str(run / "models" / "quality.json"), *overrides],
            run / "eval.log",
        )  # fmt: skip
        summary = json.loads((run / "eval" / "metrics_summary.json").read_text())
        epochs_done = trained_epochs((run / "train.log").read_text())
        results[name] = {
            "profile": profile,
            "overrides": args.set,
            "train_wall_min": round(train_s / 60, 1),
            "epochs_completed": epochs_done,
            "eval_wall_s": round(eval_s, 1),
            "validation_cases": summary["cases"],
            "dice": {
                k.removesuffix("_dice"): round(v["mean"], 4)
                for k, v in summary["summary"].items()
                if k.endswith("_dice") and k != "mean_dice"
            },
            "hd95_mm": {
                k.removesuffix("_hd95"): round(v["mean"], 2)
                for k, v in summary["summary"].items()
                if k.endswith("_hd95")
            },
            "mean_dice": round(summary["summary"]["mean_dice"]["mean"], 4),
            "model_mb": round((run / "models" / "model.pt").stat().st_size / 2**20, 1),
            "budget_minutes": args.minutes,
            "fold": args.fold,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine_info(),
        }
        print(name, json.dumps(results[name]), flush=True)
        if args.ship:
            shutil.copy(run / "models" / "model.pt", REPO / "bundle" / "models" / "model.pt")

    out = Path(args.out)
    previous = json.loads(out.read_text())["results"] if out.is_file() else {}
    results = previous | results
    report = {
        "benchmark": "bundle training under one wall-clock budget, evaluated on the validation fold",
        "dataset_dir": Path(args.dataset_dir).name,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| profile | mean Dice | "
        + " | ".join(f"{c} Dice" for c in next(iter(results.values()))["dice"])
        + " | train min | epochs |"
    )
    for profile, r in results.items():
        print(f"| {profile} | {r['mean_dice']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["dice"].values())
              + f" | {r['train_wall_min']} | {r['epochs_completed']} |")  # fmt: skip


if __name__ == "__main__":
    main()
