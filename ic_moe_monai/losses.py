"""The IC-MoE training objective (DESIGN.md §4).

``ICMoELoss`` = Dice + CE on the logits
             + experts' deep supervision (each expert's per-token vote against the token's label)
             + router label-consistency (the router learns which experts agree with the label)
             + load balancing (Switch Transformers; keeps every expert in use)
             + semantic-guided contrastive (supervised contrastive with class prototypes as anchors).

Token-level labels are the label map's class fractions in each token's patch (a soft label).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

__all__ = [
    "ICMoELoss",
    "expert_supervision_loss",
    "load_balancing_loss",
    "router_consistency_loss",
    "router_consistency_target",
    "semantic_contrastive_loss",
    "token_labels",
]


def token_labels(target: torch.Tensor, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """Label map ``(B, 1, H, W)`` (or ``(B, H, W)``) → class fractions per token ``(B, h, w, num_classes)``."""
    if target.ndim == 4:
        target = target[:, 0]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid).permute(0, 2, 3, 1)


def expert_supervision_loss(expert_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of every expert's vote ``(B, L, h, w, E, C)`` against token labels ``(B, h, w, C)``."""
    log_p = F.log_softmax(expert_logits, dim=-1)
    return -(log_p * labels[:, None, :, :, None, :]).sum(dim=-1).mean()


def router_consistency_target(
    expert_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Per-token distribution over experts that favours the experts whose vote agrees with the label.

    An expert's consistency is the probability it gives to the token's label, ``s_e = Σ_c q_c p_e(c)``; the
    target is ``softmax(log s_e / temperature)`` over experts (sharper for lower temperature), without gradient.

    Args:
        expert_logits: ``(..., E, C)``; labels: ``(..., C)``, broadcastable against ``expert_logits[..., 0, :]``.
    """
    with torch.no_grad():
        agreement = (F.softmax(expert_logits, dim=-1) * labels.unsqueeze(-2)).sum(dim=-1)  # (..., E)
        return F.softmax(torch.log(agreement.clamp_min(1e-6)) / temperature, dim=-1)


def router_consistency_loss(
    router_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Cross-entropy between the router ``(B, L, h, w, E)`` and the label-consistency target."""
    target = router_consistency_target(expert_logits, labels.unsqueeze(1), temperature)
    return -(target * F.log_softmax(router_logits, dim=-1)).sum(dim=-1).mean()


def load_balancing_loss(router_logits: torch.Tensor, router_weights: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing, ``E · Σ_e f_e · P_e``, averaged over layers.

    ``f_e`` is the share of top-k slots given to expert e, ``P_e`` its mean router probability. The loss is 1 for
    perfectly uniform routing and grows as the routing collapses onto few experts (up to E / k).

    Args:
        router_logits, router_weights: ``(B, L, ..., E)``; the weights are non-zero exactly on the selected experts.
    """
    num_layers, num_experts = router_logits.shape[1], router_logits.shape[-1]
    logits = router_logits.transpose(0, 1).reshape(num_layers, -1, num_experts)
    selected = (router_weights.transpose(0, 1).reshape(num_layers, -1, num_experts) > 0).float()
    share = selected.sum(dim=1) / selected.sum(dim=(1, 2)).unsqueeze(-1)  # (L, E): f_e, sums to 1
    mean_prob = F.softmax(logits, dim=-1).mean(dim=1)  # (L, E): P_e
    return (num_experts * (share * mean_prob).sum(dim=-1)).mean()


def semantic_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    max_tokens: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Semantic-guided (supervised) contrastive loss on token embeddings, anchored on class prototypes.

    Tokens of the same ground-truth class are positives, all others negatives (Khosla et al. 2020). Each class's
    prototype is the normalised mean embedding of its tokens in the batch, and every token is also pulled to its
    own prototype against the others'. Tokens are sampled class-balanced (at most ``max_tokens``), so small
    structures are not drowned by background.

    Args:
        embeddings: ``(B, h, w, d)`` token embeddings; labels: ``(B, h, w, C)`` token class fractions.
    """
    z = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]), dim=-1)
    hard = labels.reshape(-1, labels.shape[-1]).argmax(dim=-1)
    classes = hard.unique()
    if len(classes) < 2:
        return z.sum() * 0.0  # nothing to contrast; keeps the graph
    prototypes = F.normalize(torch.stack([z[hard == c].mean(dim=0) for c in classes]), dim=-1)
    per_class = max(1, max_tokens // len(classes))
    picked = []
    for c in classes:
        idx = (hard == c).nonzero().squeeze(1)
        order = torch.randperm(len(idx), generator=generator, device="cpu").to(idx.device)
        picked.append(idx[order[:per_class]])
    idx = torch.cat(picked)
    zs, ys = z[idx], hard[idx]

    sim = zs @ zs.t() / temperature
    self_mask = torch.eye(len(idx), dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positives = (ys[:, None] == ys[None, :]) & ~self_mask
    has_pos = positives.any(dim=1)
    supcon = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_pos] / positives.sum(dim=1)[has_pos]).mean()

    proto_target = torch.searchsorted(classes, ys)
    anchored = F.cross_entropy(zs @ prototypes.t() / temperature, proto_target)
    return supcon + anchored


