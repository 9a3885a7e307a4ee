"""Profile one IC-MoE training step (forward + ICMoELoss + backward + AdamW) on the device, batch already there.

Prints step times (median of CUDA-event timings) for several variants and torch.profiler tables, so that what
dominates the step is measured, not guessed. Usage: ``python benchmarks/gpu_profile_step.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.losses import ICMoELoss

PROFILES = {"lite": dict(encoder="lite", img_size=64, batch=32), "vit_b": dict(encoder="vit_b", img_size=256, batch=8)}


def build(name: str, device: torch.device):
    p = PROFILES[name]
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=p["img_size"], encoder=p["encoder"], freeze_encoder=p["encoder"] != "lite")
    model.to(device).train()
    x = torch.rand(p["batch"], 3, p["img_size"], p["img_size"], device=device)
    y = torch.randint(0, 3, (p["batch"], 1, p["img_size"], p["img_size"]), device=device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    return model, x, y, opt


def make_step(model, x, y, opt, loss_fn, dtype, mode):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            if mode == "forward":
                with torch.no_grad():
                    model(x)
                return
            out = model(x)
            loss = loss_fn(out["logits"] if mode == "dice_ce" else out, y)
        loss.backward()
        if mode != "no_opt":
            opt.step()

    return step


def time_cuda(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    # host time to enqueue one step while the device is idle (launch-bound if close to the device time)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return statistics.median(times), host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    lines = [f"# {torch.cuda.get_device_name()} torch {torch.__version__}"]
    for name in PROFILES:
        model, x, y, opt = build(name, device)
        loss_fn = ICMoELoss(num_classes=2)
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
            for mode in ("forward", "dice_ce", "no_opt", "full"):
                ms, host = time_cuda(make_step(model, x, y, opt, loss_fn, dtype, mode))
                lines.append(f"{name:6s} {dtype_name:5s} {mode:8s} device {ms:8.2f} ms   host enqueue {host:8.2f} ms")
                print(lines[-1], flush=True)
        step = make_step(model, x, y, opt, loss_fn, torch.bfloat16, "full")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 3
        lines.append(f"{name}: CUDA kernels per step {kernels:.0f}")
        print(lines[-1], flush=True)
        for sort in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
            table = events.table(sort_by=sort, row_limit=35, max_name_column_width=60)
            (out / f"{name}_{sort}.txt").write_text(table)
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
