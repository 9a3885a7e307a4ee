"""Linear maps of several experts computed as one matrix product.

An IC-MoE layer runs every expert densely on every token (the router's top-k weights are exactly zero elsewhere), and
each expert is a handful of small layers. Run one by one, the experts are many small kernels, and a GPU spends its
time launching them rather than computing. The helpers here rewrite the experts' linear maps exactly (up to
floating-point rounding) as single large products over the experts' own, unchanged parameters:

- :func:`fold_layer_norms`: every expert (and the router) normalises the same tokens with its own LayerNorm and then
  projects them; the normalisation statistics are shared, and each LayerNorm's affine folds into its projection;
- :func:`block_diagonal`: one linear map per expert on that expert's slice of the features;
- :func:`stacked_output_weight` / :func:`weighted_sum`: the router-weighted sum of the experts' output projections.

Each helper that only reads parameters returns plain tensors, so that a layer can prepare them once and reuse them
while the parameters do not change (see ``ICMoELayer.fused_weights``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedLinear", "block_diagonal", "fold_layer_norms", "stacked_output_weight", "weighted_sum"]


class GroupedLinear(NamedTuple):
    """E linear maps, one per expert, as one block-diagonal map: ``(..., E, in) → (..., E, out)``."""

    weight: torch.Tensor  # (E * out, E * in), block diagonal
    bias: torch.Tensor  # (E * out,)
    groups: int  # E

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(-2)  # (..., E * in)
        # addmm on the 2D view adds the bias in the same kernel, also when x is a strided slice of a larger tensor
        out = torch.addmm(self.bias, flat.reshape(-1, flat.shape[-1]), self.weight.t())
        return out.reshape(*x.shape[:-2], self.groups, -1)


def block_diagonal(linears: Sequence[nn.Linear]) -> GroupedLinear:
    """``linears[e]`` applied to ``x[..., e, :]`` for every ``e`` at once (the E maps need equal shapes and biases)."""
    weight = torch.block_diag(*(linear.weight for linear in linears)) if len(linears) > 1 else linears[0].weight
    bias = torch.cat([linear.bias for linear in linears]) if len(linears) > 1 else linears[0].bias
    return GroupedLinear(weight, bias, len(linears))


def fold_layer_norms(pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the single linear map that computes ``cat([linear(norm(x)) for norm, linear in pairs])``
    from the normalised tokens ``x̂ = F.layer_norm(x, (D,), eps=eps)`` (no affine), shared by all norms.

    ``W (γ ⊙ x̂ + β) + c = (W diag γ) x̂ + (W β + c)``. The norms must share ``D`` and ``eps`` (checked by the caller).

    Args:
        pairs: ``(LayerNorm(D), Linear(D, out_i))`` per map.

    Returns:
        weight ``(Σ out_i, D)`` and bias ``(Σ out_i,)``.
    """
    weight = torch.cat([linear.weight for _, linear in pairs])  # (R, D)
    gamma = torch.cat([norm.weight.expand(linear.out_features, -1) for norm, linear in pairs])  # (R, D)
    beta = torch.cat([norm.bias.expand(linear.out_features, -1) for norm, linear in pairs])  # (R, D)
    bias = torch.cat([linear.bias for _, linear in pairs])  # (R,)
    return weight * gamma, (weight * beta).sum(dim=-1) + bias


def stacked_output_weight(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """``[U_1 … U_E  u_1 … u_E]`` ``(out, E * in + E)`` of E output projections ``x ↦ U_e x + u_e``, for
    :func:`weighted_sum`."""
    biases = torch.stack([linear.bias for linear in linears], dim=1)  # (out, E)
    return torch.cat([*(linear.weight for linear in linears), biases], dim=1)


def weighted_sum(x: torch.Tensor, weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``Σ_e weights[..., e] · (U_e x[..., e, :] + u_e)`` as one product with the :func:`stacked_output_weight`:
    ``Σ_e w_e (U_e x_e + u_e) = [U_1 … U_E  u_1 … u_E] · [w_1 x_1, …, w_E x_E, w_1, …, w_E]``.

    Args:
        x: ``(..., E, in)``.
        weights: ``(..., E)``.
        stacked: ``(out, E * in + E)``.

    Returns:
        ``(..., out)``.
    """
    scaled = torch.cat([(x * weights.unsqueeze(-1)).flatten(-2), weights], dim=-1)  # (..., E * in + E)
    return F.linear(scaled, stacked)
