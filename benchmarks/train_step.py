"""Training speed: the pure step against the bundle's real training iteration, and epochs per minute.

    python benchmarks/train_step.py --dataset_dir <msd_hippocampus> [--profiles lite,sam_vit_b] [--device auto]
        [--pure_steps 30] [--epochs 2] [--max_train_cases N] [--max_val_cases N] [--steps_per_epoch N]
        [--set KEY=JSON ...] [--out benchmarks/results/train_step.json] [--profile_dir DIR]

For each profile (``lite``: 32 slices of 64²; ``sam_vit_b``: 8 slices of 256², random weights):

(a) the pure step: forward + ICMoELoss + backward + AdamW on one batch already on the device, run by the bundle's
    trainer (:class:`~ic_moe_monai.training.engines.ICMoETrainer`) without data loading or handlers, eager and as a CUDA
    graph; median time per iteration, from CUDA events between iteration starts (on the CPU: ``perf_counter``);
    the warm-up and capture iterations are left out and reported apart;
(b) the bundle's real training iteration: ``train#trainer`` built from ``train.json`` + the profile by MONAI's
    ConfigParser on the real dataset (device slice sampling and augmentation, click prompts as the profile sets
    them, loss-term averaging, logging, checkpoints), a few epochs without validation; iteration times of the
    epochs after the first (which holds warm-up and capture, reported apart); the ratio (b) / (a graphed); for a
    profile with click prompts, one more epoch with them off on the same trainer; validation run twice (the first
    with one-time costs); epochs per minute with and without validation;
(c) ``torch.profiler`` tables of a few pure steps (eager and graphed) in ``--profile_dir``, and the aten ops of one
    eager step, one clicked step and one click-placing forward (what a CUDA graph saves the host).

Writes JSON (``--out``) with the machine and prints a short table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from torch.utils._python_dispatch import TorchDispatchMode

from ic_moe_monai.training.engines import ICMoETrainer, adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, public_settings

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
PROFILES = {"lite": "lite.json", "medsam_lite": "medsam_lite.json", "sam_vit_b": "sam_vit_b.json"}


# ------------------------------------------------------------------------------------------------ timing
class IterationTimer:
    """Times each iteration as the gap between the starts of consecutive iterations of one epoch (the last one:
    its start to its end), on the device's clock when on CUDA, so that a host running ahead is not mistaken for
    a fast step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[int, Any, Any]] = []  # (epoch, start, end)

    def attach(self, engine) -> IterationTimer:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._end)
        return self

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, engine) -> None:
        self.marks.append((engine.state.epoch, self._now(), None))

    def _end(self, engine) -> None:
        epoch, start, _ = self.marks[-1]
        self.marks[-1] = (epoch, start, self._now())

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def times(self) -> list[tuple[int, float]]:
        """(epoch, ms) per iteration."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for i, (epoch, start, end) in enumerate(self.marks):
            following = self.marks[i + 1] if i + 1 < len(self.marks) else None
            stop = following[1] if following is not None and following[0] == epoch else end
            out.append((epoch, self._ms(start, stop)))
        return out


class EpochTimer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, {}, 0.0

    def attach(self, engine) -> EpochTimer:
        engine.add_event_handler(Events.EPOCH_STARTED, self._begin)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end)
        return self

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _begin(self, engine) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self, engine) -> None:
        self._sync()
        self.seconds[engine.state.epoch] = time.perf_counter() - self._start


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"median_ms": statistics.median(values), "mean_ms": statistics.fmean(values), "min_ms": ordered[0],
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))], "count": len(values)}  # fmt: skip


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ configs
def _parser(profile: str, args: argparse.Namespace, device: torch.device, run_dir: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / PROFILES[profile])])
    overrides = {
        "dataset_dir": args.dataset_dir, "sam_checkpoint": None, "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "eval"), "resume": False, "max_epochs": args.epochs, "val_interval": 10**6,
        "max_train_cases": args.max_train_cases, "max_val_cases": args.max_val_cases, "num_workers": args.num_workers,
        "steps_per_epoch": args.steps_per_epoch, "device": f"$torch.device('{device}')",
        "amp": device.type == "cuda",
    }  # fmt: skip
    for item in args.set or []:  # e.g. click_prob=0.5
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _batch(parser: ConfigParser, device: torch.device) -> dict[str, torch.Tensor]:
    size = parser.get_parsed_content("img_size")
    count = parser.get_parsed_content("volumes_per_batch") * parser.get_parsed_content("slices_per_volume")
    generator = torch.Generator().manual_seed(0)
    label = torch.zeros(count, 1, size, size, dtype=torch.int64)
    label[:, :, size // 4 : size // 2, size // 4 : 3 * size // 4] = 1
    label[:, :, size // 2 : 5 * size // 8, size // 4 : 3 * size // 4] = 2
    image = torch.rand(count, 3, size, size, generator=generator) * 0.2 + label.float() * 0.3
    return {"image": image.to(device), "label": label.to(device)}


# ------------------------------------------------------------------------------------------------ (a) and (c)
def pure_step(parser: ConfigParser, device: torch.device, graphed: bool, steps: int, profile_file: Path | None):
    """The trainer on one fixed on-device batch: no loading, no handlers, no decollation."""
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def", lazy=False).to(device).train()
    loss = parser.get_parsed_content("loss", lazy=False)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = adamw(params, parser.get_parsed_content("learning_rate"), parser.get_parsed_content("weight_decay"),
                      device)  # fmt: skip
    batch = _batch(parser, device)
    trainer = ICMoETrainer(device=device, max_epochs=1, train_data_loader=[batch] * steps, network=network,
                           optimizer=optimizer, loss_function=loss, amp=device.type == "cuda", amp_dtype="auto",
                           cuda_graph=graphed, decollate=False)  # fmt: skip
    timer = IterationTimer(device).attach(trainer)
    skip = trainer.graph_warmup + 3 if graphed else 2  # (warm-up and capture,) and two more
    window = (skip + 1, skip + 3)  # profiled iterations
    state: dict[str, Any] = {}
    if profile_file is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def start(engine) -> None:
            if engine.state.iteration == window[0]:
                state["prof"] = torch.profiler.profile(activities=activities)
                state["prof"].__enter__()

        def stop(engine) -> None:
            if engine.state.iteration == window[1]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                state["prof"].__exit__(None, None, None)

        trainer.add_event_handler(Events.ITERATION_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
    trainer.run()
    times = [ms for _, ms in timer.times()]
    result = {"step": _summary(times[skip:]), "first_iterations_ms": [round(t, 2) for t in times[:skip]],
              "graphed": graphed and device.type == "cuda"}  # fmt: skip
    if "prof" in state:
        result.update(_write_profile(state["prof"], profile_file, window[1] - window[0] + 1, device))
    del trainer, network, optimizer
    _free()
    return result


def _write_profile(prof, path: Path, steps: int, device: torch.device) -> dict[str, float]:
    events = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    path.write_text("\n\n".join(f"# sorted by {s}, {steps} steps\n" + events.table(sort_by=s, row_limit=30,
                                max_name_column_width=70) for s in sorts))  # fmt: skip
    counts = {}
    if device.type == "cuda":
        counts["cuda_kernels_per_step"] = sum(e.count for e in events if e.device_type.name == "CUDA") / steps
    for name in ("cudaLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync"):
        counts[f"{name}_per_step"] = sum(e.count for e in events if e.key == name) / steps
    return counts


def op_counts(parser: ConfigParser, device: torch.device) -> dict[str, int]:
    """Aten ops the host dispatches for one eager step, one clicked step and one click-placing call."""
    from ic_moe_monai.training.clicks import ClickPromptBatch

    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def", lazy=False).to(device).train()
    loss_fn = parser.get_parsed_content("loss", lazy=False)
    optimizer = adamw([p for p in network.parameters() if p.requires_grad], 1e-4, 0.01, device)
    batch = _batch(parser, device)
    clicks = ClickPromptBatch(network, prob=1.0, amp=device.type == "cuda", num_classes=2)
    _, _, _, prompts = clicks(batch, device)

    def step(**kwargs) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(network(batch["image"], **kwargs), batch["label"])
        loss.backward()
        optimizer.step()

    step()  # optimizer state
    out = {}
    for name, fn in (("eager_step", step), ("eager_clicked_step", lambda: step(**prompts)),
                     ("click_prompts", lambda: clicks._prompts(batch["image"], batch["label"]))):  # fmt: skip
        with OpCounter() as counter:
            fn()
        out[name] = counter.ops
    return out


# ------------------------------------------------------------------------------------------------ (b)
def bundle_training(parser: ConfigParser, device: torch.device, epochs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    parser.get_parsed_content("initialize")  # determinism, folders, checkpoint saver, as `run training` does
    trainer = parser.get_parsed_content("train#trainer")
    build_s = time.perf_counter() - t0
    clicked: list[bool] = []
    prepare = trainer.prepare_batch

    def recording_prepare(*a, **k):
        batch = prepare(*a, **k)
        clicked.append(len(batch) == 4)
        return batch

    trainer.prepare_batch = recording_prepare  # to split the times of clicked and plain batches
    timer = IterationTimer(device).attach(trainer)
    epoch_timer = EpochTimer(device).attach(trainer)
    trainer.run()
    click_prob = getattr(prepare, "prob", 0.0)
    result = {"build_s": build_s, "steps_per_epoch": trainer.state.epoch_length,
              "batch": getattr(trainer.data_loader, "batch_size", None), "click_prob": click_prob}  # fmt: skip
    result.update(_iteration_stats(timer.times(), clicked, epoch_timer.seconds))
    if click_prob > 0:  # the same trainer, one more epoch without clicks
        prepare.prob = 0.0
        first = len(timer.marks)
        trainer.state.max_epochs += 1
        trainer.run()
        times = timer.times()[first:]
        later = {e: s for e, s in epoch_timer.seconds.items() if e > epochs}
        result["without_clicks"] = _iteration_stats(times, [False] * len(times), later, skip_first_epoch=False)
        prepare.prob = click_prob
    evaluator = parser.get_parsed_content("validate#evaluator")
    validation = []
    for _ in range(2):
        _free()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        evaluator.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        validation.append(time.perf_counter() - t0)
    result["validation_s"] = {"first": validation[0], "steady": validation[1],
                              "cases": len(parser.get_parsed_content("validate#dataset"))}  # fmt: skip
    epoch_s = result["epoch_s_steady"]
    result["epochs_per_min"] = {"without_validation": 60 / epoch_s, "with_validation": 60 / (epoch_s + validation[1])}
    del trainer, evaluator
    _free()
    return result


def _iteration_stats(times, clicked, epoch_seconds, skip_first_epoch: bool = True) -> dict[str, Any]:
    first_epoch = min(e for e, _ in times)
    steady = [(ms, c) for (e, ms), c in zip(times, clicked, strict=True) if not skip_first_epoch or e > first_epoch]
    warm = [ms for e, ms in times if skip_first_epoch and e == first_epoch]
    epochs = sorted(epoch_seconds)
    steady_epochs = [epoch_seconds[e] for e in epochs[1:]] if skip_first_epoch and len(epochs) > 1 else [
        epoch_seconds[e] for e in epochs]  # fmt: skip
    first = None
    if warm:
        first = {"mean_ms": statistics.fmean(warm), "max_ms": max(warm), "seconds": epoch_seconds[epochs[0]],
                 "first_8_ms": [round(t, 1) for t in warm[:8]]}  # fmt: skip
    return {
        "iteration": _summary([ms for ms, _ in steady]),
        "iteration_clicked": _summary([ms for ms, c in steady if c]),
        "iteration_plain": _summary([ms for ms, c in steady if not c]),
        "first_epoch": first,
        "epoch_s_steady": statistics.fmean(steady_epochs),
    }


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True, help="MSD Task04 Hippocampus (dataset.json, imagesTr, labelsTr)")
    ap.add_argument("--profiles", default="lite,sam_vit_b")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--pure_steps", type=int, default=30, help="iterations of each pure-step run")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the bundle run (the first one is warm-up)")
    ap.add_argument("--max_train_cases", type=int, default=None)
    ap.add_argument("--max_val_cases", type=int, default=None)
    ap.add_argument("--steps_per_epoch", type=int, default=None, help="default: the bundle's")
    ap.add_argument("--num_workers", type=int, default=4, help="threads that load and cache the volumes")
    ap.add_argument("--set", action="append", help="config override key=JSON value, e.g. click_prob=0.5 (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument("--profile_dir", default=None, help="torch.profiler tables (default: beside --out)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    profile_dir = Path(args.profile_dir or Path(args.out).with_suffix("")).resolve()
    settings = public_settings(vars(args))
    report: dict[str, Any] = {"machine": machine_info(), "device": str(device), "settings": settings, "profiles": {}}
    for profile in args.profiles.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            parser = _parser(profile, args, device, Path(tmp))
            entry: dict[str, Any] = {"batch": list(_batch(parser, device)["image"].shape)}
            entry["pure_eager"] = pure_step(
                parser, device, False, args.pure_steps, profile_dir / f"{profile}_eager.txt"
            )
            if device.type == "cuda":
                entry["pure_graphed"] = pure_step(parser, device, True, args.pure_steps,
                                                  profile_dir / f"{profile}_graphed.txt")  # fmt: skip
            entry["aten_ops"] = op_counts(parser, device)
            _free()
            entry["bundle"] = bundle_training(parser, device, args.epochs)
            pure = entry.get("pure_graphed", entry["pure_eager"])["step"]["median_ms"]
            entry["ratio_bundle_to_pure"] = entry["bundle"]["iteration"]["mean_ms"] / pure
            if "without_clicks" in entry["bundle"]:
                entry["ratio_bundle_to_pure_without_clicks"] = (
                    entry["bundle"]["without_clicks"]["iteration"]["mean_ms"] / pure
                )
            report["profiles"][profile] = entry
            print(f"{profile}: done", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    _print_table(report)


def _print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['machine'].get('gpu') or report['machine']['cpu']}, torch {report['machine']['torch']}")
    print(f"{'profile':10s} {'batch':>16s} {'eager':>9s} {'graphed':>9s} {'bundle':>9s} {'ratio':>6s} "
          f"{'no-click':>9s} {'ratio':>6s} {'ep/min':>7s} {'+val':>7s}")  # fmt: skip
    for name, e in report["profiles"].items():
        b = e["bundle"]
        graphed = e.get("pure_graphed", {}).get("step") or {}
        plain = b.get("without_clicks", {}).get("iteration") or {}
        cells = [e["pure_eager"]["step"]["median_ms"], graphed.get("median_ms"), b["iteration"]["mean_ms"],
                 e["ratio_bundle_to_pure"], plain.get("mean_ms"), e.get("ratio_bundle_to_pure_without_clicks"),
                 b["epochs_per_min"]["without_validation"], b["epochs_per_min"]["with_validation"]]  # fmt: skip
        text = [("-" if v is None else f"{v:.2f}") for v in cells]
        print(f"{name:10s} {'x'.join(map(str, e['batch'])):>16s} " + " ".join(f"{t:>{w}s}" for t, w in
              zip(text, (9, 9, 9, 6, 9, 6, 7, 7), strict=True)))  # fmt: skip
    print("(ms per iteration; ratio = bundle iteration / pure step, graphed where CUDA)")


if __name__ == "__main__":
    main()
