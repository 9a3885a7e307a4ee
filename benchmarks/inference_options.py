"""Which inference-time options pay on fold-0 validation: mirror test-time augmentation, keeping the largest
connected component per label, and an ensemble of checkpoints, each on and off, measured through the bundle's own
``run evaluating`` workflow (``train.json`` + ``evaluate.json``) in one process.

    python benchmarks/inference_options.py --dataset_dir <MSD Task04 Hippocampus> [--ckpt bundle/models/model.pt]
        [--ensemble fold1.pt,fold2.pt,...] [--variants none,tta,lcc,tta+lcc] [--out FILE]

For each variant: mean Dice per label and overall, HD95 (mm), and seconds per case of the evaluator (network,
options and metrics; the cases are read before timing, and a 2-case warm-up run comes first). Writes JSON with the
machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
OFF = {"tta_mirror": False, "keep_largest_component": False}  # every variant says both: the configs' defaults vary
VARIANTS = {
    "none": {**OFF},
    "tta": {**OFF, "tta_mirror": True},
    "lcc": {**OFF, "keep_largest_component": True},
    "tta+lcc": {**OFF, "tta_mirror": True, "keep_largest_component": True},
    "ensemble": {**OFF, "ensemble": True},
    "ensemble+tta+lcc": {**OFF, "ensemble": True, "tta_mirror": True, "keep_largest_component": True},
}


def evaluate(args: argparse.Namespace, options: dict, output_dir: Path) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), *args.config])
    parser["bundle_root"] = str(REPO / "bundle")
    parser["dataset_dir"] = args.dataset_dir
    parser["ckpt_path"] = args.ckpt
    parser["output_dir"] = str(output_dir)
    parser["device"] = f"$torch.device('{args.device}')"
    parser["num_workers"] = 0
    if args.max_cases:
        parser["max_eval_cases"] = args.max_cases
    for key, value in options.items():
        if key == "ensemble":
            parser["ensemble_ckpts"] = args.ensemble
        else:
            parser[key] = value
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    cases = len(evaluator.data_loader)
    start = time.perf_counter()
    evaluator.run()
    seconds = time.perf_counter() - start
    summary = json.loads((output_dir / "metrics_summary.json").read_text())
    return {"cases": cases, "seconds_per_case": round(seconds / cases, 3), "summary": summary["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--ckpt", default=str(REPO / "bundle" / "models" / "model.pt"))
    ap.add_argument("--config", default="", help="extra config files (comma-separated), e.g. a profile")
    ap.add_argument("--ensemble", default="", help="further checkpoints (comma-separated) for the ensemble variants")
    ap.add_argument("--variants", default="none,tta,lcc,tta+lcc")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max_cases", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference_options.json"))
    args = ap.parse_args()
    args.config = [c for c in args.config.split(",") if c]
    args.ensemble = [c for c in args.ensemble.split(",") if c]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: the first evaluator in a process pays one-time costs
        evaluate(argparse.Namespace(**{**vars(args), "max_cases": 2}), OFF, Path(tmp))
    for name in args.variants.split(","):
        if "ensemble" in name and not args.ensemble:
            raise SystemExit(f"variant {name} needs --ensemble checkpoints")
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = evaluate(args, VARIANTS[name], Path(tmp))
        s = results[name]["summary"]
        print(f"{name:18s} mean Dice {s['mean_dice']['mean']:.4f}  " + "  ".join(
            f"{k} {v['mean']:.4f}" for k, v in s.items() if k.endswith("_dice")
        ) + f"  {results[name]['seconds_per_case']:.2f} s/case", flush=True)  # fmt: skip
    out = {
        "benchmark": "inference-time options on the validation fold, through the bundle's run evaluating",
        "dataset_dir": Path(args.dataset_dir).name,
        "checkpoint": Path(args.ckpt).name,
        "ensemble": [Path(p).name for p in args.ensemble],
        "config": [Path(c).name for c in args.config],
        "device": args.device,
        "results": results,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
