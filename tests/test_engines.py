"""ICMoETrainer on the CPU: autocast dtype and scaler choice, sync-free decollation, the capturable optimizer and its
scheduler, and the CUDA-graph control flow with graph capture emulated (warm-up, capture, replay into static
buffers, fallbacks), checked step for step against eager training."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.optimizers import WarmupCosineSchedule as MonaiWarmupCosineSchedule

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.engines import (
    GraphedFunction,
    ICMoETrainer,
    WarmupCosineSchedule,
    adamw,
    decollate_without_sync,
)
from ic_moe_monai.training.losses import ICMoELoss
from tests.sync_check import NoHostSync

SIZE = 32


class EmulatedGraphTrainer(ICMoETrainer):
    """CUDA graphs emulated on the CPU with the semantics that matter: capture runs nothing (its effects are
    undone), each replay runs the recorded step once, writing (not accumulating) the gradients and writing its
    results into the same output tensors."""

    def __init__(self, *args, fail_capture: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_capture = fail_capture
        self.side_stream_steps = 0
        self.captures = 0
        self.replays = 0

    def _why_not_graphed(self):
        return None

    def _on_side_stream(self, fn) -> None:
        self.side_stream_steps += 1
        fn()

    def _record(self, fn):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        saved = (copy.deepcopy(self.network.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        rng = torch.get_rng_state()
        outputs = fn()
        self.network.load_state_dict(saved[0])
        self.optimizer.load_state_dict(saved[1])
        torch.set_rng_state(rng)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]

        def replay() -> None:
            self.replays += 1
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            new = fn()
            for old, value in zip(_tensors(outputs), _tensors(new), strict=True):
                old.detach().copy_(value.detach())

        return replay, outputs


def _tensors(tree) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _batches(count: int, seed: int = 0, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        label = torch.zeros(batch, 1, SIZE, SIZE, dtype=torch.int64)
        label[:, :, 8:20, 6:24] = 1
        label[:, :, 22:28, 6:24] = 2
        out.append({"image": torch.rand(batch, 3, SIZE, SIZE, generator=g), "label": label})
    return out


def _trainer(cls=ICMoETrainer, data=None, epochs: int = 1, **kwargs):
    torch.manual_seed(0)
    network = ICMoE(num_classes=2, img_size=SIZE, encoder="lite")
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    return cls(
        device="cpu", max_epochs=epochs, train_data_loader=data if data is not None else _batches(6),
        network=network, optimizer=optimizer, loss_function=ICMoELoss(num_classes=2), **kwargs,
    )  # fmt: skip


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.network.parameters()]


# ------------------------------------------------------------------------------------------------ graph control flow
def test_graphed_training_equals_eager_training_step_for_step():
    """Warm-up steps are real steps, capture trains nothing, every later iteration replays exactly one step on its
    own batch (copied into the static inputs), over two epochs."""
    eager = _trainer(epochs=2)
    eager.run()
    graphed = _trainer(EmulatedGraphTrainer, epochs=2, cuda_graph=True, graph_warmup=2)
    losses = []
    graphed.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"].item()))
    graphed.run()
    assert graphed.side_stream_steps == 2 and graphed.captures == 1 and graphed.replays == 10
    for a, b in zip(_params(eager), _params(graphed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(set(losses)) == len(losses)  # each replay's loss is its own batch's, not the captured one's


def test_each_iteration_fires_the_parents_events_and_outputs_every_key():
    events = ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED")
    seen = {getattr(IterationEvents, name): 0 for name in events}
    trainer = _trainer(EmulatedGraphTrainer, cuda_graph=True, graph_warmup=1, decollate=False)
    for event in seen:
        trainer.add_event_handler(event, lambda e, ev=event: seen.__setitem__(ev, seen[ev] + 1))
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()
    assert all(count == 6 for count in seen.values()), seen
    assert all(set(out) == {"image", "label", "pred", "loss"} for out in outputs)
    assert outputs[-1]["pred"]["logits"].shape == (2, 3, SIZE, SIZE) and outputs[-1]["loss"].ndim == 0


def test_capture_failure_falls_back_to_eager_with_one_log_line(caplog):
    eager = _trainer()
    eager.run()
    failing = _trainer(EmulatedGraphTrainer, cuda_graph=True, graph_warmup=1, fail_capture=True)
    with caplog.at_level(logging.INFO):
        failing.run()
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(lines) == 1 and "capture failed" in lines[0] and "run eagerly" in lines[0]
    for a, b in zip(_params(eager), _params(failing), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_each_kind_of_batch_gets_its_own_graph_up_to_max_graphs(caplog):
    """Batches with click prompts are another kind (keyword arguments); past max_graphs kinds run eagerly."""
    points = torch.tensor([[[10.0, 12.0]], [[5.0, 20.0]]])

    def prepare(batch, device=None, non_blocking=False, **kwargs):
        kind = int(batch["image"][0, 0, 0, 0] * 1000) % 3
        if kind == 0:
            return batch["image"], batch["label"]
        extra = {"points": points[:, :kind].expand(2, kind, 2).contiguous(), "point_labels": torch.ones(2, kind)}
        return batch["image"], batch["label"], (), extra

    trainer = _trainer(EmulatedGraphTrainer, data=_batches(12), cuda_graph=True, graph_warmup=1, max_graphs=2,
                       prepare_batch=prepare)  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert trainer.captures == 2
    assert sum("more than 2 batch kinds" in r.getMessage() for r in caplog.records) == 1


def test_on_the_cpu_the_step_is_eager_and_said_once(caplog):
    trainer = _trainer(cuda_graph=True, amp=True, amp_dtype="float16")
    with caplog.at_level(logging.INFO):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert lines == ["cuda_graph: training step runs eagerly: the device is cpu."]
    assert trainer.scaler is None  # no autocast, so no scaler, on the CPU


def test_grad_scaler_only_for_float16_on_cuda():
    kwargs = dict(max_epochs=1, train_data_loader=[], network=torch.nn.Linear(1, 1), loss_function=None)
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    for dtype, device, amp, scaler in (("float16", "cuda", True, True), ("bfloat16", "cuda", True, False),
                                       ("float16", "cuda", False, False), ("float16", "cpu", True, False)):  # fmt: skip
        trainer = ICMoETrainer(device=device, optimizer=opt, amp=amp, amp_dtype=dtype, **kwargs)
        assert trainer._uses_scaler() is scaler, (dtype, device, amp)
        assert trainer.amp_kwargs["dtype"] == getattr(torch, dtype)


class EmulatedGraphedFunction(GraphedFunction):
    """GraphedFunction on the CPU with capture emulated: a replay reruns the function into the captured outputs."""

    def __init__(self, *args, fail: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail, self.side_stream_calls, self.captures = fail, 0, 0

    def _usable(self, inputs) -> bool:
        return self.enabled

    def _on_side_stream(self, device, fn):
        self.side_stream_calls += 1
        return fn()

    def _record(self, fn, device):
        if self.fail:
            raise RuntimeError("capture failed")
        self.captures += 1
        outputs = fn()
        return (lambda: [old.copy_(new) for old, new in zip(_tensors(outputs), _tensors(fn()), strict=True)]), outputs


def test_graphed_function_warms_up_captures_per_shape_and_replays_into_its_outputs(caplog):
    calls = []

    def double(x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(x.shape)
        return {"twice": x * 2}

    graphed = EmulatedGraphedFunction(double, warmup=2, max_graphs=1)
    results = [graphed(torch.full((2,), float(i))) for i in range(5)]
    assert graphed.side_stream_calls == 2 and graphed.captures == 1
    assert results[3] is results[4]  # a replay returns the graph's static outputs ...
    assert torch.equal(results[4]["twice"], torch.full((2,), 8.0))  # ... holding this call's result
    assert torch.equal(graphed(torch.ones(3))["twice"], torch.full((3,), 2.0))  # another shape: past max_graphs, eager
    assert graphed.captures == 1
    failing = EmulatedGraphedFunction(double, warmup=1, name="clicks", fail=True)
    with caplog.at_level(logging.WARNING):
        outs = [failing(torch.ones(2)) for _ in range(4)]
    assert all(torch.equal(o["twice"], torch.full((2,), 2.0)) for o in outs)
    assert sum("capture of clicks failed" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------ pieces
def test_decollation_keeps_the_loss_on_the_device():
    output = {"image": torch.rand(3, 2, 4, 4), "pred": {"logits": torch.rand(3, 2, 4, 4, requires_grad=True)},
              "loss": torch.tensor(0.5, requires_grad=True)}  # fmt: skip
    with NoHostSync():
        items = decollate_without_sync(output)
    assert len(items) == 3 and isinstance(items[0]["loss"], torch.Tensor) and not items[0]["loss"].requires_grad
    assert torch.equal(items[2]["pred"]["logits"], output["pred"]["logits"][2].detach())
    assert decollate_without_sync([1, 2]) == [1, 2] and decollate_without_sync({"a": 1}) == {"a": 1}


def test_adamw_factory_on_the_cpu_is_plain_adamw():
    params = [torch.nn.Parameter(torch.rand(3))]
    opt = adamw(params, lr=2e-3, weight_decay=0.05, device="cpu")
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW and group["lr"] == 2e-3 and group["weight_decay"] == 0.05
    assert not group["fused"] and not group["capturable"]


def test_scheduler_fills_a_tensor_learning_rate_in_place_and_resumes():
    """What a captured optimizer step relies on: the schedule (a LambdaLR) writes the new rate into the same tensor,
    without a host sync (MONAI's WarmupCosineSchedule syncs after the warm-up), and initial_lr is a copy; the state
    dicts round-trip; the rates equal MONAI's."""
    params = [torch.nn.Parameter(torch.rand(3))]
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3), foreach=False)
    lr = opt.param_groups[0]["lr"]
    scheduler = WarmupCosineSchedule(opt, warmup_steps=2, t_total=10, warmup_multiplier=0.1)
    assert opt.param_groups[0]["initial_lr"] is not lr
    values = []
    for _ in range(4):
        params[0].grad = torch.ones(3)
        opt.step()
        with NoHostSync():
            scheduler.step()
        values.append(float(lr))
    assert opt.param_groups[0]["lr"] is lr and len(set(values)) == 4
    monai_opt = torch.optim.AdamW([torch.nn.Parameter(torch.rand(3))], lr=1e-3)
    monai_sched = MonaiWarmupCosineSchedule(monai_opt, warmup_steps=2, t_total=10, warmup_multiplier=0.1)
    expected = []
    for _ in range(4):
        monai_opt.step()
        monai_sched.step()
        expected.append(monai_opt.param_groups[0]["lr"])
    assert values == pytest.approx(expected)
    assert float(opt.param_groups[0]["initial_lr"]) == pytest.approx(1e-3)
    state = copy.deepcopy({"opt": opt.state_dict(), "sched": scheduler.state_dict()})
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.rand(3))], lr=torch.tensor(1e-3), foreach=False)
    fresh_sched = WarmupCosineSchedule(fresh, warmup_steps=2, t_total=10, warmup_multiplier=0.1)
    fresh.load_state_dict(state["opt"])
    fresh_sched.load_state_dict(state["sched"])
    group = fresh.param_groups[0]
    assert float(group["lr"]) == pytest.approx(values[-1]) and group["initial_lr"] is not group["lr"]
    fresh_sched.step()
    assert float(group["initial_lr"]) == pytest.approx(1e-3) and float(group["lr"]) != pytest.approx(values[-1])
