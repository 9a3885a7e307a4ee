"""End-to-end speed and memory of ``segment`` and ``run inference`` against the network time for the same slices,
measured in the same run.

    python benchmarks/segment_speed.py --input <folder of volumes> [--limit 20] [--repeats 2] [--large_ct_rss]
    python benchmarks/segment_speed.py --large_ct [--profile sam_vit_b.json] [--slices 300] [--size 512]
        [--small_slices 100] [--device auto] [--out benchmarks/results/segment_speed.json]

Folder scenario (``--input``, CPU): ``segment`` on the first ``limit`` volumes of ``--input`` (wall time of the
whole call, model loading, discovery, reading, preprocessing, inference, inversion and writing included) divided by
the time the network alone takes on the very same slice batches (the inferer's 2.5D stacks, resized to the
network's size beforehand, so only ``network(x)`` is timed). Each measurement runs ``repeats`` times in a fresh
process and the fastest is kept. ``--large_ct_rss`` adds one synthetic 512 × 512 × 400 CT volume (int16) to measure
peak RSS beyond the volume (VmHWM, reset through /proc/self/clear_refs after imports).

Large CT scenario (``--large_ct``, GPU if there is one, else CPU): one synthetic ``size`` × ``size`` × ``slices``
int16 CT, written both as ``.nii`` (uncompressed) and as ``.nii.gz`` (gzip), segmented by a temporary copy of the
bundle whose ``models/model.pt`` holds random weights of ``--profile``'s network (no SAM checkpoint is read).
In one process:

(a) network only: the preprocessed volume already on the device, through the bundle's ``SliceContextInferer``
    (argmax, its batch size for the device); the fastest of ``repeats`` after a warm-up;
(b) ``run inference``'s evaluator: the workflow built in process from the bundle's configs, ``evaluator.run()``
    timed on the case after one warm-up run (reading, preprocessing, inference, inversion and writing the .nii.gz);
(c) ``segment``'s wall time for the case, with the model already built (a ``BundleSegmenter`` passed as ``bundle``)
    and after a warm-up call;
(d) the whole process ``python -m monai.bundle run inference ...`` in a subprocess (imports, model, CUDA start);
(e) peak memory (``torch.cuda.max_memory_allocated``; RSS on a CPU) for ``small_slices`` vs ``slices`` slices, for
    the inferer alone (over its input) and for the whole predictor path (over the loaded network); and the time of
    each stage around the network: read, to device, channel, orientation, intensity, network, inversion (to the
    host), write.

Targets on a GPU: (b) and (c) at most 2 × (a); the peak of (e) growing with the slices by no more than the input
volume itself. Nothing here imports ITK.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, public_settings

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


# ------------------------------------------------------------------------------------------------ folder (CPU)
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
        report = segment(input_dir, out, bundle=bundle, device="cpu", quiet=True, num_workers=workers)
        wall = time.perf_counter() - start
    assert report.exit_code == 0, [c.error for c in report.cases]
    return {"wall_s": wall, "rss_before_mib": before, "peak_rss_mib": _rss_mib("VmHWM"),
            "cases": len(report.cases), "slices": sum(c.slices for c in report.cases),
            "inference_s": sum(c.seconds.get("inference", 0) for c in report.cases)}  # fmt: skip


def child_network(input_dir: str, bundle: str) -> dict:
    """The network alone on the slice batches ``segment`` would run for every case (inputs made beforehand)."""
    import torch
    import torch.nn.functional as F

    from ic_moe_monai.inference.inferers import neighbor_stack
    from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
    from ic_moe_monai.io import discover_cases

    segmenter = BundleSegmenter(bundle, device="cpu")
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


def folder_scenarios(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    from ic_moe_monai.data.datasets import IMAGE_SUFFIXES

    results: dict[str, Any] = {}
    folder = tmp / "folder"
    folder.mkdir()
    images = sorted(p for p in Path(args.input).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    for path in images[: args.limit]:
        os.symlink(path.resolve(), folder / path.name)
    results["folder"] = _scenario(str(folder), args.bundle, args.repeats, args.num_workers) | {
        "input": Path(args.input).name
    }
    print("folder", json.dumps(results["folder"]), flush=True)
    if args.large_ct_rss:
        ct = tmp / "ct_rss"
        ct.mkdir()
        rng = np.random.default_rng(0)
        volume = (rng.standard_normal((512, 512, 400), dtype=np.float32) * 300).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.0, 1.0])), ct / "ct_512x512x400.nii")
        del volume
        large = _scenario(str(ct), args.bundle, 1, args.num_workers)
        large["volume_float32_mib"] = round(512 * 512 * 400 * 4 / MIB)
        large["peak_beyond_volume_mib"] = large["peak_rss_over_start_mib"] - large["volume_float32_mib"]
        results["large_ct_rss"] = large
        print("large_ct_rss", json.dumps(large), flush=True)
    return results


# ------------------------------------------------------------------------------------------------ large CT (GPU)
def synthetic_ct(size: int, slices: int, seed: int = 0):
    """An int16 CT phantom in HU: air, a body ellipse of soft tissue with two organs and a spine, scanner noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis, indexing="ij")
    volume = np.empty((size, size, slices), dtype=np.int16)
    for z in range(slices):
        scale = 0.85 + 0.1 * np.sin(np.pi * z / max(slices - 1, 1))  # the body widens towards the middle
        plane = np.full((size, size), -1000.0, dtype=np.float32)
        plane[(x / (0.8 * scale)) ** 2 + (y / (0.6 * scale)) ** 2 <= 1] = 40.0
        plane[((x + 0.3) / 0.3) ** 2 + ((y + 0.1) / 0.25) ** 2 <= 1] = 60.0  # a liver-like organ
        plane[((x - 0.35) / 0.12) ** 2 + ((y + 0.05) / 0.12) ** 2 <= 1] = 30.0  # a kidney-like organ
        plane[(x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 <= 1] = 700.0  # the spine
        plane += rng.normal(0.0, 12.0, plane.shape).astype(np.float32)
        volume[..., z] = np.clip(plane, -1024, 3071).astype(np.int16)
    return volume


class _Clock:
    """Wall times that include the device's queued work."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        start = time.perf_counter()
        value = fn()
        self.sync()
        return value, time.perf_counter() - start


class _Memory:
    """Peak memory over a baseline: CUDA's allocator on a GPU, the process's RSS (VmHWM) on a CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"
        self.base = 0.0

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / MIB
        else:
            _reset_peak()
            self.base = _rss_mib("VmRSS")

    def peak_over_base(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB - self.base
        return _rss_mib("VmHWM") - self.base


def _random_weight_bundle(root: Path, profile: str, modality: dict) -> tuple[Path, list[str]]:
    """A copy of the bundle's configs with random weights of the profile's network; the config files to merge."""
    import torch
    from monai.bundle import ConfigParser

    bundle = root / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    overrides = root / "overrides.json"
    overrides.write_text(json.dumps({"sam_checkpoint": None, **modality}))
    configs = [str(bundle / "configs" / profile), str(overrides)]
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), *configs])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle, configs


