"""SAM / MedSAM checkpoint loading: exact copies, interpolation, decoder adaptation and clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from segment_anything.modeling.image_encoder import get_rel_pos

from ic_moe_monai.networks import ICMoE, SamCheckpointError
from ic_moe_monai.networks.sam_weights import auto_window_size, detect_sam_variant

GLOBAL_BLOCKS_VIT_B = (2, 5, 8, 11)


def _encoder_keys(model: ICMoE) -> list[str]:
    return [f"image_encoder.{k}" for k in model.image_encoder.state_dict()]


def test_load_at_pretraining_size_copies_every_weight(sam_vit_b_checkpoint, sam_vit_b_state):
    # K = 3 foreground classes -> 4 mask tokens, exactly SAM's count: nothing needs adapting either
    model = ICMoE(num_classes=3, img_size=1024, encoder="vit_b", sam_checkpoint=str(sam_vit_b_checkpoint))
    assert model.window_size == 14  # the automatic window at SAM's own size is SAM's
    report = model.load_report
    assert report.variant == "vit_b"
    assert report.interpolated == []
    assert report.adapted == []
    own = model.state_dict()
    sam_keys = [k for k in own if k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder")]
    assert set(sam_keys) == set(report.loaded)
    for key in sam_keys:
        assert torch.equal(own[key], sam_vit_b_state[key]), key


def test_load_at_256_interpolates_only_size_dependent_tensors(sam_vit_b_checkpoint, sam_vit_b_state):
    # at 256 the automatic window is the whole 16 x 16 grid: every block's tables go to 31 rows, the windowed blocks'
    # from SAM's 27 (window 14), the global blocks' from 127 (a 64 x 64 grid)
    model = ICMoE(num_classes=2, img_size=256, encoder="vit_b", sam_checkpoint=str(sam_vit_b_checkpoint))
    assert model.window_size == 16
    report = model.load_report
    expected = {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{b}.attn.rel_pos_{axis}" for b in range(12) for axis in "hw"
    }
    assert set(report.interpolated) == expected
    own = model.state_dict()
    for key in _encoder_keys(model):
        if key in expected:
            assert own[key].shape != sam_vit_b_state[key].shape
        else:
            assert torch.equal(own[key], sam_vit_b_state[key]), key
    assert own["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
    assert own["image_encoder.blocks.2.attn.rel_pos_h"].shape == (31, 64)
    assert sam_vit_b_state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert own["image_encoder.blocks.0.attn.rel_pos_h"].shape == (31, 64)
    # linear, as SAM's get_rel_pos resizes a table of another length: read its 31 offsets back from its (16, 16) pairs
    for key in ("image_encoder.blocks.0.attn.rel_pos_w", "image_encoder.blocks.2.attn.rel_pos_h"):
        pairs = get_rel_pos(16, 16, sam_vit_b_state[key])  # pairs[q, k] = table[q - k + 15]
        resized = torch.cat([pairs[:, 15], pairs[15, :15].flip(0)])
        torch.testing.assert_close(own[key], resized, atol=1e-6, rtol=1e-6)
    # a constant embedding stays constant through interpolation (no border artefacts in the resize)
    assert torch.allclose(
        own["image_encoder.pos_embed"].mean(), sam_vit_b_state["image_encoder.pos_embed"].mean(), atol=1e-2
    )


def test_load_at_256_with_sam_window_keeps_window_tables(sam_vit_b_checkpoint, sam_vit_b_state):
    model = ICMoE(
        num_classes=2, img_size=256, encoder="vit_b", sam_checkpoint=str(sam_vit_b_checkpoint), window_size=14
    )
    expected = {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{b}.attn.rel_pos_{axis}" for b in GLOBAL_BLOCKS_VIT_B for axis in "hw"
    }
    assert set(model.load_report.interpolated) == expected
    own = model.state_dict()
    assert torch.equal(
        own["image_encoder.blocks.0.attn.rel_pos_h"], sam_vit_b_state["image_encoder.blocks.0.attn.rel_pos_h"]
    )


def test_decoder_adapted_to_k_plus_one_masks(sam_vit_b_checkpoint, sam_vit_b_state):
    model = ICMoE(num_classes=5, img_size=256, encoder="vit_b", sam_checkpoint=str(sam_vit_b_checkpoint))
    tokens = model.mask_decoder.mask_tokens.weight
    source = sam_vit_b_state["mask_decoder.mask_tokens.weight"]
    assert tokens.shape == (6, 256)
    for i in range(6):
        assert torch.equal(tokens[i], source[i % 4])
    w5 = model.mask_decoder.output_hypernetworks_mlps[5].layers[0].weight
    assert torch.equal(w5, sam_vit_b_state["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"])
    assert "mask_decoder.output_hypernetworks_mlps.5.layers.0.weight" in model.load_report.adapted
    # the shared decoder transformer is copied exactly
    own = model.state_dict()
    assert torch.equal(
        own["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"],
        sam_vit_b_state["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"],
    )


def test_medsam_style_wrapped_checkpoint_loads(tmp_path, sam_vit_b_state):
    path = tmp_path / "medsam_vit_b.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sam_vit_b_state.items()}, "epoch": 3}, path)
    model = ICMoE(num_classes=1, img_size=256, encoder="vit_b", sam_checkpoint=str(path))
    assert model.load_report.variant == "vit_b"
    assert torch.equal(model.image_encoder.neck[0].weight, sam_vit_b_state["image_encoder.neck.0.weight"])


@pytest.mark.parametrize(
    ("encoder", "img_size", "window"),
    [
        ("vit_b", 256, 16),
        ("vit_b", 1024, 14),
        ("vit_h", 1024, 14),
        ("vit_l", 128, 8),
        ("vit_b", 224, 14),
        ("lite", 64, 0),
    ],
)
def test_auto_window_size(encoder, img_size, window):
    assert auto_window_size(encoder, img_size) == window


def test_window_sizes():
    model = ICMoE(num_classes=1, img_size=256, encoder="vit_b")  # "auto"
    assert model.window_size == 16
    assert [b.window_size for b in model.image_encoder.blocks][:3] == [16, 16, 0]
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape == (31, 64)
    assert ICMoE(num_classes=1, img_size=64, encoder="lite").window_size == 0
    model = ICMoE(num_classes=1, img_size=256, encoder="vit_b", window_size=14)
    assert [b.window_size for b in model.image_encoder.blocks][:3] == [14, 14, 0]
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 64)
    model = ICMoE(num_classes=1, img_size=256, encoder="vit_b", window_size=0)
    assert all(b.window_size == 0 for b in model.image_encoder.blocks)
    for bad in (-1, "big", 2.5, True):
        with pytest.raises(ValueError, match="window_size must be"):
            ICMoE(num_classes=1, img_size=64, encoder="lite", window_size=bad)


def test_detect_variant(sam_vit_b_state):
    assert detect_sam_variant(sam_vit_b_state) == "vit_b"


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(SamCheckpointError, match=rf"{path.name}: no such file"):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b"PK\x03\x04 truncated zip"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(SamCheckpointError, match=r"bad\.pth: not a readable PyTorch checkpoint"):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran during unpickling",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"image_encoder.pos_embed": _Payload()}, f)
    with pytest.raises(SamCheckpointError, match=r"evil\.pth: not a readable PyTorch checkpoint"):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))
    assert "code ran" not in capsys.readouterr().out


def test_state_dict_of_something_else(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(SamCheckpointError, match=r"unet\.pth: not a SAM checkpoint"):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))
    torch.save([1, 2, 3], path)
    with pytest.raises(SamCheckpointError, match=r"unet\.pth: the file holds list, not a state dict"):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


def test_other_vit_size_is_named(tmp_path):
    # the keys and shapes that identify a vit_l checkpoint (embed dim 1024, 24 blocks)
    state = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1024)}
    state |= {f"image_encoder.blocks.{i}.norm1.weight": torch.ones(1024) for i in range(24)}
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(state, path)
    with pytest.raises(
        SamCheckpointError, match=r"sam_vit_l_0b3195\.pth holds a vit_l image encoder, but encoder='vit_b'"
    ):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


def test_missing_and_unexpected_keys(tmp_path, sam_vit_b_state):
    state = dict(sam_vit_b_state)
    del state["image_encoder.blocks.3.mlp.lin1.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(
        SamCheckpointError, match=r"cut\.pth: 1 missing key\(s\), e\.g\. image_encoder\.blocks\.3\.mlp\.lin1\.weight"
    ):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))

    state = dict(sam_vit_b_state) | {"image_encoder.adapter.weight": torch.zeros(2)}
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(
        SamCheckpointError, match=r"extra\.pth: 1 unexpected key\(s\), e\.g\. image_encoder\.adapter\.weight"
    ):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


def test_wrong_shape_is_named(tmp_path, sam_vit_b_state):
    state = dict(sam_vit_b_state) | {"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(10, 768)}
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(
        SamCheckpointError,
        match=r"shape\.pth: tensor image_encoder\.blocks\.0\.attn\.qkv\.weight has shape \(10, 768\)",
    ):
        ICMoE(num_classes=1, encoder="vit_b", sam_checkpoint=str(path))


def test_lite_refuses_checkpoint(sam_vit_b_checkpoint):
    with pytest.raises(ValueError, match="trained from scratch"):
        ICMoE(num_classes=1, img_size=64, encoder="lite", sam_checkpoint=str(sam_vit_b_checkpoint))
