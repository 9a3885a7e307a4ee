"""Eval-mode forward speed of IC-MoE against its encoder, per slice, on the CPU or a CUDA GPU.

    python benchmarks/network_speed.py --device cpu  [--cases vit_b:256:1,lite:64:8] [--repeats 5] [--out FILE]
    python benchmarks/network_speed.py --device cuda [--compile] [--repeats 10] [--out FILE]
    python benchmarks/network_speed.py --op-counts [--out FILE]

For each case (encoder, img_size, batch) and dtype (fp32 on the CPU; fp32 and bf16 / fp16 autocast on CUDA) it
measures, interleaved in one run, the median eval forward time per slice of

- ``icmoe``: the whole network, ``model(x)`` (experts, prompt-free decoder, upsampling);
- ``bare``: the encoder alone through ICMoE's own block loop with the experts skipped,
  ``model.encode(x, experts=False)``: the honest reference for what the experts cost;
- ``stock``: SAM's own ``model.image_encoder(x)`` (same weights, SAM's attention code);
- ``sam_as_built`` (SAM sizes, when the automatic window is not SAM's 14): an ``ImageEncoderViT`` with SAM's
  window 14, as SAM builds it;
- ``icmoe_compiled`` (``--compile``): ICMoE with ``compile_blocks=True``, in bf16 on CUDA (fp32 on the CPU), at the
  largest batch of each encoder only (each new shape or dtype would be a compilation of its own).

It reports the ratios ICMoE / bare and ICMoE / stock, FLOPs per slice (``torch.utils.flop_counter``, attention counted
through the math backend) and the achieved TFLOP/s; on CUDA also a large bf16 matmul (8192³) measured in the same
run, and each variant's share of its TFLOP/s, and the peak memory of one forward. CUDA times come from CUDA events
after warm-up, with the device idle before each measured forward; medians. Writes JSON (``--out``) and prints a table.

``--op-counts`` instead counts the aten ops of the ``lite`` network (batch 4, 64², the shipped model's size) on the
CPU: the eval forward and a training forward + ICMoELoss + backward, as ``torch.profiler`` events and as dispatched
ops that are not views (about the kernels a GPU would launch). What a GPU spends launching kernels grows with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ic_moe_monai.networks import ICMoE, count_parameters
from ic_moe_monai.networks.sam_weights import build_image_encoder
from ic_moe_monai.training.losses import ICMoELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info

CASES = {
    "cpu": [("vit_b", 256, 1), ("vit_b", 256, 8), ("lite", 64, 1), ("lite", 64, 8)],
    "cuda": [("vit_b", 256, 32), ("vit_b", 256, 128), ("lite", 64, 128)],
}
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "bf16", "fp16"]}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILED_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
SAM_WINDOW = 14


def build(encoder: str, img_size: int, device: torch.device, compile_blocks: bool | str) -> dict[str, torch.nn.Module]:
    """The networks of one (encoder, img_size): ICMoE with trained-like experts, and the variants beside it."""
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder)
    # trained-like experts: fresh ones have zero output projections, which would hide nothing but look untrained
    with torch.no_grad():
        for p in model.moe_layers.parameters():
            if p.ndim > 1:
                p.normal_(std=0.02)
    nets = {"icmoe": model.to(device).eval()}
    if encoder != "lite" and model.window_size != SAM_WINDOW:
        nets["sam_as_built"] = build_image_encoder(encoder, img_size, window_size=SAM_WINDOW).to(device).eval()
    if compile_blocks:
        compiled = copy.deepcopy(model)
        compiled.compile_blocks = compile_blocks
        nets["icmoe_compiled"] = compiled
    return nets


def variants(nets: dict[str, torch.nn.Module], x: torch.Tensor, compiled: bool) -> dict[str, Callable[[], object]]:
    model = nets["icmoe"]
    image = model.preprocess(x)
    runs = {
        "icmoe": lambda: model(x),
        "bare": lambda: model.encode(image, experts=False),
        "stock": lambda: model.image_encoder(image),
    }
    if "sam_as_built" in nets:
        runs["sam_as_built"] = lambda: nets["sam_as_built"](image)
    if compiled and "icmoe_compiled" in nets:
        runs["icmoe_compiled"] = lambda: nets["icmoe_compiled"](x)
    return runs


def flops_per_slice(nets: dict[str, torch.nn.Module], img_size: int, device: torch.device) -> dict[str, float]:
    """FLOPs of one slice per variant (batch 2, fp32); attention through the math backend so that it is counted."""
    x = torch.rand(2, 3, img_size, img_size, device=device)
    counts = {}
    for name, fn in variants(nets, x, compiled=False).items():
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
            fn()
        counts[name] = counter.get_total_flops() / 2
    if "icmoe_compiled" in nets:
        counts["icmoe_compiled"] = counts["icmoe"]
    return counts


def time_interleaved(
    runs: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each run, interleaved (the order rotates each round), the device idle before each call."""
    cuda = device.type == "cuda"
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runs[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start_s)
    return times