def _evaluator_seconds(bundle: Path, configs: list[str], dataset: Path, out: Path, device: Any, clock: _Clock) -> float:
    """``run inference``'s evaluator built in process: ``evaluator.run()`` on the case after a warm-up run."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), *configs])
    parser["bundle_root"], parser["dataset_dir"], parser["output_dir"] = str(bundle), str(dataset), str(out)
    parser["device"] = f"$torch.device('{device}')"
    evaluator = parser.get_parsed_content("evaluator")
    parser.get_parsed_content("checkpointloader")(evaluator)
    evaluator.run()  # warm-up: CUDA kernels, cuDNN choices, allocator
    _, seconds = clock.time(evaluator.run)
    del evaluator, parser
    return seconds


def _stage_breakdown(predictor: Any, path: Path, out: Path, clock: _Clock) -> dict[str, float]:
    """Each stage of one case through the predictor's own parts, timed on its own (device work included)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from ic_moe_monai.inference.predictor import load_case
    from ic_moe_monai.io import Case
    from ic_moe_monai.io.saving import NiftiWriter

    names = {"ToDeviced": "to_device", "EnsureChannelFirstd": "channel_first", "Orientationd": "orientation",
             "IntensityPresetd": "intensity"}  # fmt: skip
    stages: dict[str, float] = {}
    image, stages["read"] = clock.time(lambda: load_case(Case(name=path.name, kind="image", path=path)))
    data = {"image": image}
    for transform in predictor.preprocessing.transforms:
        data, seconds = clock.time(lambda t=transform, d=data: t(d))
        stages[names.get(type(transform).__name__, type(transform).__name__)] = seconds
    with torch.inference_mode():
        labels, stages["network_argmax_stitch"] = clock.time(
            lambda: predictor.inferer(data["image"][None], predictor.network)
        )
        pred = MetaTensor(labels[0], meta=dict(data["image"].meta),
                          applied_operations=list(data["image"].applied_operations))  # fmt: skip
        inverted, stages["inversion_to_host"] = clock.time(
            lambda: predictor.inverter({**data, "pred": pred})["pred"].cpu()
        )
    saver = SaveImage(output_dir=out, output_postfix="", output_ext=".nii.gz", output_dtype=np.uint8,
                      separate_folder=False, resample=False, print_log=False, writer=NiftiWriter)  # fmt: skip
    _, stages["write_nii_gz"] = clock.time(lambda: saver(inverted))
    return {k: round(v, 4) for k, v in stages.items()}


