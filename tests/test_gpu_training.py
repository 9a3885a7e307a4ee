"""Training on CUDA: float16 and bfloat16 steps, eager and as CUDA graphs, click prompts, no host sync in the
bundle's steady training loop, and one short ``run training`` epoch. Skipped where CUDA is absent."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.training.clicks import ClickPromptBatch
from ic_moe_monai.training.engines import ICMoETrainer, adamw
from ic_moe_monai.training.losses import ICMoELoss

from .helpers import CONFIGS, make_msd_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZE = 64


def _batches(count: int, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        label = torch.zeros(batch, 1, SIZE, SIZE, dtype=torch.int64)
        label[:, :, 16:36, 12:48] = 1
        label[:, :, 36:44, 12:48] = 2
        image = torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 0.3 + 0.3 * label.float()
        out.append({"image": image.cuda(), "label": label.cuda()})
    return out


def _trainer(dtype: str, cuda_graph: bool, steps: int = 7, prepare_batch=None, network=None):
    torch.manual_seed(0)
    network = network or ICMoE(num_classes=2, img_size=SIZE, encoder="lite").cuda()
    optimizer = adamw([p for p in network.parameters() if p.requires_grad], 1e-3, 0.01, "cuda")
    kwargs = {} if prepare_batch is None else {"prepare_batch": prepare_batch}
    trainer = ICMoETrainer(device="cuda", max_epochs=1, train_data_loader=_batches(steps), network=network,
                           optimizer=optimizer, loss_function=ICMoELoss(num_classes=2), amp=True, amp_dtype=dtype,
                           cuda_graph=cuda_graph, decollate=False, **kwargs)  # fmt: skip
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    return trainer, network, losses


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graphed"])
def test_train_step_is_finite(dtype, cuda_graph, caplog):
    trainer, network, losses = _trainer(dtype, cuda_graph)
    before = [p.detach().clone() for p in network.parameters() if p.requires_grad]
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert len(losses) == 7 and all(torch.isfinite(torch.tensor(losses))), losses
    after = [p.detach() for p in network.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)
    log = caplog.text
    if cuda_graph and dtype == "bfloat16":
        assert "training step captured" in log and any(g is not None for g in trainer._graphs.values())
        assert trainer.scaler is None
    elif cuda_graph:  # float16 needs a GradScaler: the step stays eager, said once
        assert "float16 autocast needs a GradScaler" in log and trainer.scaler is not None
    assert "capture failed" not in log


def test_vit_b_step_as_a_cuda_graph(caplog):
    """SAM's ViT-B encoder (frozen, random weights) with the experts: the bfloat16 step is captured and replayed."""
    torch.manual_seed(0)
    network = ICMoE(num_classes=2, img_size=128, encoder="vit_b").cuda()
    optimizer = adamw([p for p in network.parameters() if p.requires_grad], 2e-4, 0.01, "cuda")
    label = torch.zeros(4, 1, 128, 128, dtype=torch.int64, device="cuda")
    label[:, :, 40:80, 30:90] = 1
    batches = [{"image": torch.rand(4, 3, 128, 128, device="cuda"), "label": label} for _ in range(6)]
    trainer = ICMoETrainer(device="cuda", max_epochs=1, train_data_loader=batches, network=network,
                           optimizer=optimizer, loss_function=ICMoELoss(num_classes=2), amp=True,
                           amp_dtype="bfloat16", cuda_graph=True, decollate=False)  # fmt: skip
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert "training step captured" in caplog.text and "capture failed" not in caplog.text
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_graphed_steps_read_the_learning_rate_from_the_device():
    """The captured optimizer step reads the rate the scheduler writes into the device tensor: a replayed step
    with the rate set to 0 leaves the weights as they are, the next one (rate back) moves them; the schedule
    fills the same tensor without a host sync."""
    from ic_moe_monai.training.engines import WarmupCosineSchedule

    trainer, network, _ = _trainer("bfloat16", True, steps=9)
    lr = trainer.optimizer.param_groups[0]["lr"]
    params = [p for p in network.parameters() if p.requires_grad]
    seen = {}

    def before(engine) -> None:
        if engine.state.iteration in (7, 8):
            lr.fill_(0.0 if engine.state.iteration == 7 else 1e-3)
            seen[engine.state.iteration] = [p.detach().clone() for p in params]

    def after(engine) -> None:
        if engine.state.iteration in (7, 8):
            kept = seen[engine.state.iteration]
            seen[engine.state.iteration] = all(torch.equal(a, p) for a, p in zip(kept, params, strict=True))

    trainer.add_event_handler(Events.ITERATION_STARTED, before)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, after)
    trainer.run()
    assert any(g is not None for g in trainer._graphs.values())
    assert seen == {7: True, 8: False}
    scheduler = WarmupCosineSchedule(trainer.optimizer, warmup_steps=2, t_total=8, warmup_multiplier=0.1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.optimizer.param_groups[0]["lr"] is lr and lr.is_cuda


def test_clicked_batches_train_on_cuda(caplog):
    """Click prompts on every batch: the click-placing forward runs as a graph; the clicked step is a graph where
    the network's prompt path can be captured, else eager with one log line; losses stay finite either way."""
    network = ICMoE(num_classes=2, img_size=SIZE, encoder="lite").cuda()
    clicks = ClickPromptBatch(network, prob=1.0, amp=True, amp_dtype="bfloat16", num_classes=2, cuda_graph=True)
    trainer, _, losses = _trainer("bfloat16", True, steps=8, prepare_batch=clicks, network=network)
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert "click prompts captured" in caplog.text
    assert "training step captured" in caplog.text or "capture failed" in caplog.text


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory, hippocampus_dir):
    return make_msd_folder(hippocampus_dir, tmp_path_factory.mktemp("data") / "Task04_Hippocampus", 6)


