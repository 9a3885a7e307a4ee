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

# logit for masked pairs / classes: exp() of it is 0 next to real logits (|logit| ≤ 1/τ), and, unlike -inf, a row
# with nothing left stays finite (no NaN in forward or backward); representable in float16 and bfloat16
_MASKED = -1.0e4


def token_labels(target: torch.Tensor, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """Label map ``(B, 1, H, W)`` (or ``(B, H, W)``) → class fractions per token ``(B, h, w, num_classes)``."""
    if target.ndim == 3:
        target = target[:, None]
    # a comparison rather than F.one_hot, which reads the labels' range on the host (a device sync) off CUDA
    one_hot = (target.long() == torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)).float()
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
    own prototype against the other present classes' prototypes. Tokens are sampled class-balanced, so small
    structures are not drowned by background: up to ``max_tokens // C`` tokens of each of the C classes (a class
    with fewer tokens gives all of them). The loss is zero when fewer than two classes are present.

    Free of host syncs and of data-dependent shapes (so a training step can run as one CUDA graph): the sample is
    always ``C × (max_tokens // C)`` slots, drawn per class by random scores and ``topk``, with a mask for the slots
    of classes that have fewer tokens; prototypes are one matmul with the one-hot labels. (Before, the quota was
    ``max_tokens // (classes present)``; now absent classes keep their empty slots.)

    Args:
        embeddings: ``(B, h, w, d)`` token embeddings.
        labels: ``(B, h, w, C)`` token class fractions; each token's class is their argmax.
        temperature: τ of both terms.
        max_tokens: size of the class-balanced token sample.
        generator: random generator on the embeddings' device (default: the global one).
    """
    z = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]), dim=-1)
    num_tokens, num_classes = z.shape[0], labels.shape[-1]
    hard = labels.reshape(-1, num_classes).argmax(dim=-1)
    member = hard[:, None] == torch.arange(num_classes, device=z.device)  # (N, C)
    counts = member.sum(dim=0)  # (C,)
    present = counts > 0
    onehot = member.to(z.dtype)
    prototypes = F.normalize((onehot.t() @ z) / counts.clamp_min(1).unsqueeze(1).to(z.dtype), dim=-1)  # (C, d)

    # class-balanced sample without replacement: the top random scores among each class's tokens
    per_class = min(max(1, max_tokens // num_classes), num_tokens)
    scores = torch.rand(num_tokens, device=z.device, generator=generator)
    top = torch.where(member, scores[:, None], -1.0).topk(per_class, dim=0)  # (per_class, C)
    idx = top.indices.t().reshape(-1)  # (M,), class-major
    valid = (top.values >= 0).t().reshape(-1)
    ys = torch.arange(num_classes, device=z.device)[:, None].expand(num_classes, per_class).reshape(-1)
    zs = z[idx]

    # supervised contrastive over the valid sampled tokens (each anchor against all other valid tokens)
    eye = torch.eye(len(idx), dtype=torch.bool, device=z.device)
    pairs = valid[:, None] & valid[None, :] & ~eye
    sim = (zs @ zs.t()) / temperature
    log_prob = sim.masked_fill(~pairs, _MASKED).float().log_softmax(dim=1)  # finite even for empty rows
    positives = pairs & (ys[:, None] == ys[None, :])
    num_pos = positives.sum(dim=1)
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / num_pos.clamp_min(1)
    has_pos = num_pos > 0
    supcon = (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)

    # every valid token against the present classes' prototypes
    proto_logits = ((zs @ prototypes.t()) / temperature).masked_fill(~present[None, :], _MASKED).float()
    anchored = (F.cross_entropy(proto_logits, ys, reduction="none") * valid).sum() / valid.sum().clamp_min(1)

    loss = supcon + anchored
    return torch.where(present.sum() >= 2, loss, loss * 0.0)  # nothing to contrast: zero, graph kept


class ICMoELoss(nn.Module):
    """Total IC-MoE loss; each term has its own weight and its last value is kept for logging.

    Called as ``loss(outputs, target)`` with the network's train-mode dict (or a bare logits tensor, for which
    only Dice + CE apply) and a label map ``(B, 1, H, W)`` of class indices.

    The terms' last values stay on the device, detached, in one tensor (:attr:`last_values`, in the order of
    :attr:`term_names`, ``total`` last), so a training step never waits for the device to log them.
    :attr:`last_terms` gives them as ``{name: float}`` and syncs only when read. The values are written in place
    into the same buffer at every call, so a step replayed as a CUDA graph updates them too.

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
        self._term_names: tuple[str, ...] = ()
        self._last_values: torch.Tensor | None = None
        self._buffers: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the values in :attr:`last_values`: the terms of the last call, then ``"total"``."""
        return self._term_names

    @property
    def last_values(self) -> torch.Tensor | None:
        """The last call's terms and total, detached, on the loss's device (no host sync); ``None`` before a call."""
        return self._last_values

    @property
    def last_terms(self) -> dict[str, float]:
        """Each term's last value and the total as floats (one host sync, when read)."""
        if self._last_values is None:
            return {}
        return dict(zip(self._term_names, self._last_values.tolist(), strict=True))

    def _keep(self, terms: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        names = (*terms, "total")
        values = [value.detach().float() for value in (*terms.values(), total)]
        buffer = self._buffers.get(names)
        if buffer is None or buffer.device != total.device:
            buffer = self._buffers[names] = torch.zeros(len(names), device=total.device)
        torch.stack(values, out=buffer)  # one kernel, in place
        self._term_names, self._last_values = names, buffer

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
        self._keep(terms, total)
        return total