def large_ct(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np
    import torch

    from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
    from ic_moe_monai.io import Case
    from ic_moe_monai.segment import segment

    device = torch.device(args.device if args.device != "auto" else ("cuda:0" if torch.cuda.is_available() else "cpu"))
    clock, memory = _Clock(device), _Memory(device)
    started = time.perf_counter()
    bundle, configs = _random_weight_bundle(tmp, args.profile, {"modality": "ct", "ct_window": "abdomen"})
    affine = np.diag([-0.8, -0.8, 1.0, 1.0])  # stored LPS, as CTs converted from DICOM often are: orientation flips
    volume = synthetic_ct(args.size, args.slices)
    files: dict[str, Path] = {}
    for kind, suffix in (("nii", ".nii"), ("nii_gz", ".nii.gz")):
        folder = tmp / f"case_{kind}"
        folder.mkdir()
        files[kind] = folder / f"ct_{args.size}x{args.size}x{args.slices}{suffix}"
        nib.save(nib.Nifti1Image(volume, affine), files[kind])
    small = tmp / "small" / f"ct_{args.size}x{args.size}x{args.small_slices}.nii"
    small.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume[..., : args.small_slices]), affine), small)
    del volume
    result: dict[str, Any] = {
        "device": str(device),
        "profile": args.profile,
        "weights": "random",
        "volume": {"shape": [args.size, args.size, args.slices], "dtype": "int16",
                   "files": {k: {"path_suffix": v.name.split(".", 1)[1], "compressed": k == "nii_gz",
                                 "mib": round(v.stat().st_size / MIB, 1)} for k, v in files.items()}},
    }  # fmt: skip

    predictor = BundleSegmenter(bundle, configs, device=device)
    result["batch_size"] = predictor.batch_size
    result["amp"] = {"enabled": bool(predictor.inferer.amp) and device.type == "cuda",
                     "dtype": str(predictor.inferer.amp_dtype)}  # fmt: skip
    # (a) network only: the preprocessed volume on the device, through the inferer with argmax
    data = predictor.preprocess(load_case(Case(name="ct", kind="image", path=files["nii"])))
    inputs = data["image"][None]
    inferer, network = predictor.inferer, predictor.network
    with torch.inference_mode():
        inferer(inputs, network)  # warm-up
        network_runs = [clock.time(lambda: inferer(inputs, network))[1] for _ in range(args.repeats)]
    network_s = min(network_runs)
    result["a_network_only_s"] = round(network_s, 4)
    data = inputs = None
    # (e) peak memory, smaller vs full volume: the inferer alone (over its input) and the whole predictor path
    raw: dict[int, tuple[float, float, float]] = {}  # slices -> (volume, inferer peak, predict peak) in MiB
    for slices, path in ((args.small_slices, small), (args.slices, files["nii"])):
        case = Case(name=path.name, kind="image", path=path)
        memory.start()
        predictor(load_case(case))
        whole = memory.peak_over_base()
        data = predictor.preprocess(load_case(case))
        memory.start()
        with torch.inference_mode():
            predictor.inferer(data["image"][None], predictor.network)
        raw[slices] = (data["image"].numel() * 4 / MIB, memory.peak_over_base(), whole)
        data = None
    (small_volume, small_inferer, small_whole), (volume_mib, inferer_mib, whole_mib) = (
        raw[args.small_slices],
        raw[args.slices],
    )
    result["e_peak_memory"] = {
        "measure": memory.kind,
        "by_slices": {
            str(n): {
                "volume_float32_mib": round(v, 1),
                "inferer_peak_over_input_mib": round(i, 1),
                "predict_peak_over_model_mib": round(w, 1),
            }
            for n, (v, i, w) in raw.items()
        },
        # how much the peak grows per MiB of float32 volume added (0.25: the uint8 labels; 1: a volume's worth)
        "inferer_growth_over_volume_growth": round((inferer_mib - small_inferer) / (volume_mib - small_volume), 3),
        "predict_growth_over_volume_growth": round((whole_mib - small_whole) / (volume_mib - small_volume), 3),
    }
    # stages around the network, one case each way
    result["stages_s"] = {kind: _stage_breakdown(predictor, path, tmp / f"stages_{kind}", clock)
                          for kind, path in files.items()}  # fmt: skip
    # (b) run inference's evaluator, in process
    result["b_evaluator_s"] = {
        kind: round(_evaluator_seconds(bundle, configs, path.parent, tmp / f"eval_{kind}", device, clock), 4)
        for kind, path in files.items()
    }
    # (c) segment, the model already built
    result["c_segment_s"] = {}
    for kind, path in files.items():
        out = tmp / f"segment_{kind}"
        segment(str(path), str(out), bundle=predictor, quiet=True, overwrite=True)  # warm-up
        report, seconds = clock.time(
            lambda p=path, o=out, b=predictor: segment(str(p), str(o), bundle=b, quiet=True, overwrite=True)
        )
        assert report.exit_code == 0, [c.error for c in report.cases]
        result["c_segment_s"][kind] = round(seconds, 4)
        result.setdefault("c_segment_case_seconds", {})[kind] = report.cases[0].seconds
    predictor = inferer = network = None  # free the device for the subprocess
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # (d) the whole process of run inference
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
               "[" + ",".join(repr(c) for c in [str(bundle / "configs" / "inference.json"), *configs]) + "]",
               "--bundle_root", str(bundle), "--dataset_dir", str(files["nii"].parent), "--output_dir",
               str(tmp / "process_out"), "--device", f"$torch.device('{device}')"]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    result["d_whole_process_s"] = {"nii": round(time.perf_counter() - start, 3)}
    if process.returncode != 0:
        raise RuntimeError(f"run inference failed:\n{process.stderr[-3000:]}")
    result["ratios_to_network"] = {
        "evaluator": {k: round(v / network_s, 2) for k, v in result["b_evaluator_s"].items()},
        "segment": {k: round(v / network_s, 2) for k, v in result["c_segment_s"].items()},
    }
    result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    return result


