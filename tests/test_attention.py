"""SAM's ViT blocks through scaled_dot_product_attention: equal to the blocks themselves."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import image_encoder as sam

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.networks.decoder_blocks import two_way_transformer
from ic_moe_monai.networks.encoder_blocks import block_forward, get_rel_pos, rel_pos_bias

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _with_rel_pos_values(model: ICMoE) -> ICMoE:
    """SAM initialises the relative-position tables at zero; trained ones are not, and zeros would hide errors."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize(
    ("q_size", "k_size", "length"), [(16, 16, 31), (14, 14, 27), (16, 16, 27), (8, 16, 31), (16, 8, 31)]
)
def test_get_rel_pos_equals_sam(q_size, k_size, length):
    table = torch.randn(length, 8)
    torch.testing.assert_close(
        get_rel_pos(q_size, k_size, table), sam.get_rel_pos(q_size, k_size, table), atol=0, rtol=0
    )


def test_rel_pos_bias_equals_sam():
    torch.manual_seed(0)
    b, heads, h, w, c = 2, 3, 5, 7, 8
    q = torch.randn(b, heads, h * w, c)
    rel_h, rel_w = torch.randn(2 * h - 1, c), torch.randn(2 * w - 1, c)
    expected = sam.add_decomposed_rel_pos(
        torch.zeros(b * heads, h * w, h * w), q.reshape(b * heads, h * w, c), rel_h, rel_w, (h, w), (h, w)
    )
    torch.testing.assert_close(rel_pos_bias(q, rel_h, rel_w, (h, w)), expected.reshape(b, heads, h * w, h * w), **TOL)


# (encoder, img_size, window_size, block): windowed blocks with padding (16 → 28 for window 14), with several windows
# and no padding (window 8), with one window the size of the grid (window 16), larger than the grid (window 14 on an
# 8 x 8 grid: SAM pads), and global blocks
CASES = [
    ("vit_b", 256, 14, 0),
    ("vit_b", 256, 14, 2),
    ("vit_b", 256, 8, 0),
    ("vit_b", 256, "auto", 0),
    ("vit_b", 128, 14, 1),
    ("lite", 64, "auto", 0),
    ("lite", 32, 6, 0),
]


@pytest.mark.parametrize(("encoder", "img_size", "window_size", "index"), CASES)
def test_block_forward_equals_block(encoder, img_size, window_size, index):
    model = _with_rel_pos_values(ICMoE(num_classes=1, img_size=img_size, encoder=encoder, window_size=window_size))
    block = model.image_encoder.blocks[index]
    torch.manual_seed(0)
    x = torch.randn(2, *model.image_encoder.pos_embed.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(block_forward(block, x), block(x), **TOL)


@pytest.mark.parametrize(("window_size", "index"), [(14, 0), (14, 2)])
def test_block_forward_gradients_equal_block(window_size, index):
    model = _with_rel_pos_values(ICMoE(num_classes=1, img_size=128, encoder="vit_b", window_size=window_size))
    block = model.image_encoder.blocks[index].requires_grad_(True)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 768, requires_grad=True)
    grads = []
    for forward in (lambda t: block_forward(block, t), block):
        block.zero_grad()
        x.grad = None
        torch.manual_seed(1)
        out = forward(x)
        (out * torch.randn_like(out)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)


def test_offset_index_first_built_in_inference_mode_serves_autograd():
    model = _with_rel_pos_values(ICMoE(num_classes=1, img_size=36, encoder="lite"))  # a grid size no other test uses
    block = model.image_encoder.blocks[0].requires_grad_(True)
    x = torch.randn(1, 9, 9, 192)
    with torch.inference_mode():
        block_forward(block, x)
    block_forward(block, x).sum().backward()  # the cached index is saved for backward: not an inference tensor
    assert block.attn.rel_pos_h.grad.abs().sum() > 0


def test_encoder_image_stays_unmodified_sam():
    model = ICMoE(num_classes=1, img_size=256, encoder="vit_b")
    assert type(model.image_encoder) is sam.ImageEncoderViT
    assert all(type(block) is sam.Block for block in model.image_encoder.blocks)


@pytest.mark.parametrize(("encoder", "img_size", "tokens"), [("lite", 64, 5), ("vit_b", 256, 7)])
def test_two_way_transformer_equals_sam(encoder, img_size, tokens):
    model = ICMoE(num_classes=2, img_size=img_size, encoder=encoder)
    transformer = model.mask_decoder.transformer
    torch.manual_seed(0)
    grid = model.prompt_encoder.image_embedding_size
    image = torch.randn(2, transformer.embedding_dim, *grid)
    pe = model.prompt_encoder.get_dense_pe()
    points = torch.randn(2, tokens, transformer.embedding_dim)
    with torch.no_grad():
        queries, keys = two_way_transformer(transformer, image, pe, points)
        sam_queries, sam_keys = transformer(image, pe.expand(2, -1, -1, -1), points)
    torch.testing.assert_close(queries, sam_queries, **TOL)
    torch.testing.assert_close(keys, sam_keys, **TOL)


def test_dense_positional_encoding_follows_the_prompt_encoder():
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").eval()
    with torch.no_grad():
        first = model._dense_pe()
        assert model._dense_pe() is first  # kept between forwards
        torch.testing.assert_close(first, model.prompt_encoder.get_dense_pe(), atol=0, rtol=0)
        state = model.state_dict()
        state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 64)
        model.load_state_dict(state)
        torch.testing.assert_close(model._dense_pe(), model.prompt_encoder.get_dense_pe(), atol=0, rtol=0)
        model.to("cpu")  # moves and casts replace the buffer: the kept encoding is dropped
        assert "_dense_pe_cache" not in model.__dict__
