"""Dynamic-sparse-training policies: counts, selection, schedules, SRigL's fan-in and ablation."""

from __future__ import annotations

import math

import torch

from lichtenberg.core.sparsity import cosine_drop_fraction, drop_and_grow, fanin_masks, random_masks, srigl_update


def test_random_masks_keep_exact_counts_and_depend_only_on_the_generator():
    shapes = {"a": torch.Size([30, 7]), "b": torch.Size([5, 3, 3, 3])}
    densities = {"a": 0.2, "b": 0.5}
    one = random_masks(shapes, densities, torch.Generator().manual_seed(3))
    two = random_masks(shapes, densities, torch.Generator().manual_seed(3))
    other = random_masks(shapes, densities, torch.Generator().manual_seed(4))
    assert {n: int(m.sum()) for n, m in one.items()} == {"a": 42, "b": 68}
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert not torch.equal(one["a"], other["a"])


def test_fanin_masks_give_every_row_the_same_fan_in():
    masks = fanin_masks({"w": torch.Size([12, 4, 3, 3])}, {"w": 0.25}, torch.Generator().manual_seed(0))
    per_row = masks["w"].reshape(12, -1).sum(1)
    assert (per_row == 9).all()  # round(0.25 * 36)


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 0, 100, 0.3) == 0.3
    assert math.isclose(cosine_drop_fraction(50, 0, 100, 0.3), 0.15)
    assert cosine_drop_fraction(100, 0, 100, 0.3) == 0.0
    assert cosine_drop_fraction(150, 0, 100, 0.3) == 0.0


def test_drop_and_grow_drops_smallest_magnitude_and_grows_largest_score():
    weight = torch.tensor([[0.1, -5.0, 0.0, 3.0], [0.0, 0.2, -0.3, 0.0]])
    mask = weight != 0  # 5 active
    grad = torch.tensor([[0.0, 0.0, 9.0, 0.0], [1.0, 0.0, 0.0, 7.0]])
    new = drop_and_grow(weight, mask, 2, grad.abs())
    # Dropped: 0.1 and 0.2 (smallest |w|); grown: the two largest |grad| among the inactive: 9.0 and 7.0.
    expected = torch.tensor([[False, True, True, True], [False, False, True, True]])
    assert torch.equal(new, expected)
    assert int(new.sum()) == int(mask.sum())


def test_drop_and_grow_may_regrow_a_just_dropped_slot():
    weight = torch.tensor([1.0, 2.0, 0.0, 0.0])
    mask = weight != 0
    new = drop_and_grow(weight, mask, 1, torch.tensor([5.0, 0.0, 1.0, 1.0]))
    assert torch.equal(new, mask)


def test_srigl_keeps_constant_fan_in_and_ablates_a_neuron_without_salient_weights():
    torch.manual_seed(0)
    weight = torch.randn(5, 10)
    mask = fanin_masks({"w": weight.shape}, {"w": 0.4}, torch.Generator().manual_seed(0))["w"]  # fan-in 4
    weight = weight * mask
    weight[2] *= 1e-4  # neuron 2: tiny weights ...
    grad = torch.randn(5, 10)
    grad[2] = 0.0  # ... and no gradient: nothing salient
    alive = torch.ones(5, dtype=torch.bool)
    new, alive = srigl_update(weight, grad, mask, alive, drop_fraction=0.3, gamma=0.3)
    assert alive.tolist() == [True, True, False, True, True]
    assert not new[2].any()
    fan_in = new[alive].sum(1)
    assert (fan_in == fan_in[0]).all()
    assert int(fan_in[0]) == 5  # the ablated neuron's 4 weights re-spread: 20 // 4 alive neurons
    # Without a weak neuron nothing is ablated and the fan-in stays 4.
    strong = torch.randn(5, 10) * mask
    new, alive = srigl_update(strong, torch.randn(5, 10), mask, torch.ones(5, dtype=torch.bool), 0.3, 0.3)
    assert alive.all() and (new.sum(1) == 4).all()