def peak_memory_mib(runs: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Peak CUDA memory of one forward above what was allocated before it."""
    peaks = {}
    for name, fn in runs.items():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peaks[name] = round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)
    return peaks


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> dict[str, float]:
    """A large bf16 matmul: what the card computes when nothing but arithmetic limits it."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = statistics.median(time_interleaved({"mm": lambda: a @ b}, device, repeats, warmup=5)["mm"])
    return {"size": size, "ms": round(seconds * 1e3, 3), "tflops": round(2 * size**3 / seconds / 1e12, 1)}


def run_case(
    nets: dict[str, torch.nn.Module],
    flops: dict[str, float],
    encoder: str,
    img_size: int,
    batch: int,
    dtype: str,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, object]:
    torch.manual_seed(1)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    compiled = args.compile and dtype == COMPILED_DTYPE[device.type] and batch == args.compile_batch[encoder, img_size]
    autocast = torch.autocast(device.type, dtype=LOW_PRECISION[dtype]) if dtype in LOW_PRECISION else nullcontext()
    with torch.inference_mode(), autocast:
        runs = variants(nets, x, compiled)
        compile_s = None
        if compiled:  # the first call compiles: time it apart from the measurement
            start = time.perf_counter()
            runs["icmoe_compiled"]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = round(time.perf_counter() - start, 1)
        times = time_interleaved(runs, device, args.repeats, args.warmup)
        peaks = peak_memory_mib(runs, device) if device.type == "cuda" else None
    ms = {name: statistics.median(t) * 1e3 / batch for name, t in times.items()}
    tflops = {name: flops[name] / (ms[name] / 1e3) / 1e12 for name in ms}
    result: dict[str, object] = {
        "encoder": encoder,
        "img_size": img_size,
        "window_size": nets["icmoe"].window_size,
        "batch": batch,
        "dtype": dtype,
        "ms_per_slice": {k: round(v, 4) for k, v in ms.items()},
        "gflop_per_slice": {k: round(flops[k] / 1e9, 2) for k in ms},
        "tflops": {k: round(v, 2) for k, v in tflops.items()},
        "ratio_icmoe_over_bare": round(ms["icmoe"] / ms["bare"], 3),
        "ratio_icmoe_over_stock": round(ms["icmoe"] / ms["stock"], 3),
    }
    if "icmoe_compiled" in ms:
        result["ratio_icmoe_compiled_over_bare"] = round(ms["icmoe_compiled"] / ms["bare"], 3)
        result["compile_s"] = compile_s
    if peaks is not None:
        result["peak_mib"] = peaks
    return result


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd, and those of them that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.not_views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.not_views += not func.is_view and func not in (torch.ops.aten.detach.default,)
        return func(*args, **(kwargs or {}))


def op_counts() -> dict[str, dict[str, int]]:
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite", freeze_encoder=False)
    loss_fn = ICMoELoss(num_classes=2)
    x = torch.rand(4, 3, 64, 64)
    y = torch.randint(0, 3, (4, 1, 64, 64))

    def eval_forward() -> None:
        with torch.no_grad():
            model.eval()(x)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model.train()(x), y).backward()

    counts = {}
    for name, fn in (("eval_forward", eval_forward), ("train_forward_backward", train_step)):
        fn()  # warm: first-use work (caches) is not counted
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        counter = _OpCounter()
        with counter:
            fn()
        events = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        counts[name] = {"profiler_aten_events": events, "dispatched_ops": counter.total, "not_views": counter.not_views}
    return counts


