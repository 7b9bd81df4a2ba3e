"""Reweighting math and data-pruning plans: weights, unbiasedness, scores, the plan sampler."""

from __future__ import annotations

import pytest
import torch

from lichtenberg.core.reweighting import (
    RULES,
    PlanSampler,
    effective_sample_size,
    el2n_scores,
    focal_weights,
    grand_scores,
    infobatch_plan,
    loss_weights,
    normalize_losses,
    sampler_order,
    static_keep,
    weight_entropy,
)


@pytest.mark.parametrize("rule", RULES)
def test_weights_are_nonnegative_with_mean_one_and_carry_no_gradient(rule):
    torch.manual_seed(0)
    losses = (torch.rand(64) * 3).requires_grad_()
    w = loss_weights(losses, rule, temperature=0.5)
    assert (w >= 0).all() and torch.isclose(w.mean(), torch.tensor(1.0), atol=1e-6)
    assert not w.requires_grad


@pytest.mark.parametrize("rule", [r for r in RULES if r != "uniform"])
def test_weights_become_uniform_as_temperature_grows(rule):
    losses = torch.rand(32) * 5
    assert (loss_weights(losses, rule, 1e6) - 1).abs().max() < 1e-4
    assert (loss_weights(losses, rule, 0.1) - 1).abs().max() > 0.1


def test_rule_shapes_follow_the_paper():
    losses = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # x = -1, -0.5, 0, 0.5, 1
    assert torch.allclose(normalize_losses(losses), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    lin = loss_weights(losses, "linupper")
    assert lin[0] < lin[1] < lin[2] and torch.allclose(lin[2:], lin[2].expand(3))  # flat on the upper half
    quad = loss_weights(losses, "quadratic")
    assert quad.argmax() == 2 and torch.isclose(quad[0], quad[4])
    ext = loss_weights(losses, "extremes")
    assert ext.argmin() == 2
    assert loss_weights(losses, "softmax").argmax() == 4 and loss_weights(losses, "softmin").argmax() == 0
    # softmax(f / r) exactly, scaled to mean 1
    expected = torch.softmax(torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0]) / 0.7, 0) * 5
    assert torch.allclose(loss_weights(losses, "linupper", 0.7), expected)


PAPER_TRANSFORMS = {  # f(x) on x in [-1, 1], as written in Sow et al. (and the module docstring)
    "linupper": lambda x: torch.clamp(x + 1, max=1.0),
    "quadratic": lambda x: 1 - x * x,
    "extremes": lambda x: x.abs(),
    "softmax": lambda x: x,
    "softmin": lambda x: -x,
}


@pytest.mark.parametrize("rule", sorted(PAPER_TRANSFORMS))
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_weights_equal_the_papers_formula(rule, temperature):
    """The fused implementation against softmax(f(normalise(l)) / T) * n written out."""
    torch.manual_seed(2)
    losses = torch.rand(64) * 4
    x = normalize_losses(losses)
    expected = torch.softmax(PAPER_TRANSFORMS[rule](x) / temperature, 0) * 64
    assert torch.allclose(loss_weights(losses, rule, temperature), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(loss_weights(torch.full((8,), 0.7), rule, temperature), torch.ones(8))  # constant batch


def test_focal_ess_and_entropy():
    losses = torch.tensor([0.01, 0.1, 1.0, 3.0])
    w = focal_weights(losses, 2.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0)) and (w.diff() > 0).all()
    ones = torch.ones(8)
    assert effective_sample_size(ones) == 1 and torch.isclose(weight_entropy(ones), torch.tensor(1.0))
    peaked = torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0])
    assert torch.isclose(effective_sample_size(peaked), torch.tensor(1 / 8)) and weight_entropy(peaked) < 0.01


def test_infobatch_rescaled_gradient_is_unbiased_monte_carlo():
    torch.manual_seed(0)
    n = 200
    scores = torch.rand(n)
    seen = torch.ones(n, dtype=torch.bool)
    seen[:10] = False  # never seen: always kept
    grads = torch.randn(n, 5)  # a fixed per-sample "gradient"
    full = grads.sum(0)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(5)
    draws = 40000
    kept_counts = 0
    for _ in range(draws):
        ids, weights = infobatch_plan(scores, seen, 0.5, g)
        total += (weights[ids, None] * grads[ids]).sum(0)
        kept_counts += ids.numel()
    mean = total / draws
    assert ((mean - full).norm() / full.norm()) < 0.01
    well_learned = int((seen & (scores < scores[seen].mean())).sum())
    assert abs(kept_counts / draws - (n - 0.5 * well_learned)) < 2  # the epoch is shorter by r * |L|


def test_infobatch_keeps_unseen_and_high_loss_items():
    scores = torch.tensor([0.1, 0.2, 5.0, 6.0, 0.0])
    seen = torch.tensor([True, True, True, True, False])
    for seed in range(20):
        ids, w = infobatch_plan(scores, seen, 0.9, torch.Generator().manual_seed(seed))
        assert {2, 3, 4} <= set(ids.tolist())
        assert torch.allclose(w[[2, 3, 4]], torch.ones(3))
        assert all(torch.isclose(w[i], torch.tensor(10.0)) for i in ids.tolist() if i in (0, 1))


def test_static_keep_and_el2n_and_grand():
    assert static_keep(torch.tensor([0.1, 0.9, 0.5, 0.7]), keep=0.5).tolist() == [1, 3]
    assert static_keep(torch.tensor([0.1, 0.9, 0.5, 0.7]), keep=0.5, offset=0.25).tolist() == [2, 3]
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    e = el2n_scores(logits, torch.tensor([0, 0]))
    assert e[0] < 1e-3 and torch.isclose(e[1], torch.tensor(2.0).sqrt(), atol=1e-3)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    scores = grand_scores(model, torch.nn.functional.cross_entropy, x, y)
    for i in range(4):  # against a plain per-sample backward
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert torch.isclose(scores[i], norm, atol=1e-6)


def test_plan_sampler_gives_disjoint_equal_shares_without_padding():
    dataset = list(range(23))
    plan = torch.tensor([5, 1, 9, 3, 7, 0, 22, 11, 13, 2, 8])  # 11 kept ids, in plan order
    shares = [list(PlanSampler(dataset, lambda e: plan, lambda: 0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3] and all(len(PlanSampler(dataset, lambda e: plan, lambda: 0, 3, r)) == 3
                                                          for r in range(3))
    flat = sum(shares, [])
    assert len(set(flat)) == 9 and set(flat) <= set(plan.tolist())  # each once, the remainder left out
    skipped = list(PlanSampler(dataset, lambda e: plan, lambda: 0, 3, 0, skip=lambda: 2))
    assert skipped == shares[0][2:]


def test_sampler_order_reads_one_epoch_of_a_sampler_in_order():
    class Epochs(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([self.epoch, 3, 3, torch.tensor(0)])  # repeats and 0-d tensors are ids too

    sampler = Epochs()
    assert sampler_order(sampler, 2, n=5).tolist() == [2, 3, 3, 0] and sampler.epoch == 2
    assert sampler_order(range(4, -1, -1), 0, n=5).tolist() == [4, 3, 2, 1, 0]  # no set_epoch: as it comes
    with pytest.raises(ValueError, match=r"ids outside the dataset's \[0, 4\)"):
        sampler_order(range(5), 0, n=4)
    with pytest.raises(ValueError, match="integer dataset ids"):
        sampler_order(["a", "b"], 0, n=4)
