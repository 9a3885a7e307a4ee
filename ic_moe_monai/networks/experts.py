"""The three expert families of an IC-MoE layer.

Every expert reads the token grid ``(B, h, w, D)`` of a ViT block and returns

- ``delta``: a residual update ``(B, h, w, D)``; its output projection starts at zero, so a fresh expert leaves
  the pretrained encoder's features untouched ("structural integrity" of the pretrained weights);
- ``class_logits``: per-token class scores ``(B, h, w, K + 1)``, the expert's own vote used by the router's
  label-consistency target and by the experts' deep supervision.

Experts work in a narrow bottleneck (``hidden_dim`` ≪ D) so that a layer of several experts costs a few per cent
of a ViT block.

Each expert's ``forward`` is its definition. An :class:`~ic_moe_monai.networks.ic_moe.ICMoELayer` computes all its
experts together from the same parameters: the layer does the shared down and up projections
(:mod:`ic_moe_monai.networks.fusion`), and each family transforms the bottleneck tokens of all its experts at once:
``group_weights(experts)`` prepares the family's stacked parameters (parameters only, so the layer may reuse them
while they do not change) and ``mix_group(group, h)`` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ic_moe_monai.networks.fusion import GroupedLinear, block_diagonal

__all__ = [
    "AdaptiveExpert",
    "AdaptiveGroup",
    "BasicExpert",
    "BasicGroup",
    "Expert",
    "SemanticExpert",
    "SemanticGroup",
]


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

    @staticmethod
    def group_weights(experts: Sequence[BasicExpert]) -> BasicGroup:
        """The n experts' inner layers and classifiers, each as one block-diagonal map."""
        return BasicGroup(block_diagonal([e.inner for e in experts]), block_diagonal([e.classifier for e in experts]))

    @staticmethod
    def mix_group(group: BasicGroup, h: torch.Tensor, votes: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`mix` of n basic experts at once.

        Args:
            group: the experts' :meth:`group_weights`.
            h: their bottleneck tokens ``(B, h, w, n, hidden)``.
            votes: also compute the class logits ``(B, h, w, n, K + 1)`` (only the losses need them).
        """
        h = h + F.gelu(group.inner(h))
        return h, group.classifier(h) if votes else None


class BasicGroup(NamedTuple):
    inner: GroupedLinear
    classifier: GroupedLinear


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

    def queries(self) -> torch.Tensor:
        """The prototypes' queries with the key projection folded in, scaled: ``(K+1, hidden)``.

        attn = softmax(q k^T) with k = tokens W_k^T; q k^T = (q W_k) tokens^T, so the K+1 queries absorb W_k instead
        of every token being projected.
        """
        # products of parameters only, written as sums so that no autocast policy lowers their precision
        q = (self.prototypes[:, None, :] * self.to_q.weight).sum(dim=-1)  # to_q(prototypes): (K+1, hidden)
        return (q[:, :, None] * self.to_k.weight).sum(dim=1) * self.scale  # q W_k

    def mix(self, h: torch.Tensor, queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck tokens ``(B, h, w, hidden)`` → mixed tokens and votes; ``queries``: :meth:`queries` if known."""
        b, gh, gw, c = h.shape
        tokens = h.reshape(b, gh * gw, c)
        # 1. prototypes gather evidence from this image's tokens. The value projection moves after the attention,
        # attn (tokens W_v^T) = (attn tokens) W_v^T: a (K+1)-row product instead of a projection of all N tokens.
        queries = self.queries() if queries is None else queries
        attn = torch.softmax(F.linear(tokens, queries), dim=1)  # (B, N, K+1), normalised over the tokens
        protos = self.proto_norm(self.prototypes + self.to_v(attn.transpose(1, 2) @ tokens))  # (B, K+1, hidden)
        # 2. tokens read class semantics back from the image-specific prototypes: (B, N, K+1)
        similarity = tokens @ protos.transpose(1, 2) * self.scale
        mixed = tokens + torch.softmax(similarity, dim=-1) @ protos
        # the tokens' attention over the class prototypes is this expert's vote
        return mixed.reshape(b, gh, gw, c), similarity.reshape(b, gh, gw, -1)

    @staticmethod
    def group_weights(experts: Sequence[SemanticExpert]) -> SemanticGroup:
        """The n experts and their :meth:`queries`."""
        return SemanticGroup(tuple(experts), tuple(e.queries() for e in experts))

    @staticmethod
    def mix_group(group: SemanticGroup, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`mix` of n semantic experts (one by one: their attention is per expert and per image).

        Args:
            group: the experts' :meth:`group_weights`.
            h: their bottleneck tokens ``(B, h, w, n, hidden)``.

        Returns:
            the mixed tokens ``(B, h, w, n, hidden)`` and the votes ``(B, h, w, n, K + 1)``, which the mixing computes
            anyway.
        """
        if len(group.experts) == 1:
            mixed, votes = group.experts[0].mix(h.squeeze(-2), group.queries[0])
            return mixed.unsqueeze(-2), votes.unsqueeze(-2)
        mixed, votes = zip(
            *(e.mix(h[..., i, :], q) for i, (e, q) in enumerate(zip(group.experts, group.queries, strict=True))),
            strict=True,
        )
        return torch.stack(mixed, dim=-2), torch.stack(votes, dim=-2)


class SemanticGroup(NamedTuple):
    experts: tuple[SemanticExpert, ...]
    queries: tuple[torch.Tensor, ...]  # (K+1, hidden) each


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

    @staticmethod
    def group_weights(experts: Sequence[AdaptiveExpert]) -> AdaptiveGroup:
        """The n experts' gates and classifiers as block-diagonal maps, and their candidate kernels as one grouped
        convolution per run of consecutive experts with the same dilation (the default dilations 1 and 3 make two:
        a common kernel holding both dilations would cost 49 taps instead of 2 x 9)."""
        runs, start = [], 0
        for stop in range(1, len(experts) + 1):
            if stop == len(experts) or experts[stop].candidates.dilation != experts[start].candidates.dilation:
                run = experts[start:stop]
                conv = run[0].candidates
                kernels = torch.cat([e.candidates.weight for e in run]) if len(run) > 1 else conv.weight
                bias = torch.cat([e.candidates.bias for e in run]) if len(run) > 1 else conv.bias
                runs.append(ConvRun(start, stop, kernels, bias, conv.padding, conv.dilation))
                start = stop
        return AdaptiveGroup(
            gate_in=block_diagonal([e.gate[0] for e in experts]),
            gate_out=block_diagonal([e.gate[2] for e in experts]),
            runs=tuple(runs),
            classifier=block_diagonal([e.classifier for e in experts]),
            num_kernels=experts[0].num_kernels,
        )

    @staticmethod
    def mix_group(
        group: AdaptiveGroup, h: torch.Tensor, votes: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`mix` of n adaptive experts at once.

        Args:
            group: the experts' :meth:`group_weights`.
            h: their bottleneck tokens ``(B, h, w, n, hidden)``.
            votes: also compute the class logits ``(B, h, w, n, K + 1)`` (only the losses need them).
        """
        c = h.shape[-1]
        # per image and expert: mixing weights of the candidate kernels from the pooled tokens, (B, n, M)
        weights = torch.softmax(group.gate_out(F.gelu(group.gate_in(h.mean(dim=(1, 2))))), dim=-1)
        outs = []
        for run in group.runs:
            # (B, n_run * hidden, h, w) in channels-last memory; candidates of channel (e, c) at (e, c, m)
            grid = h[..., run.start : run.stop, :].flatten(-2).contiguous().permute(0, 3, 1, 2)
            out = F.conv2d(
                grid, run.kernels, run.bias, padding=run.padding, dilation=run.dilation, groups=grid.shape[1]
            )
            outs.append(out.permute(0, 2, 3, 1))  # (B, h, w, n_run * hidden * M)
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        out = out.unflatten(-1, (-1, c, group.num_kernels))  # (B, h, w, n, hidden, M)
        # conv(x, Σ_m a_m W_m) = Σ_m a_m conv(x, W_m)
        h = h + F.gelu((out * weights[:, None, None, :, None, :]).sum(dim=-1))
        return h, group.classifier(h) if votes else None


class ConvRun(NamedTuple):
    """Consecutive adaptive experts of one dilation: their candidate kernels as one grouped convolution."""

    start: int
    stop: int
    kernels: torch.Tensor  # (n_run * hidden * M, 1, k, k)
    bias: torch.Tensor  # (n_run * hidden * M,)
    padding: tuple[int, int]
    dilation: tuple[int, int]


class AdaptiveGroup(NamedTuple):
    gate_in: GroupedLinear
    gate_out: GroupedLinear
    runs: tuple[ConvRun, ...]
    classifier: GroupedLinear
    num_kernels: int  # M
