"""The bundle's training engine: MONAI's ``SupervisedTrainer`` with bfloat16 autocast and the step as a CUDA graph.

On a GPU the eager training step is bound by the host: a few thousand small kernels, each launched from Python,
for a device that is busy a fraction of that time. :class:`ICMoETrainer` records the whole step (forward, loss,
backward, optimizer step) once as a ``torch.cuda.CUDAGraph`` and replays it per iteration, following the
whole-network capture recipe of PyTorch's CUDA graph documentation: a few eager warm-up iterations on a side stream,
static input buffers the batch is copied into, an optimizer whose step reads its learning rate from the device
(:func:`adamw`). Everywhere the graph cannot be used, the step runs eagerly, as MONAI's trainer runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.optimizers import WarmupCosineSchedule as _MonaiWarmupCosineSchedule
from monai.utils.enums import CommonKeys as Keys
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ic_moe_monai.amp import needs_grad_scaler, resolve_amp_dtype
from ic_moe_monai.errors import config_flag

logger = logging.getLogger(__name__)

__all__ = [
    "GraphedFunction",
    "ICMoETrainer",
    "WarmupCosineSchedule",
    "adamw",
    "capture_graph",
    "decollate_without_sync",
]


def adamw(
    params: Any, lr: float, weight_decay: float = 0.01, device: torch.device | str | None = None, **kwargs: Any
) -> torch.optim.AdamW:
    """AdamW that a CUDA graph can capture on a GPU, and PyTorch's default AdamW elsewhere.

    On CUDA: the fused kernel, ``capturable=True`` (its step counter lives on the device) and the learning rate
    as a device tensor, so that a captured step reads the rate the scheduler sets (PyTorch's schedulers fill a
    tensor rate in place, and ``initial_lr`` is a copy of it, not an alias).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        device: the training device; anything but CUDA gives ``torch.optim.AdamW(params, lr, weight_decay)``.
        kwargs: further ``torch.optim.AdamW`` arguments.
    """
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    rate = torch.tensor(float(lr), dtype=torch.float32, device=device)
    return torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay, fused=True, capturable=True, **kwargs)


class WarmupCosineSchedule(_MonaiWarmupCosineSchedule):
    """MONAI's linear warm-up and cosine decay, without a host sync per step for a tensor learning rate, and
    optionally following a time budget.

    MONAI's version floors the rate at ``end_lr`` with Python's ``max``, which reads a tensor rate on the host (a
    device sync at every iteration after the warm-up); here the floor is a ``clamp_min`` on the device.

    With ``clock`` and ``max_minutes`` (the training's time limit), the schedule's position is the further of the
    step count and the time used: step ``max(t, t_total · seconds / budget)``, so the cosine reaches its end when the
    budget runs out even when ``max_epochs`` would have taken longer (and at ``t_total`` when the epochs end
    first). The clock is read on the host; nothing waits for the device.

    Args:
        optimizer, warmup_steps, t_total, end_lr, cycles, last_epoch, warmup_multiplier: as MONAI's.
        clock: an object with ``seconds()`` (the training time so far, e.g.
            :class:`~ic_moe_monai.training.handlers.TrainingClock`).
        max_minutes: the time budget; None or ≤ 0: the schedule follows the steps only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, t_total: int, end_lr: float = 0.0,
                 cycles: float = 0.5, last_epoch: int = -1, warmup_multiplier: float = 0,
                 clock: Any = None, max_minutes: float | None = None) -> None:  # fmt: skip
        # set before MONAI's __init__, which takes the first step
        self.clock = clock
        self.max_seconds = float(max_minutes) * 60 if clock is not None and max_minutes and max_minutes > 0 else None
        super().__init__(optimizer, warmup_steps, t_total, end_lr=end_lr, cycles=cycles, last_epoch=last_epoch,
                         warmup_multiplier=warmup_multiplier)  # fmt: skip

    def position(self) -> float:
        """The schedule's step: the step count, or further on where the time budget is further used up."""
        step = float(self.last_epoch)
        if self.max_seconds is None or step < self.warmup_steps:
            return step
        return max(step, self.t_total * min(1.0, self.clock.seconds() / self.max_seconds))

    def get_lr(self) -> list[float | torch.Tensor]:
        position = self.position()
        rates = []
        for lmbda, base_lr in zip(self.lr_lambdas, self.base_lrs, strict=True):
            rate = base_lr * lmbda(position)
            if self.last_epoch >= self.warmup_steps:
                rate = rate.clamp_min(self.end_lr) if isinstance(rate, torch.Tensor) else max(self.end_lr, rate)
            rates.append(rate)
        return rates

    def state_dict(self) -> dict[str, Any]:
        """MONAI's state dict, without the clock (its time is saved by the training checkpoints on their own)."""
        return {k: v for k, v in super().state_dict().items() if k not in ("clock", "max_seconds")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("clock", "max_seconds")})


