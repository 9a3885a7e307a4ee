"""Router, voting and the IC-MoE loss terms."""

from __future__ import annotations

import itertools

import pytest
import torch

from ic_moe_monai.networks import ICMoE, TopKRouter
from ic_moe_monai.training.losses import (
    ICMoELoss,
    expert_supervision_loss,
    load_balancing_loss,
    router_consistency_target,
    semantic_contrastive_loss,
    token_labels,
)
from tests.amp_emulation import CudaAutocastEmulation
from tests.test_slice_sampling import NoHostSyncOrData


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


# ------------------------------------------------------------------------------------------------ contrastive loss
def _reference_contrastive(z: torch.Tensor, hard: torch.Tensor, picked: list[int], temperature: float) -> torch.Tensor:
    """The loss written out plainly: loops over anchors and present classes, on the given sampled tokens."""
    z = torch.nn.functional.normalize(z, dim=-1)
    classes = sorted(set(hard.tolist()))
    if len(classes) < 2:
        return torch.tensor(0.0)
    prototypes = torch.stack([torch.nn.functional.normalize(z[hard == c].mean(0), dim=0) for c in classes])
    supcon, anchors, anchored = 0.0, 0, 0.0
    for i in picked:
        others = [j for j in picked if j != i]
        logits = torch.stack([z[i] @ z[j] / temperature for j in others])
        log_prob = logits.log_softmax(0)
        positives = [k for k, j in enumerate(others) if hard[j] == hard[i]]
        if positives:
            supcon = supcon - log_prob[positives].mean()
            anchors += 1
        proto_logits = prototypes @ z[i] / temperature
        anchored = anchored - proto_logits.log_softmax(0)[classes.index(int(hard[i]))]
    return supcon / max(anchors, 1) + anchored / len(picked)


def _case(seed: int, classes: tuple[int, ...], tokens=(2, 4, 5), dim=8):
    g = torch.Generator().manual_seed(seed)
    hard = torch.tensor(classes)[torch.randint(0, len(classes), tokens, generator=g)]
    labels = torch.nn.functional.one_hot(hard, 3).float()
    return torch.randn(*tokens, dim, generator=g), labels, hard.reshape(-1)


@pytest.mark.parametrize(("seed", "classes"), [(0, (0, 1, 2)), (1, (0, 2)), (2, (1, 2)), (3, (0, 1, 2))])
def test_contrastive_matches_a_plain_reference_when_every_token_is_sampled(seed, classes):
    emb, labels, hard = _case(seed, classes)
    value = semantic_contrastive_loss(emb, labels, temperature=0.2, max_tokens=3 * hard.numel())
    reference = _reference_contrastive(emb.reshape(-1, emb.shape[-1]), hard, list(range(hard.numel())), 0.2)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 4])
def test_contrastive_samples_class_balanced_tokens_like_the_reference(seed):
    """A small quota: each class gives its ``max_tokens // C`` tokens with the highest random scores."""
    emb, labels, hard = _case(seed, (0, 1, 2), tokens=(2, 6, 6))
    max_tokens = 12  # 4 per class
    value = semantic_contrastive_loss(emb, labels, 0.1, max_tokens, generator=torch.Generator().manual_seed(seed))
    scores = torch.rand(hard.numel(), generator=torch.Generator().manual_seed(seed))
    picked = []
    for c in range(3):
        members = (hard == c).nonzero().squeeze(1)
        picked += members[scores[members].argsort(descending=True)[:4]].tolist()
    reference = _reference_contrastive(emb.reshape(-1, emb.shape[-1]), hard, sorted(picked), 0.1)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)


def test_contrastive_edge_cases_have_finite_gradients():
    torch.manual_seed(0)
    hard = torch.zeros(1, 4, 4, dtype=torch.long)
    hard[0, 0, 0] = 2  # one token of class 2: an anchor without positives, still pulled to its prototype
    for case in (hard, torch.zeros_like(hard)):  # two classes present / one class only (loss 0)
        emb = torch.randn(1, 4, 4, 8, requires_grad=True)
        value = semantic_contrastive_loss(emb, torch.nn.functional.one_hot(case, 3).float(), max_tokens=6)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
        assert (value == 0) == (case.max() == 0)
    # more tokens requested than exist
    emb = torch.randn(1, 2, 2, 8, requires_grad=True)
    value = semantic_contrastive_loss(emb, torch.nn.functional.one_hot(hard[:, :2, :2], 3).float(), max_tokens=300)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()


# ------------------------------------------------------------------------------------------------ no host syncs
def _lite_outputs(batch=4, seed=0):
    torch.manual_seed(seed)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").train()
    y = torch.zeros(batch, 1, 64, 64, dtype=torch.long)
    y[:, :, 20:30, 16:40] = 1
    y[:, :, 34:40, 16:40] = 2
    return model, model(torch.rand(batch, 3, 64, 64)), y


def test_full_loss_and_backward_without_host_sync():
    """Forward and backward of every term run without one op that would wait for a GPU or change shape with the
    data (what CUDA graph capture needs); the terms are read on the host only when asked."""
    model, outputs, y = _lite_outputs()
    loss_fn = ICMoELoss(num_classes=2)
    with NoHostSyncOrData() as mode:
        total = loss_fn(outputs, y)
        total.backward()
        values = loss_fn.last_values
    assert mode.ops > 100 and model.projection_head[0].weight.grad is not None
    assert values.shape == (6,) and loss_fn.term_names[-1] == "total"
    terms = loss_fn.last_terms  # the one sync, outside
    assert terms["total"] == pytest.approx(total.item())
    assert all(k in str(terms) for k in ("dice_ce", "expert", "router", "balance", "contrastive", "total"))


def test_last_values_buffer_is_reused_in_place():
    """A CUDA-graph replay of the step updates the values the handlers read: the buffer is the same each call."""
    _, outputs, y = _lite_outputs(batch=2)
    loss_fn = ICMoELoss(num_classes=2)
    detached = {k: v.detach() for k, v in outputs.items()}
    loss_fn(detached, y)
    first = loss_fn.last_values
    before = first.clone()
    loss_fn(detached, torch.zeros_like(y))
    assert loss_fn.last_values is first and not torch.equal(first, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_under_cuda_autocast_policy(dtype):
    model, _, y = _lite_outputs(batch=2)
    x = torch.rand(2, 3, 64, 64)
    reference = ICMoELoss(num_classes=2)(model(x), y)
    with CudaAutocastEmulation(dtype) as mode:
        outputs = model(x)
        total = ICMoELoss(num_classes=2)(outputs, y)
    total.backward()
    assert mode.calls["low"] > 0 and total.dtype == torch.float32
    assert torch.isfinite(total) and abs(total.item() - reference.item()) < 0.05 * abs(reference.item()) + 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