def test_steady_bundle_iterations_never_sync(tmp_path, tiny_task):
    """The bundle's own trainer (device sampling and augmentation, graph replay, loss averaging, scheduler,
    decollation): between logging iterations, nothing waits for the device (CUDA's sync debug mode raises)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    for key, value in {"dataset_dir": str(tiny_task), "ckpt_dir": str(tmp_path / "models"), "max_train_cases": 4,
                       "max_val_cases": 1, "output_dir": str(tmp_path / "eval"), "num_workers": 0, "max_epochs": 1,
                       "steps_per_epoch": 14, "val_interval": 100, "resume": False}.items():  # fmt: skip
        parser[key] = value
    trainer = parser.get_parsed_content("train#trainer")
    checked = []

    def strict(engine) -> None:  # before fetching batch `iteration + 1`
        if 5 <= engine.state.iteration < 8:  # iterations 6-8: after warm-up (1-3) and capture (4); logs at 10, 14
            torch.cuda.set_sync_debug_mode("error")

    def relax(engine) -> None:
        if torch.cuda.get_sync_debug_mode() != 0:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(engine.state.iteration)

    trainer.add_event_handler(Events.GET_BATCH_STARTED, strict)  # the batch is drawn inside the checked span
    trainer.add_event_handler(Events.ITERATION_COMPLETED, relax)  # after every bundle handler
    try:
        trainer.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == [6, 7, 8] and any(g is not None for g in trainer._graphs.values())


def test_one_training_epoch_of_the_bundle_on_cuda(tmp_path, tiny_task):
    from .test_bundle import TINY, bundle_cli

    tiny = [*TINY[: TINY.index("--steps_per_epoch")], *TINY[TINY.index("--steps_per_epoch") + 2 :]]
    result = bundle_cli(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(tiny_task),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--max_epochs", "1",
        *tiny, "--steps_per_epoch", "6",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "training step captured" in log and "runs eagerly" not in log
    assert (tmp_path / "models" / "model.pt").is_file()
    ICMoE(num_classes=2, img_size=64, encoder="lite").load_state_dict(
        torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    )
