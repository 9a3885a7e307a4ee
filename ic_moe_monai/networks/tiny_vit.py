"""TinyViT, the image encoder of LiteMedSAM, for square or rectangular inputs of any size.

TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022) is a
four-stage hierarchical network: a convolutional stage of MBConv blocks (Sandler et al., CVPR 2018) followed by
three stages of windowed self-attention blocks with learned attention biases (as in LeViT, Graham et al.,
ICCV 2021) and a depthwise convolution between attention and MLP. MobileSAM (Zhang et al., 2023) distilled SAM's
ViT-H into it; LiteMedSAM ("MedSAM on Laptop", Ma et al., CVPR 2024 challenge) distilled MedSAM's ViT-B into the
variant built here: a stride-1 stem (1 x 1 convolutions), so that a 256 x 256 input gives SAM's 64 x 64 x 256 image
embedding (stride 4 overall), and a last patch merging of stride 1.

Shapes for an ``(B, 3, H, W)`` input with the LiteMedSAM sizes (``embed_dims = (64, 128, 160, 320)``)::

    stem (two 1 x 1 Conv-BN)        (B, 64, H, W)
    stage 0: 2 MBConv blocks        (B, 64, H, W)          then merge, stride 2
    stage 1: 2 attention blocks     (B, H/2, W/2, 128)     window 7, then merge, stride 2
    stage 2: 6 attention blocks     (B, H/4, W/4, 160)     window 14, then merge, stride 1
    stage 3: 2 attention blocks     (B, H/4, W/4, 320)     window 7
    neck                            (B, 256, H/4, W/4)

Attention stages work on token grids ``(B, h, w, C)`` (what :class:`~ic_moe_monai.networks.ICMoELayer` takes),
attention runs through ``F.scaled_dot_product_attention`` with the learned biases as its additive mask, and windows
are padded and partitioned as TinyViT does, so the grid may have any size: nothing here fixes the input size,
and the weights (whose shapes depend on the windows only) load unchanged for any of them. Module and parameter names
follow the published checkpoints (``lite_medsam.pth``), so their ``image_encoder.*`` tensors load with
``load_state_dict``. BatchNorm layers always use their stored statistics (:meth:`TinyViTEncoder.train` keeps them
in eval mode): the pretrained statistics are part of the encoder, and training batches of a few slices would
only blur them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LITE_MEDSAM_ENCODER",
    "ConvBN",
    "MBConv",
    "PatchMerging",
    "TinyViTBlock",
    "TinyViTEncoder",
    "TinyViTSizes",
    "WindowAttention",
]


class TinyViTSizes(NamedTuple):
    """Hyper-parameters of one TinyViT; stage 0 is convolutional, so its heads and window are unused."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # patch merging after stages 0, 1, 2
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_channels: int = 256


