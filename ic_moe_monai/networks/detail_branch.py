"""The detail branch: image features at the mask resolution, which the encoder's downsampled embedding lost, added
to the mask decoder's upscaled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DetailBranch"]


class DetailBranch(nn.Module):
    """High-resolution image features added to the mask decoder's upscaled embedding.

    SAM predicts masks from a 16× (``vit_*``) or 4× (``lite``) downsampled embedding upscaled 4×; fine boundaries of
    small structures are lost on the way. As in HQ-SAM (Ke et al., NeurIPS 2023), which fuses early high-resolution
    features into the mask features, a small convolutional stem reads the input at the mask resolution and adds
    its features to the decoder's. The last convolution starts at zero, so the decoder's output is unchanged until
    training moves it.

    Args:
        in_channels: input image channels.
        out_channels: channels of the decoder's upscaled embedding (transformer_dim / 8).
        stride: input pixels per mask pixel (patch_size / 4).
        hidden: stem width.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, hidden: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(4, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1),
            nn.GroupNorm(4, hidden),
            nn.GELU(),
        )
        self.proj = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        features = self.stem(x)
        if tuple(features.shape[-2:]) != tuple(size):
            features = F.adaptive_avg_pool2d(features, size)
        return self.proj(features)
