"""One IC-MoE layer: basic, semantic and adaptive experts on a block's token grid, fused by the voting router
into a residual that starts at zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ic_moe_monai.networks.caching import forget, reuse_while_unchanged
from ic_moe_monai.networks.experts import (
    AdaptiveExpert,
    AdaptiveGroup,
    BasicExpert,
    BasicGroup,
    Expert,
    SemanticExpert,
    SemanticGroup,
)
from ic_moe_monai.networks.fusion import fold_layer_norms, stacked_output_weight, weighted_sum
from ic_moe_monai.networks.voting import TopKRouter

__all__ = ["ICMoELayer", "LayerWeights"]


class ICMoELayer(nn.Module):
    """One IC-MoE layer: basic, semantic and adaptive experts fused per token by a top-k router.

    The experts run densely on every token (at bottleneck width the dense pass costs less than gathering tokens per
    expert, and the top-k weights are exactly zero for the experts not selected), and together: the layer computes
    all experts' down projections and the router's scores as one product on the shared normalised tokens, each
    family's mixing for all its experts at once, and the router-weighted sum of the up projections as one product
    (:mod:`ic_moe_monai.networks.fusion`). Each expert's own ``forward`` is the definition this computes.

    Args:
        dim: token width D.
        num_classes: classes including background (K + 1).
        hidden_dim: bottleneck width of every expert.
        num_basic: number of basic (MLP adapter) experts.
        num_semantic: number of semantic (class prototype) experts.
        adaptive_dilations: one adaptive (dynamic depthwise convolution) expert per dilation.
        top_k: experts fused per token.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        hidden_dim: int = 64,
        num_basic: int = 2,
        num_semantic: int = 1,
        adaptive_dilations: Sequence[int] = (1, 3),
        top_k: int = 2,
    ) -> None:
        super().__init__()
        experts: list[Expert] = [BasicExpert(dim, hidden_dim, num_classes) for _ in range(num_basic)]
        experts += [SemanticExpert(dim, hidden_dim, num_classes) for _ in range(num_semantic)]
        experts += [AdaptiveExpert(dim, hidden_dim, num_classes, dilation=d) for d in adaptive_dilations]
        if not experts:
            raise ValueError("an IC-MoE layer needs at least one expert.")
        self.experts = nn.ModuleList(experts)
        self.router = TopKRouter(dim, len(experts), top_k=min(top_k, len(experts)))
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_basic, self.num_semantic = num_basic, num_semantic
        # the shared normalisation of fold_layer_norms needs one eps for all norms
        self.norm_eps = self.router.norm.eps
        if any(e.norm.eps != self.norm_eps for e in experts):
            raise ValueError("the experts' and the router's LayerNorms must share one eps.")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x ``(B, h, w, D)`` → (x + Δ, aux).

        ``aux`` holds ``router_logits`` and ``router_weights`` ``(B, h, w, E)`` and, in training mode only (the
        losses' expert supervision), every expert's vote ``expert_logits`` ``(B, h, w, E, K+1)``.
        """
        weights = self._current_weights(x.device.type)
        num_experts = len(self.experts)
        # 1. every expert's down projection and the router's scores: one product on the shared normalised tokens
        projected = F.linear(F.layer_norm(x, (self.dim,), eps=self.norm_eps), *weights.down)
        hidden, router_logits = projected.split([num_experts * self.hidden_dim, num_experts], dim=-1)
        hidden = F.gelu(hidden).unflatten(-1, (num_experts, self.hidden_dim))  # (B, h, w, E, hidden)
        route = self.router.route(router_logits)
        # 2. each family's mixing, all experts of a family at once
        mixed, votes = self._mix(weights, hidden, votes=self.training)
        # 3. Σ_e w_e · up_e(mixed_e): one product
        delta = weighted_sum(mixed, route.weights, weights.up)
        aux = {"router_logits": route.logits, "router_weights": route.weights}
        if votes is not None:
            aux["expert_logits"] = votes
        return x + delta, aux

    def fused_weights(self) -> LayerWeights:
        """Everything the fused forward needs that depends on the parameters alone: folded, stacked and
        block-diagonal versions of the experts' and the router's parameters (differentiable)."""
        experts = list(self.experts)
        basic_end = self.num_basic
        semantic_end = basic_end + self.num_semantic
        basic, semantic, adaptive = experts[:basic_end], experts[basic_end:semantic_end], experts[semantic_end:]
        return LayerWeights(
            down=fold_layer_norms([(e.norm, e.down) for e in experts] + [(self.router.norm, self.router.score)]),
            basic=BasicExpert.group_weights(basic) if basic else None,
            semantic=SemanticExpert.group_weights(semantic) if semantic else None,
            adaptive=AdaptiveExpert.group_weights(adaptive) if adaptive else None,
            up=stacked_output_weight([e.up for e in experts]),
        )

    def _current_weights(self, device_type: str) -> LayerWeights:
        """:meth:`fused_weights`, reused between forwards while no parameter changes, where no gradient is needed.

        In inference the preparation (about 20 small kernels per layer) would otherwise run on every forward; see
        :mod:`~ic_moe_monai.networks.caching` for when it is rebuilt. Writes through ``param.data`` bypass the version
        counters it watches: call :meth:`clear_weights_cache` after them. Not used under autograd, tracing or
        compilation.

        Under autocast the entry holds the weights already in the autocast dtype: every prepared tensor feeds a
        matrix product or convolution, which autocast would otherwise cast on every forward.
        """
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.fused_weights()
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

        def prepare() -> LayerWeights:
            weights = self.fused_weights()  # parameter precision: the preparation uses no autocast-lowered op
            if autocast is None:
                return weights
            return tree_map(lambda t: t.to(autocast) if _is_float_tensor(t) else t, weights)

        return reuse_while_unchanged(self, "_weights_cache", self.parameters(), prepare, (autocast,))

    def clear_weights_cache(self) -> None:
        """Forget the prepared weights reused in inference (see :meth:`fused_weights`)."""
        forget(self, "_weights_cache")

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: the parameters are replaced
        self.clear_weights_cache()
        return super()._apply(fn, recurse)

    def _mix(
        self, weights: LayerWeights, hidden: torch.Tensor, votes: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bottleneck tokens ``(B, h, w, E, hidden)`` → mixed tokens (same shape) and, if ``votes``, the experts'
        class logits ``(B, h, w, E, K+1)``, in expert order (basic, semantic, adaptive)."""
        basic_end = self.num_basic
        semantic_end = basic_end + self.num_semantic
        parts = []
        if weights.basic is not None:
            parts.append(BasicExpert.mix_group(weights.basic, hidden[..., :basic_end, :], votes))
        if weights.semantic is not None:
            parts.append(SemanticExpert.mix_group(weights.semantic, hidden[..., basic_end:semantic_end, :]))
        if weights.adaptive is not None:
            parts.append(AdaptiveExpert.mix_group(weights.adaptive, hidden[..., semantic_end:, :], votes))
        mixed = torch.cat([m for m, _ in parts], dim=-2) if len(parts) > 1 else parts[0][0]
        if not votes:
            return mixed, None
        return mixed, torch.cat([v for _, v in parts], dim=-2) if len(parts) > 1 else parts[0][1]


def _is_float_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class LayerWeights(NamedTuple):
    """An :class:`ICMoELayer`'s parameters prepared for its fused forward (:meth:`ICMoELayer.fused_weights`)."""

    down: tuple[torch.Tensor, torch.Tensor]  # every expert's down projection and the router's scores, norms folded in
    basic: BasicGroup | None
    semantic: SemanticGroup | None
    adaptive: AdaptiveGroup | None
    up: torch.Tensor  # stacked output projections, for weighted_sum
