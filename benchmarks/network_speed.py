"""Forward cost of IC-MoE against its bare SAM image encoder, measured side by side in one run.

    python benchmarks/network_speed.py [--encoder vit_b] [--img-size 256] [--repeats 30] [--out FILE]

Reports the median eval-mode forward time of the whole ICMoE (experts + prompt-free decoder + upsampling) and of
``model.image_encoder`` alone on the same input, interleaved so that drift hits both; their ratio; trainable and
total parameters; and the peak resident memory of a fresh process that builds each and runs one forward.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ic_moe_monai.networks import ICMoE, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(which: str, encoder: str, img_size: int) -> None:
    """Child process: build, drop construction garbage, reset the peak-RSS counter, run one forward, and print
    the resident memory before it and the peak during it (MiB). Linux only (/proc)."""
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder).eval()
    net = model.image_encoder if which == "encoder" else model
    x = torch.rand(1, 3, img_size, img_size)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident set size
    before = _status_mib("VmRSS")
    with torch.inference_mode():
        net(model.preprocess(x) if which == "encoder" else x)
    print(json.dumps({"built_mib": before, "peak_mib": _status_mib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_b")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/network_speed.json")
    parser.add_argument("--memory-probe", choices=["encoder", "icmoe"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.encoder, args.img_size)
        return

    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=args.img_size, encoder=args.encoder).eval()
    # give the experts trained-like weights: zero up-projections would let nothing be skipped, but also hide nothing
    for p in model.moe_layers.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.rand(1, 3, args.img_size, args.img_size)
    x_enc = model.preprocess(x)
    runs = {"icmoe": lambda: model(x), "image_encoder": lambda: model.image_encoder(x_enc)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            for _ in range(3):
                fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    trainable, total = count_parameters(model)

    memory = {}
    for which in ("encoder", "icmoe"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-probe",
                which,
                "--encoder",
                args.encoder,
                "--img-size",
                str(args.img_size),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        memory[which] = json.loads(out.stdout.strip().splitlines()[-1])

    result = {
        "benchmark": "ICMoE eval forward vs bare image_encoder, batch 1",
        "encoder": args.encoder,
        "img_size": args.img_size,
        "repeats": args.repeats,
        "median_s": {k: round(v, 5) for k, v in median.items()},
        "ratio_icmoe_over_encoder": round(median["icmoe"] / median["image_encoder"], 4),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": round(trainable / total, 4),
        "peak_rss_mib": {k: round(v["peak_mib"], 1) for k, v in memory.items()},
        "forward_rss_increase_mib": {k: round(v["peak_mib"] - v["built_mib"], 1) for k, v in memory.items()},
        "machine": machine_info(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
