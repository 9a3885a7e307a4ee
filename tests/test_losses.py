"""Router, voting and the IC-MoE loss terms."""

from __future__ import annotations

import itertools

import torch

from ic_moe_monai.losses import (
    ICMoELoss,
    expert_supervision_loss,
    load_balancing_loss,
    router_consistency_target,
    semantic_contrastive_loss,
    token_labels,
)
from ic_moe_monai.networks import ICMoE, TopKRouter


def test_top_k_selects_exactly_k_experts_per_token():
    torch.manual_seed(0)
    for k in (1, 2, 3):
        router = TopKRouter(dim=32, num_experts=5, top_k=k)
        out = router(torch.randn(2, 7, 9, 32))
        selected = out.weights > 0
        assert torch.equal(selected.sum(-1), torch.full((2, 7, 9), k))
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 7, 9))
        # the selected experts are those with the highest scores
        assert torch.equal(selected, torch.zeros_like(selected).scatter(-1, out.logits.topk(k, -1).indices, True))


def _routing(logits: torch.Tensor, k: int = 2):
    out = TopKRouter(dim=1, num_experts=logits.shape[-1], top_k=k).route(logits)
    return out.logits[:, None], out.weights[:, None]  # (tokens as batch, one layer, E)


def test_load_balancing_minimal_for_uniform_and_grows_with_collapse():
    torch.manual_seed(0)
    tokens, experts = 4096, 5
    uniform = _routing(torch.randn(tokens, experts) * 1e-3)
    losses = [load_balancing_loss(*uniform)]
    for bias in (1.0, 3.0, 10.0):  # growing preference for expert 0
        logits = torch.randn(tokens, experts) * 1e-3
        logits[:, 0] += bias
        logits[:, 1] += bias / 2
        losses.append(load_balancing_loss(*_routing(logits)))
    assert abs(losses[0].item() - 1.0) < 0.02
    assert all(a < b for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] > 2.0


def test_router_target_prefers_the_expert_that_predicts_the_label():
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # two tokens: class 1, class 2
    expert_logits = torch.tensor(
        [
            [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]],  # token 0: expert 1 is right
            [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]],  # token 1: expert 2 is right
        ]
    )
    target = router_consistency_target(expert_logits, labels)
    assert target.argmax(-1).tolist() == [1, 2]
    torch.testing.assert_close(target.sum(-1), torch.ones(2))
    assert target[0, 1] > 0.9


def test_expert_supervision_rewards_correct_votes():
    labels = token_labels(torch.randint(0, 3, (2, 1, 32, 32)), 3, (8, 8))
    right = torch.log(labels.clamp_min(1e-3))[:, None, :, :, None, :].expand(2, 1, 8, 8, 4, 3)
    wrong = right.flip(-1)
    assert expert_supervision_loss(right, labels) < expert_supervision_loss(wrong, labels)


def test_token_labels_are_class_fractions():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., :4, :2] = 1  # half of the top-left 4x4 token
    labels = token_labels(target, 2, (2, 2))
    torch.testing.assert_close(labels[0, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(labels[0, 1, 1], torch.tensor([1.0, 0.0]))


def test_contrastive_lower_for_class_clustered_embeddings():
    torch.manual_seed(0)
    classes = torch.randint(0, 3, (2, 8, 8))
    labels = torch.nn.functional.one_hot(classes, 3).float()
    centres = torch.randn(3, 16) * 3
    clustered = centres[classes] + 0.1 * torch.randn(2, 8, 8, 16)
    mixed = torch.randn(2, 8, 8, 16)
    assert semantic_contrastive_loss(clustered, labels) < 0.5 * semantic_contrastive_loss(mixed, labels)
    one_class = torch.nn.functional.one_hot(torch.zeros(2, 8, 8, dtype=torch.long), 3).float()
    assert semantic_contrastive_loss(mixed, one_class) == 0.0


def test_icmoe_loss_terms_weights_and_gradients():
    torch.manual_seed(0)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite", freeze_encoder=False).train()
    x = torch.rand(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 1, 64, 64))
    outputs = model(x)
    loss_fn = ICMoELoss(num_classes=2)
    total = loss_fn(outputs, y)
    assert set(loss_fn.last_terms) == {"dice_ce", "expert", "router", "balance", "contrastive", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in loss_fn.last_terms.values())
    expected = sum(loss_fn.weights[k] * loss_fn.last_terms[k] for k in loss_fn.weights)
    assert abs(total.item() - expected) < 1e-5
    total.backward()
    assert model.moe_layers["3"].router.score.weight.grad.abs().sum() > 0
    assert model.projection_head[0].weight.grad.abs().sum() > 0

    only_seg = ICMoELoss(num_classes=2, expert_weight=0, router_weight=0, balance_weight=0, contrastive_weight=0)
    value = only_seg(model(x), y)
    assert abs(value.item() - only_seg.last_terms["dice_ce"]) < 1e-6
    # eval-mode logits alone: Dice + CE only
    model.eval()
    with torch.no_grad():
        only_seg(model(x), y[:, 0])
    assert set(only_seg.last_terms) == {"dice_ce", "total"}