LITE_MEDSAM_ENCODER = TinyViTSizes()


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (``c``, ``bn``, the checkpoints' names)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))


class MBConv(nn.Module):
    """Inverted residual block: 1 x 1 expansion, 3 x 3 depthwise, 1 x 1 projection, residual, GELU.

    Args:
        channels: input and output channels.
        expand_ratio: hidden channels per input channel.
    """

    def __init__(self, channels: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = ConvBN(channels, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, H, W)
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change of width (and resolution) between stages: 1 x 1, depthwise 3 x 3 with ``stride``, 1 x 1.

    Args:
        in_channels: width of the stage before.
        out_channels: width of the stage after.
        stride: 2 halves the grid, 1 keeps it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels)
        self.conv2 = ConvBN(out_channels, out_channels, 3, stride=stride, groups=out_channels)
        self.conv3 = ConvBN(out_channels, out_channels)

    def forward(self, x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        """Tokens ``(B, h, w, C)`` (or, with ``channels_last=False``, a ``(B, C, H, W)`` map) → tokens
        ``(B, h', w', C')``."""
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return self.conv3(x).permute(0, 2, 3, 1)


def attention_bias_index(window: int) -> torch.Tensor:
    """``(window², window²)`` index into the learned biases: one bias per absolute offset ``(|Δy|, |Δx|)``,
    numbered in the order the offsets first occur over query/key pairs in row-major order (TinyViT's)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    offsets = (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()  # (N, N)
    # first occurrence order: scanning pairs row-major, a new offset gets the next number
    flat = offsets.flatten()
    first_seen = torch.full((window * window,), flat.numel(), dtype=torch.long)
    first_seen.scatter_reduce_(0, flat, torch.arange(flat.numel()), reduce="amin")
    rank = torch.empty_like(first_seen)
    rank[first_seen.argsort()] = torch.arange(first_seen.numel())
    return rank[offsets]


class WindowAttention(nn.Module):
    """Multi-head self-attention over one window of tokens, with a learned bias per head and relative offset.

    Args:
        dim: token width.
        num_heads: heads; the head width is ``dim / num_heads`` for queries, keys and values.
        window: window side; fixes the bias table (``window²`` offsets at most).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}.")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index = attention_bias_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, int(index.max()) + 1))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) with N = window² → (B, N, C)
        b, n, _ = x.shape
        # per head: [q | k | v], the layout of the checkpoints' qkv weights
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1).transpose(1, 2).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm two-layer MLP (``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise convolution, MLP; on token grids ``(B, h, w, C)`` of any size.

    Args:
        dim: token width.
        num_heads: attention heads.
        window: attention window side; the grid is zero-padded to a multiple of it (padding tokens take part in
            attention, as in TinyViT) and cropped back.
        mlp_ratio: MLP hidden width per token width.
        local_conv_size: kernel of the depthwise convolution.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0, local_conv_size: int = 3) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, C) → (B, h, w, C)
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = -h % s, -w % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        ph, pw = h + pad_h, w + pad_w
        windows = x.view(b, ph // s, s, pw // s, s, c).transpose(2, 3).reshape(-1, s * s, c)
        out = self.attn(windows).view(b, ph // s, pw // s, s, s, c).transpose(2, 3).reshape(b, ph, pw, c)
        return out[:, :h, :w] if pad_h or pad_w else out


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on the feature map, then the patch merging into stage 1's tokens."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → tokens (B, h, w, C')
        for block in self.blocks:
            x = block(x)
        return self.downsample(x, channels_last=False)


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks on token grids, then (but for the last stage) a patch merging."""

    def __init__(self, blocks: Sequence[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: ``(B, in_channels, H, W)`` → image embedding ``(B, 256, H/4, W/4)``.

    Besides ``forward``, the attention blocks of stages 1-3 are exposed one by one (:attr:`token_blocks`,
    :meth:`after_block`) so that IC-MoE can put an expert layer after any of them, and :meth:`embed_tokens` gives
    the tokens entering the first of them.

    Args:
        in_channels: input channels (3: LiteMedSAM's RGB, here 2.5D slices).
        sizes: the network's widths, depths, heads and windows; default LiteMedSAM's.
    """

    def __init__(self, in_channels: int = 3, sizes: TinyViTSizes = LITE_MEDSAM_ENCODER) -> None:
        super().__init__()
        dims = sizes.embed_dims
        if not len(dims) == len(sizes.depths) == len(sizes.num_heads) == len(sizes.window_sizes):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage.")
        if len(sizes.merge_strides) != len(dims) - 1:
            raise ValueError("merge_strides needs one entry per stage but the last.")
        self.sizes = sizes
        self.in_channels = in_channels
        # stem: two 1 x 1 Conv-BN with GELU between (index 1; its names follow the checkpoints)
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(
            ConvBN(in_channels, dims[0] // 2), nn.GELU(), ConvBN(dims[0] // 2, dims[0])
        )
        stages: list[nn.Module] = [
            ConvStage(
                dims[0],
                sizes.depths[0],
                sizes.mbconv_expand_ratio,
                PatchMerging(dims[0], dims[1], sizes.merge_strides[0]),
            )
        ]
        for i in range(1, len(dims)):
            blocks = [
                TinyViTBlock(dims[i], sizes.num_heads[i], sizes.window_sizes[i], sizes.mlp_ratio, sizes.local_conv_size)
                for _ in range(sizes.depths[i])
            ]
            merge = PatchMerging(dims[i], dims[i + 1], sizes.merge_strides[i]) if i + 1 < len(dims) else None
            stages.append(AttentionStage(blocks, merge))
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], sizes.out_channels, 1, bias=False),
            LayerNorm2d(sizes.out_channels),
            nn.Conv2d(sizes.out_channels, sizes.out_channels, 3, padding=1, bias=False),
            LayerNorm2d(sizes.out_channels),
        )
        # attention block k (0-based over stages 1-3) → (its stage, whether the stage's merge follows it)
        self._block_places: list[tuple[int, bool]] = [
            (i, j == sizes.depths[i] - 1) for i in range(1, len(dims)) for j in range(sizes.depths[i])
        ]

    @property
    def stride(self) -> int:
        """Input pixels per embedding pixel."""
        stride = 1
        for s in self.sizes.merge_strides:
            stride *= s
        return stride

    @property
    def token_blocks(self) -> list[TinyViTBlock]:
        """The attention blocks of stages 1-3 in order (block ``k`` of this list is IC-MoE's block ``k``)."""
        return [block for stage in self.layers[1:] for block in stage.blocks]

    def block_width(self, index: int) -> int:
        """Token width at the output of attention block ``index``."""
        return self.sizes.embed_dims[self._block_places[index][0]]

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → stage 1's input tokens ``(B, H/2, W/2, 128)``: stem, stage 0 and its merge."""
        return self.layers[0](self.patch_embed.seq(x))

    def after_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after attention block ``index``, through its stage's patch merging if the block ends a stage."""
        stage, ends_stage = self._block_places[index]
        merge = self.layers[stage].downsample
        return merge(tokens) if ends_stage and merge is not None else tokens

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last stage's tokens ``(B, h, w, 320)`` → image embedding ``(B, 256, h, w)``."""
        return self.neck(tokens.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed_tokens(x)
        for index, block in enumerate(self.token_blocks):
            tokens = self.after_block(index, block(tokens))
        return self.embedding(tokens)

    def train(self, mode: bool = True) -> TinyViTEncoder:
        """As ``nn.Module.train``, but BatchNorm layers keep their stored statistics (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self