def decollate_without_sync(data: Any) -> Any:
    """A batch dict → one dict per item, as MONAI's ``decollate_batch``, without reading values on the host.

    MONAI's decollation turns 0-dim tensors (the loss) into Python numbers, one device sync per iteration; here they
    stay (detached) tensors, shared by every item, and batched tensors become per-item views. Anything that is not
    a dict with a batched tensor is returned as it is.
    """
    if not isinstance(data, Mapping):
        return data
    leaves, _ = tree_flatten(dict(data))
    sizes = [leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.ndim > 0]
    return data if not sizes else _split(data, sizes[0])


def _split(value: Any, size: int) -> list[Any]:
    if isinstance(value, Mapping):
        parts = {key: _split(item, size) for key, item in value.items()}
        return [{key: part[i] for key, part in parts.items()} for i in range(size)]
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.ndim > 0 and value.shape[0] == size:
            return list(value.unbind(0))
    return [value] * size


def capture_graph(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` captured into a new ``torch.cuda.CUDAGraph`` on ``device``: (the graph, ``fn``'s outputs).

    Each capture gets a stream of its own, and a failed capture gives the current stream back: ``torch.cuda.graph``
    leaves its capture stream current when ending the capture raises, and PyTorch's allocator may keep routing
    that stream's allocations to the failed capture's pool, so neither must be used again.
    """
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
                outputs = fn()
        except BaseException:
            torch.cuda.set_stream(current)
            raise
    return graph, outputs


class _SideStream:
    """Runs warm-up work on a side stream, ordered after and before the current stream's work, as PyTorch's CUDA
    graph recipe has the iterations before a capture run."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, device: torch.device, fn: Callable[[], Any]) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            out = fn()
        torch.cuda.current_stream(device).wait_stream(self._stream)
        return out


class GraphedFunction:
    """``fn(*tensors)`` replayed as a CUDA graph: a few eager calls on a side stream, then one capture per kind of
    input (shapes, dtypes, device), replayed with the inputs copied into static buffers.

    For work without gradients around the training step (e.g. the forward that places simulated clicks). Runs
    eagerly when ``enabled`` is False, for inputs not on CUDA, for more than ``max_graphs`` kinds of input, and
    after a capture that fails (said once in the log). A replay returns the graph's static outputs: they are
    overwritten by the next call.

    Args:
        fn: takes tensors, returns a tensor or a structure of tensors; must not read device values on the host.
        enabled: use CUDA graphs at all.
        warmup: eager calls of a kind of input before it is captured.
        max_graphs: kinds of input captured at most.
        name: what the log lines call it.
    """

    def __init__(self, fn: Callable[..., Any], enabled: bool = True, warmup: int = 2, max_graphs: int = 2,
                 name: str = "function") -> None:  # fmt: skip
        self.fn, self.enabled, self.warmup, self.max_graphs, self.name = fn, enabled, max(1, warmup), max_graphs, name
        self._graphs: dict[Hashable, tuple[Callable[[], None], list[torch.Tensor], Any] | None] = {}
        self._calls: dict[Hashable, int] = {}
        self._side_stream = _SideStream()
        self._kept: list[torch.cuda.CUDAGraph] = []

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not self._usable(inputs):
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                return self.fn(*inputs)
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] <= self.warmup:
                return self._on_side_stream(inputs[0].device, lambda: self.fn(*inputs))
            self._graphs[key] = self._capture(inputs)
        captured = self._graphs[key]
        if captured is None:
            return self.fn(*inputs)
        replay, static, outputs = captured
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        replay()
        return outputs

    def _usable(self, inputs: Sequence[Any]) -> bool:
        return self.enabled and all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)

    def _on_side_stream(self, device: torch.device, fn: Callable[[], Any]) -> Any:
        return self._side_stream(device, fn)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> tuple[Callable[[], None], list[torch.Tensor], Any] | None:
        static = [t.clone() for t in inputs]
        try:
            replay, outputs = self._record(lambda: self.fn(*static), inputs[0].device)
        except Exception as err:
            if inputs[0].is_cuda:
                torch.cuda.synchronize(inputs[0].device)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            logger.warning("cuda_graph: capture of %s failed (%s: %s); it runs eagerly.", self.name,
                           type(err).__name__, first)  # fmt: skip
            return None
        logger.info("cuda_graph: %s captured for inputs of shapes %s.", self.name, [tuple(t.shape) for t in inputs])
        return replay, static, outputs

    def _record(self, fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any]:
        graph, outputs = capture_graph(fn, device)
        self._kept.append(graph)
        return graph.replay, outputs


class _CapturedStep:
    """One captured training step: its replay, static inputs and outputs, and the gradients it writes."""

    def __init__(self, replay: Callable[[], None], static: list[Any], pred: Any, loss: torch.Tensor,
                 grads: list[torch.Tensor | None]) -> None:  # fmt: skip
        self._replay, self.static = replay, static
        self.pred, self.loss = pred, loss
        self.grads = grads  # kept alive: the graph's optimizer step reads them where the backward wrote them

    def replay(self, leaves: list[Any]) -> None:
        for buffer, value in zip(self.static, leaves, strict=True):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value, non_blocking=True)
        self._replay()


class ICMoETrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` with an autocast dtype of choice and the training step as a CUDA graph.

    - ``amp`` autocasts in ``amp_dtype`` (``"auto"``: bfloat16 where the GPU has it); a ``GradScaler`` is made for
      float16 only (MONAI's trainer makes one whenever ``amp`` is on, and autocasts to float16).
    - ``cuda_graph``: on CUDA, each kind of batch (shapes, dtypes and keyword arguments; e.g. with and without
      click prompts) runs ``graph_warmup`` eager iterations on a side stream, is then captured (forward, loss,
      backward, ``optimizer.step()``) into a ``torch.cuda.CUDAGraph``, and replayed from then on, the batch copied
      into the graph's static inputs. The optimizer must be capturable: fused or capturable AdamW with a device
      tensor learning rate (:func:`adamw`). The step runs eagerly, with one log line saying why, where a graph
      cannot be used: not CUDA, DistributedDataParallel, a float16 grad scaler, gradient accumulation, an optimizer
      that is not capturable, more than ``max_graphs`` kinds of batch, or a capture that fails.
    - The same ignite ``IterationEvents`` fire as in the parent (for a replayed step, after it: handlers see the
      results, they cannot act between forward and backward). ``engine.state.output`` holds ``image``, ``label``,
      ``pred`` and ``loss``; a replayed step's ``pred`` and ``loss`` are the graph's static outputs, overwritten
      by the next replay (clone what you keep).
    - ``decollate`` splits the output per item as MONAI does, but leaves the loss a device tensor (MONAI's
      decollation reads it on the host, which waits for the device every iteration).
    - A data loader with ``set_epoch(epoch)`` (:class:`~ic_moe_monai.training.slice_sampling.DeviceSliceLoader`) is told
      each epoch's number when it starts, so its random draws depend on the epoch (and a resumed run goes on).

    Args:
        amp_dtype: ``"auto"``, ``"bfloat16"`` / ``"float16"`` or a dtype (see :mod:`ic_moe_monai.amp`).
        cuda_graph: capture and replay the step on CUDA.
        graph_warmup: eager iterations of a kind of batch before it is captured.
        max_graphs: kinds of batch captured at most (each graph keeps its own activation memory).
        kwargs: the arguments of ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        amp: bool = False,
        amp_dtype: str | torch.dtype | None = "auto",
        cuda_graph: bool = False,
        graph_warmup: int = 3,
        max_graphs: int = 2,
        **kwargs: Any,
    ) -> None:
        device = torch.device(device)
        amp = config_flag(amp, "amp")  # "--amp false" arrives as a string
        self.amp_dtype = resolve_amp_dtype(amp_dtype, device)
        amp_kwargs = {**(kwargs.pop("amp_kwargs", None) or {}), "dtype": self.amp_dtype}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            amp=amp,
            amp_kwargs=amp_kwargs,
            **kwargs,
        )
        self.cuda_graph = config_flag(cuda_graph, "cuda_graph")
        self.graph_warmup = max(1, int(graph_warmup))
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, _CapturedStep | None] = {}  # None: this kind of batch runs eagerly
        self._warmups: dict[Hashable, int] = {}
        self._side_stream = _SideStream()
        self._keep_graphs: list[torch.cuda.CUDAGraph] = []
        self._reported: set[str] = set()
        self._graphs_usable: bool | None = None  # decided at the first iteration (after a resumed state is loaded)
        if callable(getattr(train_data_loader, "set_epoch", None)):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: train_data_loader.set_epoch(engine.state.epoch))

    # ------------------------------------------------------------------------------------------------ set-up
    def run(self) -> None:  # type: ignore[override]
        self.scaler = torch.amp.GradScaler("cuda") if self._uses_scaler() else None
        Workflow.run(self)  # not Trainer.run: it would make a float16 GradScaler whenever amp is on

    def _uses_scaler(self) -> bool:
        return self.state.device.type == "cuda" and needs_grad_scaler(self.amp, self.amp_dtype)

    def _register_decollate(self) -> None:
        @self.on(IterationEvents.MODEL_COMPLETED)
        def _decollate(engine: ICMoETrainer) -> None:
            engine.state.batch = decollate_without_sync(engine.state.batch)
            engine.state.output = decollate_without_sync(engine.state.output)

    def _autocast(self, **kwargs: Any) -> AbstractContextManager:
        if not self.amp or self.state.device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, **kwargs)

    def _report(self, message: str, warning: bool = False) -> None:
        """Log each reason for running eagerly once."""
        if message not in self._reported:
            self._reported.add(message)
            (self.logger.warning if warning else self.logger.info)(message)

    def _why_not_graphed(self) -> str | None:
        """Why no step of this run can be a CUDA graph, or None."""
        reason = None
        if self.state.device.type != "cuda" or not torch.cuda.is_available():
            reason = f"the device is {self.state.device}"
        elif isinstance(self.network, torch.nn.parallel.DistributedDataParallel):
            reason = "the network is DistributedDataParallel"
        elif self.scaler is not None:
            reason = "float16 autocast needs a GradScaler (use bfloat16)"
        elif self.accumulation_steps > 1:
            reason = "gradients are accumulated over several iterations"
        elif not all(_capturable_group(group) for group in self.optimizer.param_groups):
            reason = (
                "the optimizer is not capturable (use ic_moe_monai.training.engines.adamw: fused, capturable, "
                "a device-tensor learning rate)"
            )
        return None if reason is None else f"cuda_graph: training step runs eagerly: {reason}."

    # ------------------------------------------------------------------------------------------------ iteration
    def _iteration(self, engine: ICMoETrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = (*batch, (), {}) if len(batch) == 2 else batch
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()

        if self._graphs_usable is None:
            reason = self._why_not_graphed() if self.cuda_graph else None
            if reason is not None:
                self._report(reason)
            self._graphs_usable = self.cuda_graph and reason is None
        if self._graphs_usable:
            self._graphed_iteration(engine, inputs, targets, args, kwargs)
        else:
            self._eager_step(engine, inputs, targets, args, kwargs)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _eager_step(self, engine: ICMoETrainer, inputs: Any, targets: Any, args: Sequence, kwargs: dict) -> None:
        """The parent's step, with autocast in ``amp_dtype`` and a scaler only where one is needed."""
        acc = engine.accumulation_steps
        local = (engine.state.iteration - 1) % (engine.state.epoch_length or engine.state.iteration)
        should_zero_grad = acc == 1 or local % acc == 0
        should_step = acc == 1 or (local + 1) % acc == 0 or (local + 1) == engine.state.epoch_length
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with self._autocast():
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]
        loss = loss / acc if acc > 1 else loss
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if should_step:
            if engine.scaler is not None:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()

    # ------------------------------------------------------------------------------------------------ CUDA graphs
    def _graphed_iteration(self, engine: ICMoETrainer, inputs: Any, targets: Any, args: Sequence, kwargs: dict) -> None:
        leaves, spec = tree_flatten((_plain(inputs), _plain(targets), tuple(args), dict(kwargs)))
        key = _batch_key(leaves, spec)
        if key is None or (key not in self._graphs and len(self._graphs) >= self.max_graphs):
            why = "a batch with non-tensor arguments" if key is None else f"more than {self.max_graphs} batch kinds"
            self._report(f"cuda_graph: {why}: such steps run eagerly.")
            self._eager_step(engine, inputs, targets, args, kwargs)
            return
        if key not in self._graphs:
            if self._warmups.get(key, 0) < self.graph_warmup:  # eager, on a side stream, as the recipe has it
                self._warmups[key] = self._warmups.get(key, 0) + 1
                self._on_side_stream(lambda: self._eager_step(engine, inputs, targets, args, kwargs))
                return
            self._graphs[key] = self._capture(engine, leaves, spec)
        step = self._graphs[key]
        if step is None:
            self._eager_step(engine, inputs, targets, args, kwargs)
            return
        step.replay(leaves)
        engine.state.output[Keys.PRED] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, step.pred)
        engine.state.output[Keys.LOSS] = step.loss.detach()
        for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                      IterationEvents.BACKWARD_COMPLETED):  # fmt: skip
            engine.fire_event(event)

    def _on_side_stream(self, fn: Callable[[], None]) -> None:
        self._side_stream(self.state.device, fn)

    def _capture(self, engine: ICMoETrainer, leaves: list[Any], spec: Any) -> _CapturedStep | None:
        """Record forward, loss, backward and optimizer step on static copies of this batch; None if that fails."""
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        inputs, targets, args, kwargs = tree_unflatten(static, spec)

        def step() -> tuple[Any, torch.Tensor]:
            with self._autocast(cache_enabled=False):  # no autocast weight cache across capture and replay
                pred = engine.inferer(inputs, engine.network, *args, **kwargs)
                loss = engine.loss_function(pred, targets).mean()
            loss.backward()
            engine.optimizer.step()
            return pred, loss

        engine.optimizer.zero_grad(set_to_none=True)  # the backward in the graph allocates (and writes) the grads
        try:
            replay, (pred, loss) = self._record(step)
        except Exception as err:  # the step is not capturable: train this kind of batch eagerly
            if self.state.device.type == "cuda":
                torch.cuda.synchronize(self.state.device)
            engine.optimizer.zero_grad(set_to_none=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._report(f"cuda_graph: capture failed ({type(err).__name__}: {first}); such steps run eagerly.", True)
            return None
        grads = [p.grad for group in engine.optimizer.param_groups for p in group["params"]]
        shapes = [tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor)]
        self.logger.info("cuda_graph: training step captured for inputs of shapes %s; replayed from now on.", shapes)
        return _CapturedStep(replay, static, pred, loss, grads)

    def _record(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Capture ``fn`` as a CUDA graph: (its replay, its static outputs). Its kernels run at each replay only."""
        graph, outputs = capture_graph(fn, self.state.device)
        self._keep_graphs.append(graph)
        return graph.replay, outputs


def _plain(value: Any) -> Any:
    """A MetaTensor as a plain tensor (its metadata is not needed by the step)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _batch_key(leaves: list[Any], spec: Any) -> Hashable | None:
    """What must match for a batch to replay a graph: the structure, each tensor's shape, dtype and device, and
    every other argument's value; None when an argument is not hashable."""
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            parts.append(leaf)
    return str(spec), tuple(parts)


def _capturable_group(group: Mapping[str, Any]) -> bool:
    """A param group whose step a CUDA graph can record and that reads its learning rate from the device."""
    lr = group.get("lr")
    on_cuda = all(p.is_cuda for p in group["params"])
    return (
        bool(group.get("capturable") or group.get("fused")) and isinstance(lr, torch.Tensor) and lr.is_cuda and on_cuda
    )
