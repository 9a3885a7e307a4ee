"""ICMoE: shapes, zero-init equivalence, prompts, frozen encoder under training, tracing."""

from __future__ import annotations

import pytest
import torch

from ic_moe_monai.networks import ICMoE, count_parameters
from ic_moe_monai.training.losses import ICMoELoss


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("encoder", "img_size"), [("lite", 64), ("vit_b", 256)])
def test_fresh_experts_leave_encoder_unchanged(encoder, img_size):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder).eval()
    for name, p in model.image_encoder.named_parameters():  # SAM starts them at zero; trained ones are not
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.05)
    x = model.preprocess(torch.rand(2, 3, img_size, img_size))
    with torch.no_grad():
        encoded = model.encode(x)
        # fresh experts add exactly zero: bit-equal to the same block loop without them
        assert torch.equal(encoded, model.encode(x, experts=False))
        # the block loop computes SAM's attention through scaled_dot_product_attention: equal up to rounding
        torch.testing.assert_close(encoded, model.image_encoder(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("encoder", "img_size", "grid"), [("vit_b", 256, 16), ("vit_b", 512, 32), ("lite", 64, 16)])
def test_output_shapes(encoder, img_size, grid):
    model = ICMoE(num_classes=3, img_size=img_size, encoder=encoder)
    x = torch.rand(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, 4, img_size, img_size)
    model.train()
    out = model(x)
    layers = len(model.moe_blocks)
    assert out["logits"].shape == (1, 4, img_size, img_size)
    assert out["expert_logits"].shape == (1, layers, grid, grid, 5, 4)
    assert out["router_logits"].shape == (1, layers, grid, grid, 5)
    assert out["router_weights"].shape == (1, layers, grid, grid, 5)
    assert out["embeddings"].shape == (1, grid, grid, 128)


def test_moe_blocks_default_to_second_half():
    assert ICMoE(num_classes=1, img_size=256, encoder="vit_b").moe_blocks == list(range(6, 12))
    assert ICMoE(num_classes=1, img_size=64, encoder="lite", moe_blocks=[0, 5]).moe_blocks == [0, 5]
    with pytest.raises(ValueError, match="moe_blocks"):
        ICMoE(num_classes=1, img_size=64, encoder="lite", moe_blocks=[6])


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="encoder must be one of"):
        ICMoE(num_classes=1, encoder="vit_x")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ICMoE(num_classes=1, encoder="vit_b", img_size=250)
    model = ICMoE(num_classes=1, img_size=64, encoder="lite").eval()
    with pytest.raises(ValueError, match=r"expects input \(B, 3, 64, 64\), got \(1, 3, 32, 32\)"):
        model(torch.rand(1, 3, 32, 32))


def test_vit_b_trainable_share():
    trainable, total = count_parameters(ICMoE(num_classes=2, img_size=256, encoder="vit_b"))
    assert trainable / total <= 0.15


def test_prompts_are_batch_aligned():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").eval()
    x = torch.rand(2, 3, 64, 64)
    points = torch.tensor([[[10.0, 12.0], [40.0, 30.0]], [[20.0, 50.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 20.0, 60.0, 50.0]])
    with torch.no_grad():
        plain = model(x)
        prompted = model(x, points=points, point_labels=labels)
        single = model(x[1:], points=points[1:], point_labels=labels[1:])
        boxed = model(x, boxes=boxes)
        both = model(x, points=points, point_labels=labels, boxes=boxes)
    assert not torch.allclose(plain, prompted)
    assert not torch.allclose(plain, boxed)
    assert not torch.allclose(boxed, both)
    # image 1 with its own prompt gives the same answer alone as inside the batch
    torch.testing.assert_close(prompted[1:], single, atol=1e-5, rtol=1e-5)
    # the cached-embedding path gives the forward's answer
    with torch.no_grad():
        embedding, image = model.image_features(x)
        cached = model.predict_from_embedding(embedding, image, points=points, point_labels=labels)
    torch.testing.assert_close(cached, prompted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="point_labels"):
        model(x, points=points)
    with pytest.raises(ValueError, match="boxes must be"):
        model(x, boxes=boxes[:1])


def test_training_steps_change_experts_router_decoder_not_encoder():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=256, encoder="vit_b")
    encoder_before = _snapshot(model.image_encoder)
    prompt_before = _snapshot(model.prompt_encoder)
    experts_before = _snapshot(model.moe_layers)
    decoder_before = _snapshot(model.mask_decoder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = ICMoELoss(num_classes=2)
    x = torch.rand(1, 3, 256, 256)
    y = torch.zeros(1, 1, 256, 256, dtype=torch.long)
    y[:, :, 64:128, 64:160] = 1
    y[:, :, 150:200, 100:140] = 2
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    for key, value in _snapshot(model.image_encoder).items():
        assert torch.equal(value, encoder_before[key]), key
    for key, value in _snapshot(model.prompt_encoder).items():
        assert torch.equal(value, prompt_before[key]), key
    after = _snapshot(model.moe_layers)
    for family in ("experts.0.", "experts.2.", "experts.3.", "router."):  # basic, semantic, adaptive, router
        changed = [k for k in after if f".{family}" in k and not torch.equal(after[k], experts_before[k])]
        assert changed, f"nothing changed in {family}"
    # every expert's up-projection has left zero, so the experts now contribute
    assert all(not torch.equal(after[k], experts_before[k]) for k in after if k.endswith("up.weight"))
    decoder_after = _snapshot(model.mask_decoder)
    assert not torch.equal(decoder_after["mask_tokens.weight"], decoder_before["mask_tokens.weight"])
    assert not torch.equal(
        decoder_after["transformer.layers.0.mlp.lin1.weight"], decoder_before["transformer.layers.0.mlp.lin1.weight"]
    )


@pytest.mark.parametrize(("encoder", "img_size"), [("lite", 64), ("vit_b", 256)])
def test_traced_equals_eager(tmp_path, encoder, img_size):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder)
    for p in model.moe_layers.parameters():  # make the experts contribute, as after training
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else None
    model.eval()
    x = torch.rand(2, 3, img_size, img_size)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        path = tmp_path / "model.ts"
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        other = torch.rand(3, 3, img_size, img_size)  # another batch size than the one traced
        assert (loaded(other) - model(other)).abs().max() <= 1e-4
        assert (loaded(x) - model(x)).abs().max() <= 1e-4


def test_detail_branch_starts_as_identity_and_learns():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite", freeze_encoder=False).eval()
    assert model.detail_branch is not None  # on by default for lite, off for SAM sizes
    assert ICMoE(num_classes=1, img_size=256, encoder="vit_b").detail_branch is None
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with_branch = model(x)
        branch, model.detail_branch = model.detail_branch, None
        without = model(x)
        model.detail_branch = branch
    assert torch.equal(with_branch, without)
    model.train()
    loss = ICMoELoss(num_classes=2)(model(x), torch.randint(0, 3, (2, 1, 64, 64)))
    loss.backward()
    assert model.detail_branch.proj.weight.grad.abs().sum() > 0


def test_prompt_embedding_equals_sam_prompt_encoder():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite")
    torch.nn.init.normal_(model.prompt_encoder.not_a_point_embed.weight)  # any value must reach the padding points
    points = torch.tensor([[[10.0, 12.0], [40.0, 30.0], [3.0, 3.0]], [[20.0, 50.0], [0.0, 0.0], [63.0, 1.0]]])
    labels = torch.tensor([[1, 0, 1], [1, -1, 0]])
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 20.0, 60.0, 50.0]])
    pe = model.prompt_encoder
    with torch.no_grad():
        for kwargs, sam_kwargs in (
            ({"points": points, "point_labels": labels}, {"points": (points, labels), "boxes": None}),
            ({"boxes": boxes}, {"points": None, "boxes": boxes}),
            ({"points": points, "point_labels": labels, "boxes": boxes}, {"points": (points, labels), "boxes": boxes}),
        ):
            sparse, dense = model.embed_prompts(2, **kwargs)
            sam_sparse, sam_dense = pe(masks=None, **sam_kwargs)
            assert torch.equal(sparse, sam_sparse)
            assert torch.equal(dense, sam_dense)


@pytest.mark.parametrize("prompted", [False, True])
def test_train_forward_has_no_host_sync(prompted):
    """Nothing in the training forward waits for the device or has a data-dependent shape (CUDA-graph capturable)."""
    from tests.sync_check import NoHostSync

    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").train()
    x = torch.rand(2, 3, 64, 64)
    prompts = {}
    if prompted:
        prompts = {"points": torch.tensor([[[10.0, 12.0]], [[20.0, 50.0]]]), "point_labels": torch.tensor([[1], [0]])}
    with NoHostSync() as mode:
        out = model(x, **prompts)
        loss = out["logits"].mean() + out["expert_logits"].mean() + out["router_weights"].mean()
    loss.backward()
    assert mode.ops > 100


@pytest.mark.slow
def test_compiled_block_loop_equals_eager():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=32, encoder="lite", moe_blocks=[5])  # one layer: compiles faster
    compiled = ICMoE(num_classes=2, img_size=32, encoder="lite", moe_blocks=[5], compile_blocks=True)
    for p in model.moe_layers.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    compiled.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    model.train(), compiled.train()
    out, out_compiled = model(x), compiled(x)
    for key in out:
        torch.testing.assert_close(out_compiled[key], out[key], atol=1e-4, rtol=1e-4)
    out_compiled["logits"].sum().backward()
    assert compiled.moe_layers["5"].experts[0].up.weight.grad.abs().sum() > 0
    model.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
