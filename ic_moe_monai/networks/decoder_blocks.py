"""SAM's two-way mask-decoder transformer computed from its own weights, attention through
``F.scaled_dot_product_attention``.

``segment_anything.modeling.transformer.Attention`` runs attention as separate kernels (head split copies, ``q @ k^T``,
scale, softmax, ``@ v``, head merge); seven of them run per decoder forward. :func:`two_way_transformer` computes the
same function from the same ``TwoWayTransformer`` module with the device's fused attention kernel. The module itself
stays unmodified (``ICMoE.mask_decoder.transformer``), and the result equals ``transformer(...)`` up to floating-point
rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

__all__ = ["attention_forward", "two_way_block_forward", "two_way_transformer"]


def attention_forward(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's decoder ``Attention`` on ``(B, N_q, C)`` queries and ``(B, N_k, C)`` keys / values."""
    heads = attn.num_heads
    q = attn.q_proj(q).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, N_q, C / heads)
    k = attn.k_proj(k).unflatten(-1, (heads, -1)).transpose(1, 2)
    v = attn.v_proj(v).unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # the default scale, 1 / sqrt(C / heads), is SAM's
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def two_way_block_forward(
    block: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayAttentionBlock``: token self-attention, tokens → image, MLP, image → tokens."""
    if block.skip_first_layer_pe:
        queries = attention_forward(block.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attention_forward(block.self_attn, q, q, queries)
    queries = block.norm1(queries)
    k = keys + key_pe
    queries = block.norm2(queries + attention_forward(block.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = block.norm3(queries + block.mlp(queries))
    keys = block.norm4(keys + attention_forward(block.cross_attn_image_to_token, k, queries + query_pe, queries))
    return queries, keys


def two_way_transformer(
    transformer: TwoWayTransformer, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image_embedding, image_pe, point_embedding)`` for SAM's ``TwoWayTransformer``.

    Args:
        transformer: the module whose weights are used.
        image_embedding: ``(B, C, h, w)``.
        image_pe: ``(B, C, h, w)`` positional encoding of the image.
        point_embedding: ``(B, N, C)`` output and prompt tokens.

    Returns:
        the processed tokens ``(B, N, C)`` and image ``(B, h * w, C)``.
    """
    keys = image_embedding.flatten(2).transpose(1, 2)  # (B, h * w, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = point_embedding
    for block in transformer.layers:
        queries, keys = two_way_block_forward(block, queries, keys, point_embedding, key_pe)
    attn_out = attention_forward(transformer.final_attn_token_to_image, queries + point_embedding, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys
