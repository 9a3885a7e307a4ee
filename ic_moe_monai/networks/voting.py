"""Pixel-probability adaptive voting: a per-token router that selects and weights the experts.

The router scores every expert for every token; the top-k experts are fused with weights renormalised over
the selected ones (Shazeer et al. 2017; Fedus et al. 2022, "Switch Transformers"). How the router is taught
which experts agree with the label, and how expert use is kept balanced, lives in :mod:`ic_moe_monai.training.losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["RouterOutput", "TopKRouter"]


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (..., E) raw router scores
    weights: torch.Tensor  # (..., E) fusion weights: renormalised softmax on the top-k experts, 0 elsewhere
    indices: torch.Tensor  # (..., k) the selected experts


class TopKRouter(nn.Module):
    """Linear per-token router with top-k selection.

    Args:
        dim: token width.
        num_experts: number of experts E to choose from.
        top_k: number of experts fused per token (1 ≤ k ≤ E).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}.")
        self.top_k = top_k
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, num_experts)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, tokens: torch.Tensor) -> RouterOutput:
        """tokens ``(..., D)`` → :class:`RouterOutput` with ``(..., E)`` logits and weights."""
        logits = self.score(self.norm(tokens))
        return self.route(logits)

    def route(self, logits: torch.Tensor) -> RouterOutput:
        """Top-k selection and renormalised weights for given router logits ``(..., E)``."""
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        # Under CUDA autocast softmax runs in float32 while the logits are float16 / bfloat16, and scatter does not
        # promote: build the weights in the softmax's own dtype.
        top_weights = torch.softmax(top_logits, dim=-1)
        weights = top_weights.new_zeros(logits.shape).scatter(-1, indices, top_weights)
        return RouterOutput(logits, weights, indices)
