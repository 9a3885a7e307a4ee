"""The three expert families of an IC-MoE layer.

Every expert reads the token grid ``(B, h, w, D)`` of a ViT block and returns

- ``delta``: a residual update ``(B, h, w, D)``; its output projection starts at zero, so a fresh expert leaves
  the pretrained encoder's features untouched ("structural integrity" of the pretrained weights);
- ``class_logits``: per-token class scores ``(B, h, w, K + 1)``, the expert's own vote used by the router's
  label-consistency target and by the experts' deep supervision.

Experts work in a narrow bottleneck (``hidden_dim`` ≪ D) so that a layer of several experts costs a few per cent
of a ViT block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptiveExpert", "BasicExpert", "Expert", "SemanticExpert"]


class Expert(nn.Module):
    """Shared skeleton: pre-norm, down-projection, a family-specific ``mix``, zero-initialised up-projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        """
        Args:
            dim: token width D of the ViT block.
            hidden_dim: bottleneck width of the expert.
        """
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden_dim)
        self.up = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Family-specific transform of the bottleneck tokens ``(B, h, w, hidden)``; returns them and the
        expert's class logits ``(B, h, w, K + 1)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, class_logits = self.mix(F.gelu(self.down(self.norm(x))))
        return self.up(h), class_logits


class BasicExpert(Expert):
    """General refinement: a bottleneck MLP adapter (Houlsby et al. 2019; as in SAMed / Medical SAM Adapter)."""

    def __init__(self, dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__(dim, hidden_dim)
        self.inner = nn.Linear(hidden_dim, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + F.gelu(self.inner(h))
        return h, self.classifier(h)


class SemanticExpert(Expert):
    """Class semantics: K + 1 learnable prototypes cross-attend to the tokens, then the tokens attend back.

    The token-to-prototype attention is itself a per-token class distribution, so it is the expert's vote
    (scaled similarities serve as class logits) and the prototypes double as anchors for contrastive learning.
    """

    def __init__(self, dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__(dim, hidden_dim)
        self.prototypes = nn.Parameter(torch.randn(num_classes, hidden_dim) * hidden_dim**-0.5)
        self.to_q = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.to_k = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.to_v = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.proto_norm = nn.LayerNorm(hidden_dim)
        self.scale = hidden_dim**-0.5

    def mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, gh, gw, c = h.shape
        tokens = h.reshape(b, gh * gw, c)
        # 1. prototypes gather evidence from this image's tokens: (B, K+1, hidden)
        attn = torch.softmax(self.to_q(self.prototypes) @ self.to_k(tokens).transpose(1, 2) * self.scale, dim=-1)
        protos = self.proto_norm(self.prototypes + attn @ self.to_v(tokens))
        # 2. tokens read class semantics back from the image-specific prototypes: (B, N, K+1)
        similarity = tokens @ protos.transpose(1, 2) * self.scale
        mixed = tokens + torch.softmax(similarity, dim=-1) @ protos
        # the tokens' attention over the class prototypes is this expert's vote
        return mixed.reshape(b, gh, gw, c), similarity.reshape(b, gh, gw, -1)


class AdaptiveExpert(Expert):
    """Local structure: a depthwise convolution whose kernel is conditioned on the input (dynamic convolution,
    Chen et al. 2020), at a given dilation, so that experts see boundaries at several scales.

    The kernel is a per-image mixture of ``num_kernels`` candidates, weighted by a gate on the pooled tokens.
    By linearity, ``conv(x, Σ_m a_m W_m) = Σ_m a_m conv(x, W_m)``, so all candidates run as one grouped
    convolution and the gate mixes their outputs.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_classes: int, dilation: int = 1, kernel_size: int = 3, num_kernels: int = 4
    ) -> None:
        super().__init__(dim, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)
        self.num_kernels = num_kernels
        self.candidates = nn.Conv2d(
            hidden_dim,
            hidden_dim * num_kernels,
            kernel_size,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=hidden_dim,
        )
        self.gate = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 4), nn.GELU(), nn.Linear(hidden_dim // 4, num_kernels)
        )
        nn.init.kaiming_uniform_(self.candidates.weight, a=math.sqrt(5))

    def mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, gh, gw, c = h.shape
        weights = torch.softmax(self.gate(h.mean(dim=(1, 2))), dim=-1)  # (B, M)
        grid = h.permute(0, 3, 1, 2)  # (B, hidden, h, w)
        out = self.candidates(grid).reshape(b, c, self.num_kernels, gh, gw)
        out = (out * weights[:, None, :, None, None]).sum(dim=2)  # (B, hidden, h, w)
        h = h + F.gelu(out.permute(0, 2, 3, 1))
        return h, self.classifier(h)
