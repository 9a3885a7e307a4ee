"""The fused IC-MoE layer against a straightforward reference that computes each expert on its own.

The reference below is the layer as first written (each expert: its LayerNorm, down projection, family-specific mix,
up projection; the router on its own LayerNorm; the dense top-k weighted sum), computed from the same parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ic_moe_monai.networks import ICMoE, ICMoELayer
from ic_moe_monai.networks.experts import AdaptiveExpert, BasicExpert, SemanticExpert
from tests.conftest import REPO_ROOT

TOL = {"atol": 1e-5, "rtol": 1e-5}


# ------------------------------------------------------------------------------------------------ reference
def _basic(expert: BasicExpert, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + F.gelu(expert.inner(h))
    return h, expert.classifier(h)


def _semantic(expert: SemanticExpert, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, gh, gw, c = h.shape
    tokens = h.reshape(b, gh * gw, c)
    q = expert.to_q(expert.prototypes)
    attn = torch.softmax(q @ expert.to_k(tokens).transpose(1, 2) * expert.scale, dim=-1)
    protos = expert.proto_norm(expert.prototypes + attn @ expert.to_v(tokens))
    similarity = tokens @ protos.transpose(1, 2) * expert.scale
    mixed = tokens + torch.softmax(similarity, dim=-1) @ protos
    return mixed.reshape(b, gh, gw, c), similarity.reshape(b, gh, gw, -1)


def _adaptive(expert: AdaptiveExpert, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, gh, gw, c = h.shape
    weights = torch.softmax(expert.gate(h.mean(dim=(1, 2))), dim=-1)
    out = expert.candidates(h.permute(0, 3, 1, 2)).reshape(b, c, expert.num_kernels, gh, gw)
    out = (out * weights[:, None, :, None, None]).sum(dim=2)
    h = h + F.gelu(out.permute(0, 2, 3, 1))
    return h, expert.classifier(h)


def reference_layer(layer: ICMoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    deltas, votes = [], []
    for expert in layer.experts:
        h = F.gelu(expert.down(expert.norm(x)))
        mix = {BasicExpert: _basic, SemanticExpert: _semantic, AdaptiveExpert: _adaptive}[type(expert)]
        h, vote = mix(expert, h)
        deltas.append(expert.up(h))
        votes.append(vote)
    logits = layer.router.score(layer.router.norm(x))
    top, index = logits.topk(layer.router.top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))
    delta = (torch.stack(deltas, dim=-2) * weights.unsqueeze(-1)).sum(dim=-2)
    aux = {"expert_logits": torch.stack(votes, dim=-2), "router_logits": logits, "router_weights": weights}
    return x + delta, aux


def trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero random values everywhere (fresh experts have zero output projections and would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise * (0.3 if p.ndim > 1 else 0.1))
    return module


LAYERS = {
    "default": {},
    "two semantic, three dilations": {"num_basic": 1, "num_semantic": 2, "adaptive_dilations": (1, 2, 3)},
    "repeated dilations": {"num_basic": 2, "num_semantic": 1, "adaptive_dilations": (1, 1, 3, 2, 2)},
    "no basic, one adaptive": {"num_basic": 0, "num_semantic": 1, "adaptive_dilations": (2,)},
    "basic only": {"num_basic": 3, "num_semantic": 0, "adaptive_dilations": ()},
}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("config", list(LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_layer_equals_reference(config, mode):
    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16, **LAYERS[config]))
    layer.train(mode == "train")
    x = torch.randn(2, 6, 5, 48)
    with torch.no_grad():
        out, aux = layer(x)
        ref, ref_aux = reference_layer(layer, x)
    torch.testing.assert_close(out, ref, **TOL)
    assert (out - x).abs().max() > 0.1  # the experts contribute
    for key in ("router_logits", "router_weights"):
        torch.testing.assert_close(aux[key], ref_aux[key], **TOL)
    if mode == "train":
        torch.testing.assert_close(aux["expert_logits"], ref_aux["expert_logits"], **TOL)
    else:
        assert "expert_logits" not in aux  # only the losses need the votes


@pytest.mark.parametrize("config", ["default", "two semantic, three dilations"])
def test_fused_layer_gradients_equal_reference(config):
    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16, **LAYERS[config])).train()
    x = torch.randn(2, 6, 5, 48, requires_grad=True)
    grads = []
    for forward in (layer, lambda t: reference_layer(layer, t)):
        layer.zero_grad()
        x.grad = None
        out, aux = forward(x)
        torch.manual_seed(1)  # the same random projection of every output for both
        loss = sum((t * torch.randn_like(t)).sum() for t in (out, aux["expert_logits"], aux["router_logits"]))
        loss = loss + (aux["router_weights"] * torch.randn_like(aux["router_weights"])).sum()
        loss.backward()
        grads.append({"x": x.grad.clone()} | {n: p.grad.clone() for n, p in layer.named_parameters()})
    fused, reference = grads
    assert fused.keys() == reference.keys()
    for name in reference:
        scale = reference[name].abs().max()
        assert scale > 0, name
        # relative to each gradient's own scale: the summed random projections make some gradients large
        assert (fused[name] - reference[name]).abs().max() <= 1e-5 * scale, name


def test_each_expert_forward_equals_reference():
    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16))
    x = torch.randn(2, 6, 5, 48)
    mixes = {BasicExpert: _basic, SemanticExpert: _semantic, AdaptiveExpert: _adaptive}
    with torch.no_grad():
        for expert in layer.experts:
            delta, vote = expert(x)
            h, ref_vote = mixes[type(expert)](expert, F.gelu(expert.down(expert.norm(x))))
            torch.testing.assert_close(delta, expert.up(h), **TOL)
            torch.testing.assert_close(vote, ref_vote, **TOL)


def test_adaptive_experts_share_a_convolution_per_run_of_one_dilation():
    layer = ICMoELayer(dim=48, num_classes=3, hidden_dim=16, num_basic=0, adaptive_dilations=(1, 1, 3, 2, 2))
    group = layer.fused_weights().adaptive
    assert [(r.start, r.stop, r.dilation) for r in group.runs] == [(0, 2, (1, 1)), (2, 3, (3, 3)), (3, 5, (2, 2))]
    assert group.runs[0].kernels.shape == (2 * 16 * 4, 1, 3, 3)


def test_inference_reuses_prepared_weights_until_parameters_change():
    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16)).eval()
    x = torch.randn(1, 4, 4, 48)
    with torch.no_grad():
        layer(x)
        first = layer.__dict__["_weights_cache"][1]
        layer(x)
        assert layer.__dict__["_weights_cache"][1] is first  # reused
        layer.experts[0].up.weight.mul_(2.0)  # an in-place update, as an optimiser step makes
        out, _ = layer(x)
        assert layer.__dict__["_weights_cache"][1] is not first
        torch.testing.assert_close(out, reference_layer(layer, x)[0], **TOL)
        layer.load_state_dict(trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16), seed=5).state_dict())
        torch.testing.assert_close(layer(x)[0], reference_layer(layer, x)[0], **TOL)
        layer.double()
        out, _ = layer(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference_layer(layer, x.double())[0], **TOL)
    # with autograd the weights are prepared anew, differentiably, and the cache is not touched
    layer.float()
    out, _ = layer(x)
    out.sum().backward()
    assert layer.experts[0].down.weight.grad is not None
    assert "_weights_cache" not in layer.__dict__


def test_shipped_model_loads_and_matches_reference():
    """The bundle's trained ``lite`` model loads strictly, and its fused layers compute the reference's outputs."""
    path = REPO_ROOT / "bundle" / "models" / "model.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite")
    model.load_state_dict(state, strict=True)
    assert set(model.state_dict()) == set(state)
    torch.manual_seed(0)
    x = model.preprocess(torch.rand(2, 3, 64, 64))
    layers = {int(k): v for k, v in model.moe_layers.items()}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            tokens, aux = model.encode_tokens(x)
            ref = model.image_encoder.patch_embed(x) + model.image_encoder.pos_embed
            ref_aux = []
            for i, block in enumerate(model.image_encoder.blocks):
                ref = block(ref)
                if i in layers:
                    ref, layer_aux = reference_layer(layers[i], ref)
                    ref_aux.append(layer_aux)
        torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-5)
        for got, want in zip(aux, ref_aux, strict=True):
            for key in got:
                torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-5)


def test_inference_cache_follows_autocast():
    """Weights prepared under autocast are kept apart from the full-precision ones."""
    torch.manual_seed(0)
    layer = trained_like(ICMoELayer(dim=48, num_classes=3, hidden_dim=16)).eval()
    x = torch.randn(1, 4, 4, 48)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = layer(x)
        assert layer.__dict__["_weights_cache"][1].down[0].dtype == torch.bfloat16
        full, _ = layer(x)
        assert layer.__dict__["_weights_cache"][1].down[0].dtype == torch.float32
        reference = reference_layer(layer, x)[0]
    torch.testing.assert_close(full, reference, **TOL)
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