class ICMoELoss(nn.Module):
    """Total IC-MoE loss; each term has its own weight and its last value is kept in :attr:`last_terms`.

    Called as ``loss(outputs, target)`` with the network's train-mode dict (or a bare logits tensor, for which
    only Dice + CE apply) and a label map ``(B, 1, H, W)`` of class indices.

    Args:
        num_classes: foreground classes K (the logits have K + 1 channels).
        dice_weight, ce_weight: weights of Dice and cross-entropy on the logits.
        expert_weight: experts' deep supervision.
        router_weight: router label-consistency.
        balance_weight: load balancing.
        contrastive_weight: semantic-guided contrastive loss.
        temperature: contrastive temperature τ.
        router_temperature: sharpness of the router's consistency target.
        max_contrastive_tokens: tokens sampled per batch for the contrastive loss.
    """

    def __init__(
        self,
        num_classes: int,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        expert_weight: float = 0.2,
        router_weight: float = 0.1,
        balance_weight: float = 0.01,
        contrastive_weight: float = 0.1,
        temperature: float = 0.1,
        router_temperature: float = 0.5,
        max_contrastive_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = {
            "dice_ce": 1.0,
            "expert": expert_weight,
            "router": router_weight,
            "balance": balance_weight,
            "contrastive": contrastive_weight,
        }
        self.dice_ce = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=False,
            batch=True,
            lambda_dice=dice_weight,
            lambda_ce=ce_weight,
        )
        self.temperature = temperature
        self.router_temperature = router_temperature
        self.max_contrastive_tokens = max_contrastive_tokens
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 3:
            target = target.unsqueeze(1)
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs["logits"]
        terms = {"dice_ce": self.dice_ce(logits, target)}
        if not isinstance(outputs, torch.Tensor):
            grid = tuple(outputs["router_logits"].shape[2:4])
            labels = token_labels(target, self.num_classes + 1, grid)
            terms["expert"] = expert_supervision_loss(outputs["expert_logits"], labels)
            terms["router"] = router_consistency_loss(
                outputs["router_logits"], outputs["expert_logits"], labels, self.router_temperature
            )
            terms["balance"] = load_balancing_loss(outputs["router_logits"], outputs["router_weights"])
            terms["contrastive"] = semantic_contrastive_loss(
                outputs["embeddings"], labels, self.temperature, self.max_contrastive_tokens
            )
        total = sum(self.weights[name] * value for name, value in terms.items())
        self.last_terms = {name: float(value.detach()) for name, value in terms.items()}
        self.last_terms["total"] = float(total.detach())
        return total