def parse_cases(text: str | None, device: str) -> list[tuple[str, int, int]]:
    if not text:
        return CASES[device]
    cases = []
    for item in text.split(","):
        encoder, img_size, batch = item.split(":")
        cases.append((encoder, int(img_size), int(batch)))
    return cases


def print_table(results: dict[str, object]) -> None:
    matmul = results.get("matmul_bf16")
    if matmul:
        print(f"bf16 matmul {matmul['size']}³: {matmul['tflops']} TFLOP/s")
    print(f"{'case':<22} {'dtype':<5} {'variant':<15} {'ms/slice':>9} {'GFLOP':>7} {'TFLOP/s':>8} {'share':>6}")
    for case in results["cases"]:
        label = f"{case['encoder']}@{case['img_size']} w{case['window_size']} b{case['batch']}"
        for name, ms in case["ms_per_slice"].items():
            share = case.get("matmul_share", {}).get(name)
            share_text = f"{share:.0%}" if share is not None else ""
            print(
                f"{label:<22} {case['dtype']:<5} {name:<15} {ms:>9.3f} {case['gflop_per_slice'][name]:>7.1f} "
                f"{case['tflops'][name]:>8.2f} {share_text:>6}"
            )
        print(
            f"{label:<22} {case['dtype']:<5} ICMoE / bare {case['ratio_icmoe_over_bare']:.3f}, "
            f"ICMoE / stock {case['ratio_icmoe_over_stock']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", help="comma-separated encoder:img_size:batch (default: the device's set)")
    parser.add_argument("--dtypes", help="comma-separated fp32,bf16,fp16 (default: the device's set)")
    parser.add_argument("--repeats", type=int, help="measured calls per variant (default 10 on CUDA, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also ICMoE with compile_blocks (bf16 on CUDA)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for --compile")
    parser.add_argument("--op-counts", action="store_true", help="count the lite network's aten ops instead (CPU)")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/network_speed_<device>.json)")
    args = parser.parse_args()
    args.out = (
        args.out or f"benchmarks/results/network_{'op_counts' if args.op_counts else 'speed_' + args.device}.json"
    )
    if args.op_counts:
        counts = {"benchmark": "aten ops of lite (batch 4, 64²) on the CPU", **op_counts(), "machine": machine_info()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(counts, indent=2) + "\n")
        print(json.dumps(counts, indent=2))
        return
    device = torch.device(args.device)
    args.repeats = args.repeats or (10 if device.type == "cuda" else 5)
    dtypes = args.dtypes.split(",") if args.dtypes else DTYPES[device.type]
    started = time.perf_counter()
    cases = parse_cases(args.cases, device.type)
    args.compile_batch = {}
    for encoder, img_size, batch in cases:
        args.compile_batch[encoder, img_size] = max(batch, args.compile_batch.get((encoder, img_size), 0))

    results: dict[str, object] = {
        "benchmark": "eval forward per slice: ICMoE vs its bare encoder (same block loop) vs SAM's image_encoder",
        "device": device.type,
        "repeats": args.repeats,
        "compile_mode": args.compile_mode if args.compile else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "cases": [],
        "params": {},
    }
    if device.type == "cuda":
        results["matmul_bf16"] = matmul_tflops(device)
    built: dict[tuple[str, int], tuple[dict[str, torch.nn.Module], dict[str, float]]] = {}
    for encoder, img_size, batch in cases:
        if (encoder, img_size) not in built:
            nets = build(encoder, img_size, device, args.compile and (args.compile_mode or True))
            built[(encoder, img_size)] = nets, flops_per_slice(nets, img_size, device)
            trainable, total = count_parameters(nets["icmoe"])
            results["params"][f"{encoder}@{img_size}"] = {"trainable": trainable, "total": total}
        nets, flops = built[(encoder, img_size)]
        for dtype in dtypes:
            case = run_case(nets, flops, encoder, img_size, batch, dtype, args, device)
            if "matmul_bf16" in results:
                peak = results["matmul_bf16"]["tflops"]
                case["matmul_share"] = {k: round(v / peak, 3) for k, v in case["tflops"].items()}
            results["cases"].append(case)
            print(
                f"{encoder}@{img_size} b{batch} {dtype}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in case["ms_per_slice"].items()),
                flush=True,
            )
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
