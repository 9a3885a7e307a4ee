"""End-to-end speed and memory of ``segment`` against the pure network time for the same slices, in the same run.

    python benchmarks/segment_speed.py --input <folder of volumes> [--limit 20] [--bundle bundle] [--large_ct]
        [--repeats 2] [--out benchmarks/results/segment_speed.json]

Folder scenario: ``segment`` on the first ``limit`` volumes of ``--input`` (wall time of the whole call, model loading,
discovery, reading, preprocessing, inference, inversion and writing included) divided by the time the network alone
takes on the very same slice batches (the inferer's 2.5D stacks, resized to the network's size beforehand, so only
``network(x)`` is timed). Each measurement runs ``repeats`` times in a fresh process and the fastest is kept.
``--large_ct`` adds one synthetic 512 × 512 × 400 CT volume (int16) to measure peak memory beyond the volume.
Peak RSS is the process's VmHWM, reset through /proc/self/clear_refs after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from common import machine_info

REPO = Path(__file__).resolve().parents[1]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child_segment(input_dir: str, bundle: str, workers: int) -> dict:
    """One ``segment`` run in this (fresh) process: wall time, peak RSS over the RSS before it."""
    from ic_moe_monai.segment import segment

    with tempfile.TemporaryDirectory() as out:
        _reset_peak()
        before = _rss_mib("VmRSS")
        start = time.perf_counter()
        report = segment(input_dir, out, bundle=bundle, quiet=True, num_workers=workers)
        wall = time.perf_counter() - start
    assert report.exit_code == 0, [c.error for c in report.cases]
    return {"wall_s": wall, "rss_before_mib": before, "peak_rss_mib": _rss_mib("VmHWM"),
            "cases": len(report.cases), "slices": sum(c.slices for c in report.cases),
            "inference_s": sum(c.seconds.get("inference", 0) for c in report.cases)}  # fmt: skip


def child_network(input_dir: str, bundle: str) -> dict:
    """The network alone on the slice batches ``segment`` would run for every case (inputs made beforehand)."""
    import torch
    import torch.nn.functional as F

    from ic_moe_monai.inferers import neighbor_stack
    from ic_moe_monai.io import discover_cases
    from ic_moe_monai.segment import BundleSegmenter, load_case

    segmenter = BundleSegmenter(bundle, [], torch.device("cpu"), batch_size=32)
    inferer, network = segmenter.inferer, segmenter.network
    cases, _ = discover_cases(input_dir)
    seconds, slices = 0.0, 0
    for case in cases:
        volume = segmenter.preprocess(load_case(case))["image"][0]  # (X, Y, Z), slices last
        depth = volume.shape[-1]
        for start in range(0, depth, inferer.batch_size):
            indices = torch.arange(start, min(start + inferer.batch_size, depth))
            batch = neighbor_stack(volume.as_tensor(), indices, inferer.context).float()
            if tuple(batch.shape[-2:]) != (inferer.img_size, inferer.img_size):
                batch = F.interpolate(batch, size=(inferer.img_size,) * 2, mode="bilinear", align_corners=False)
            with torch.inference_mode():
                begin = time.perf_counter()
                network(batch)
                seconds += time.perf_counter() - begin
            slices += len(indices)
    return {"network_s": seconds, "slices": slices}


def _child(function: str, *args: object) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import segment_speed as s; "
            f"print('RESULT' + json.dumps(s.{function}(*{args!r})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])


def _best(function: str, repeats: int, key: str, *args: object) -> dict:
    runs = [_child(function, *args) for _ in range(repeats)]
    return min(runs, key=lambda r: r[key])


def _scenario(input_dir: str, bundle: str, repeats: int, workers: int) -> dict:
    e2e = _best("child_segment", repeats, "wall_s", input_dir, bundle, workers)
    net = _best("child_network", repeats, "network_s", input_dir, bundle)
    assert net["slices"] == e2e["slices"], (net, e2e)
    return {
        "cases": e2e["cases"],
        "slices": e2e["slices"],
        "segment_wall_s": round(e2e["wall_s"], 2),
        "network_only_s": round(net["network_s"], 2),
        "ratio_segment_to_network": round(e2e["wall_s"] / net["network_s"], 3),
        "cases_per_min": round(e2e["cases"] / e2e["wall_s"] * 60, 1),
        "peak_rss_mib": round(e2e["peak_rss_mib"]),
        "peak_rss_over_start_mib": round(e2e["peak_rss_mib"] - e2e["rss_before_mib"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of volumes (e.g. MSD Task04 imagesTr)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--bundle", default=str(REPO / "bundle"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--large_ct", action="store_true", help="also a synthetic 512 x 512 x 400 CT volume")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "segment_speed.json"))
    args = parser.parse_args()

    import nibabel as nib
    import numpy as np

    from ic_moe_monai.data import IMAGE_SUFFIXES

    results: dict[str, object] = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
                                  "settings": {"limit": args.limit, "repeats": args.repeats,
                                               "num_workers": args.num_workers}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        images = sorted(p for p in Path(args.input).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
        for path in images[: args.limit]:
            os.symlink(path.resolve(), folder / path.name)
        results["folder"] = _scenario(str(folder), args.bundle, args.repeats, args.num_workers) | {
            "input": Path(args.input).name
        }
        print("folder", json.dumps(results["folder"]), flush=True)
        if args.large_ct:
            ct = Path(tmp) / "ct"
            ct.mkdir()
            rng = np.random.default_rng(0)
            volume = (rng.standard_normal((512, 512, 400), dtype=np.float32) * 300).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.0, 1.0])), ct / "ct_512x512x400.nii")
            del volume
            large = _scenario(str(ct), args.bundle, 1, args.num_workers)
            large["volume_float32_mib"] = round(512 * 512 * 400 * 4 / 2**20)
            large["peak_beyond_volume_mib"] = large["peak_rss_over_start_mib"] - large["volume_float32_mib"]
            results["large_ct"] = large
            print("large_ct", json.dumps(large), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
