"""SAM's ViT blocks computed from their own weights, with attention through ``F.scaled_dot_product_attention``.

``segment_anything.modeling.image_encoder.Block`` materialises the attention matrix (``q @ k^T``, add the decomposed
relative-position bias, softmax, ``@ v``) as separate kernels. :func:`block_forward` computes the same function from
the same ``Block`` module: the decomposed relative-position bias (Li et al., "MViTv2", CVPR 2022) is built once per
block and passed to ``scaled_dot_product_attention`` as its additive ``attn_mask``, so the device's fused attention
kernel does the rest. Windows are partitioned (with padding) and unpartitioned exactly as SAM does.

Nothing here changes the modules: ``ICMoE.image_encoder`` stays an unmodified ``ImageEncoderViT``, and
``block_forward(block, x)`` equals ``block(x)`` up to floating-point rounding (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, window_partition, window_unpartition

__all__ = ["attention_forward", "block_forward", "get_rel_pos", "rel_pos_bias"]


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings ``(q_size, k_size, C)`` for every query / key pair along one axis.

    Same result as ``segment_anything``'s ``get_rel_pos`` (including its linear resize of a table of another
    length), but the index is built on ``rel_pos``'s device: SAM's builds it on the CPU, which costs a host-to-device
    copy per call on a GPU and cannot be captured in a CUDA graph.

    Args:
        q_size: query positions along the axis.
        k_size: key positions along the axis.
        rel_pos: ``(L, C)`` table of embeddings of relative offsets.
    """
    rel_pos = _fit_table(rel_pos, max(q_size, k_size))
    if q_size == k_size:  # the encoder's case: integer offsets, no rescaling
        return rel_pos[_offset_index(q_size, rel_pos.device)]
    # shorter axis scaled to the longer one, as SAM does
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative-position bias for square attention over an ``h x w`` grid, as an additive mask.

    ``bias[b, n, (qh, qw), (kh, kw)] = q[b, n, (qh, qw)] · (R_h[qh - kh] + R_w[qw - kw])`` with the unscaled query, as
    in SAM's ``add_decomposed_rel_pos``. Each query meets each table row once, in one product with both tables, and
    the products of each query / key pair are then gathered by offset, rather than expanded per query row first.

    Args:
        q: queries ``(B, heads, h * w, C)``.
        rel_pos_h, rel_pos_w: ``(2h - 1, C)`` and ``(2w - 1, C)`` tables (other lengths are resized as SAM does).
        size: the grid ``(h, w)``.

    Returns:
        ``(B, heads, h * w, h * w)`` in the query's dtype.
    """
    h, w = size
    table_h, table_w = _fit_table(rel_pos_h, h), _fit_table(rel_pos_w, w)
    tables = torch.cat([table_h, table_w]).to(q.dtype)  # (2h - 1 + 2w - 1, C)
    products = (q @ tables.t()).unflatten(2, (h, w))  # (B, heads, h, w, 2h - 1 + 2w - 1)
    by_h, by_w = products.split([table_h.shape[0], table_w.shape[0]], dim=-1)
    shape = (*products.shape[:4], -1)
    index_h, index_w = _offset_index(h, q.device), _offset_index(w, q.device)  # (h, h), (w, w)
    bias_h = by_h.gather(-1, index_h[:, None, :].expand(shape))  # (B, heads, h, w, kh)
    bias_w = by_w.gather(-1, index_w[None, :, :].expand(shape))  # (B, heads, h, w, kw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, heads, h, w, kh, kw)
    return bias.reshape(q.shape[0], q.shape[1], h * w, h * w)


def _fit_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """A ``(2 size - 1, C)`` table: ``rel_pos`` itself, or resized linearly as SAM's ``get_rel_pos`` does."""
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def _offset_index(size: int, device: torch.device) -> torch.Tensor:
    """``(size, size)`` table rows of each query / key offset, ``q - k + size - 1``; cached per size and device
    (a constant of the model, so not rebuilt by three kernels per block and axis), built inside a compiled graph."""
    if torch.compiler.is_compiling():
        return _build_offset_index(size, device)
    return _cached_offset_index(size, device)


def _build_offset_index(size: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(size, device=device)
    return positions[:, None] - positions[None, :] + (size - 1)


@functools.lru_cache(maxsize=64)
def _cached_offset_index(size: int, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under inference mode, so that autograd may save it later
    with torch.inference_mode(False), torch.no_grad():
        return _build_offset_index(size, device)


def attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention`` on tokens ``(B, h, w, D)`` through ``F.scaled_dot_product_attention``."""
    b, h, w, _ = x.shape
    # (3, B, heads, h * w, C): the layout SAM's Attention uses, so that heads split the qkv output the same way
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)) if attn.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (B, heads, h * w, C)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``Block`` on tokens ``(B, h, w, D)``: ``block_forward(block, x)`` computes ``block(x)``."""
    shortcut = x
    x = block.norm1(x)
    h, w = x.shape[1], x.shape[2]
    # a window that is exactly the grid is global attention: nothing to partition (a larger one pads, as SAM does)
    windowed = block.window_size > 0 and (h, w) != (block.window_size, block.window_size)
    if windowed:
        x, padded = window_partition(x, block.window_size)  # (B * windows, window, window, D)
    x = attention_forward(block.attn, x)
    if windowed:
        x = window_unpartition(x, block.window_size, padded, (h, w))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))
