"""Mixed precision without a GPU: the network, the losses and the inferer under CUDA autocast's casting policy.

CPU autocast keeps softmax in bfloat16 and so hides dtype mismatches that crash on CUDA (the router's scatter did);
:class:`tests.amp_emulation.CudaAutocastEmulation` casts as CUDA autocast does, on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from ic_moe_monai.amp import needs_grad_scaler, resolve_amp_dtype
from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.networks import ICMoE, ICMoELayer
from ic_moe_monai.networks.voting import TopKRouter
from ic_moe_monai.training.losses import ICMoELoss
from tests.amp_emulation import CudaAutocastEmulation

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulation_casts_like_cuda_autocast(dtype):
    a, b = torch.rand(4, 8), torch.rand(8, 3)
    with CudaAutocastEmulation(dtype) as mode:
        product = a @ b
        probs = torch.softmax(product, dim=-1)
        summed = product.sum()
    assert product.dtype == dtype
    assert probs.dtype == torch.float32 and summed.dtype == torch.float32
    assert mode.calls["low"] == 1 and mode.calls["float32"] == 2
    # a scatter of float32 into float16 fails as it does on CUDA: the emulation does not hide mismatches
    with CudaAutocastEmulation(dtype), pytest.raises(RuntimeError, match="scatter"):
        torch.zeros(2, 3, dtype=dtype).scatter(-1, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_under_cuda_autocast_policy(dtype):
    router = TopKRouter(dim=16, num_experts=5, top_k=2)
    with CudaAutocastEmulation(dtype):
        out = router(torch.randn(2, 4, 4, 16))
    assert torch.allclose(out.weights.float().sum(-1), torch.ones(2, 4, 4), atol=1e-3)
    assert ((out.weights > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("encoder", "img_size"), [("lite", 64), ("vit_b", 128)])
def test_train_step_under_cuda_autocast_policy(dtype, encoder, img_size):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder).train()
    loss_fn = ICMoELoss(num_classes=2)
    x = torch.rand(2, 3, img_size, img_size)
    y = torch.randint(0, 3, (2, 1, img_size, img_size))
    with CudaAutocastEmulation(dtype) as mode:
        out = model(x)
        loss = loss_fn(out, y)
    loss.backward()
    assert mode.calls["low"] > 10 and mode.calls["float32"] > 10
    assert out["logits"].dtype == dtype
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_forward_and_inferer_under_cuda_autocast_policy(dtype):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").eval()
    volume = torch.rand(1, 1, 80, 72, 7)
    inferer = SliceContextInferer(img_size=64, batch_size=4)
    with torch.no_grad():
        reference = inferer(volume, model)
        with CudaAutocastEmulation(dtype):
            emulated = inferer(volume, model)
    assert emulated.shape == reference.shape == (1, 3, 80, 72, 7)
    assert torch.isfinite(emulated).all()
    agreement = (emulated.argmax(1) == reference.argmax(1)).float().mean()
    assert agreement > 0.95


def test_amp_dtype_resolution():
    assert resolve_amp_dtype("bf16") is torch.bfloat16
    assert resolve_amp_dtype("float16") is torch.float16
    assert resolve_amp_dtype(torch.float16) is torch.float16
    assert resolve_amp_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        resolve_amp_dtype("float8")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        resolve_amp_dtype(torch.float32)
    assert needs_grad_scaler(True, torch.float16) and not needs_grad_scaler(True, torch.bfloat16)
    assert not needs_grad_scaler(False, torch.float16)


def _close_in_low_precision(low: torch.Tensor, reference: torch.Tensor, share: float = 0.03) -> bool:
    return bool((low.float() - reference).abs().max() <= share * reference.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_and_attention_under_cuda_autocast_policy(dtype):
    from ic_moe_monai.networks.encoder_blocks import block_forward
    from tests.test_moe_layer import reference_layer, trained_like

    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16))
    x = torch.randn(2, 6, 5, 48)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        with torch.no_grad():
            reference, _ = reference_layer(layer, x)
            with CudaAutocastEmulation(dtype) as emulation:
                out, aux = layer(x)
        assert emulation.calls["low"] > 5
        assert torch.isfinite(out).all() and _close_in_low_precision(out, reference), mode
        assert torch.allclose(aux["router_weights"].float().sum(-1), torch.ones(2, 6, 5), atol=1e-2)
    model = ICMoE(num_classes=1, img_size=128, encoder="vit_b", window_size=14)
    for name, p in model.image_encoder.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.05)
    tokens = torch.randn(1, 8, 8, 768)
    for block in (model.image_encoder.blocks[0], model.image_encoder.blocks[2]):  # windowed (padded), global
        with torch.no_grad():
            reference = block(tokens)
            with CudaAutocastEmulation(dtype) as emulation:
                out = block_forward(block, tokens)
        assert emulation.calls["low"] >= 5  # qkv, rel-pos products, attention, proj, mlp
        assert _close_in_low_precision(out, reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompted_and_cached_paths_under_cuda_autocast_policy(dtype):
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite")
    for p in model.moe_layers.parameters():  # trained-like experts
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x = torch.rand(2, 3, 64, 64)
    prompts = {
        "points": torch.tensor([[[10.0, 12.0], [40.0, 30.0]], [[20.0, 50.0], [0.0, 0.0]]]),
        "point_labels": torch.tensor([[1, 0], [1, -1]]),
        "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 20.0, 60.0, 50.0]]),
    }
    model.eval()
    with torch.no_grad():
        reference = model(x, **prompts)
        with CudaAutocastEmulation(dtype):
            prompted = model(x, **prompts)
            embedding, image = model.image_features(x)
            cached = model.predict_from_embedding(embedding, image, **prompts)
            plain = model(x)
    assert prompted.dtype == cached.dtype == plain.dtype == dtype
    for out in (prompted, cached):
        assert torch.isfinite(out).all()
        assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.95
    model.train()
    y = torch.randint(0, 3, (2, 1, 64, 64))
    with CudaAutocastEmulation(dtype):
        loss = ICMoELoss(num_classes=2)(model(x, **prompts), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