def print_large_ct(r: dict[str, Any]) -> None:
    print(f"\nlarge CT {r['volume']['shape']} int16 on {r['device']}, {r['profile']} (random weights), "
          f"batch {r['batch_size']}, amp {r['amp']}")  # fmt: skip
    print(f"{'measure (s)':44s} {'.nii':>10s} {'.nii.gz':>10s}   ratio to (a)")
    print(f"{'(a) network only (inferer, argmax)':44s} {r['a_network_only_s']:10.3f}")
    rows = (("(b) run inference evaluator.run()", "b_evaluator_s", "evaluator"),
            ("(c) segment, model built", "c_segment_s", "segment"))  # fmt: skip
    for label, key, name in rows:
        values, ratio = r[key], r["ratios_to_network"][name]
        print(f"{label:44s} {values['nii']:10.3f} {values['nii_gz']:10.3f}   {ratio['nii']}, {ratio['nii_gz']}")
    print(f"{'(d) python -m monai.bundle run inference':44s} {r['d_whole_process_s']['nii']:10.3f}")
    memory = r["e_peak_memory"]
    for slices, peak in memory["by_slices"].items():
        print(f"(e) {memory['measure']}, {slices} slices: volume {peak['volume_float32_mib']} MiB (float32); "
              f"inferer +{peak['inferer_peak_over_input_mib']} MiB over its input; "
              f"predict +{peak['predict_peak_over_model_mib']} MiB over the model")  # fmt: skip
    print(f"    growth / volume growth: inferer {memory['inferer_growth_over_volume_growth']}, "
          f"predict {memory['predict_growth_over_volume_growth']}")  # fmt: skip
    print("stages (s)                          .nii    .nii.gz")
    for stage in r["stages_s"]["nii"]:
        print(f"    {stage:30s} {r['stages_s']['nii'][stage]:10.4f} {r['stages_s']['nii_gz'][stage]:10.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="a folder of volumes (e.g. MSD Task04 imagesTr) for the folder scenario")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--bundle", default=str(REPO / "bundle"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--large_ct_rss", action="store_true", help="folder scenario: also a 512x512x400 CT, RSS")
    parser.add_argument("--large_ct", action="store_true", help="the synthetic large CT measures (a)-(e)")
    parser.add_argument("--profile", default="sam_vit_b.json", help="profile config of the random-weight network")
    parser.add_argument("--size", type=int, default=512, help="large CT: rows = columns")
    parser.add_argument("--slices", type=int, default=300, help="large CT: slices")
    parser.add_argument("--small_slices", type=int, default=100, help="large CT: slices of the smaller volume (e)")
    parser.add_argument("--device", default="auto", help="large CT: auto, cpu or cuda:N")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "segment_speed.json"))
    args = parser.parse_args()
    if not args.input and not args.large_ct:
        parser.error("give --input (folder scenario) and/or --large_ct")

    settings = public_settings({k: v for k, v in vars(args).items() if k != "out"})
    results: dict[str, object] = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        if args.input:
            results.update(folder_scenarios(args, Path(tmp)))
        if args.large_ct:
            large_dir = Path(tmp) / "large_ct"
            large_dir.mkdir()
            results["large_ct"] = large_ct(args, large_dir)
            print_large_ct(results["large_ct"])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
