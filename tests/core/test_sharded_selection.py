"""Single-process pieces of the sharded selection (core/sparsity/sharded.py): the order-preserving
key map and the N:M alignment rule. The 2-process equality tests live in tests/sharded/test_selection.py."""

from __future__ import annotations

import torch

from lichtenberg.core.sparsity import check_sharded_nm, drop_and_grow, random_scores
from lichtenberg.core.sparsity.sharded import float_keys, nm_local_ok


def test_float_keys_order_like_the_floats_with_nan_lowest_and_signed_zeros_equal():
    x = torch.tensor([float("nan"), float("-inf"), -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 1e-30, 0.5, 2.0, 3e38,
                      float("inf")])
    keys = float_keys(x)
    assert keys.dtype == torch.int64
    assert keys[0] == keys[1]  # NaN ranks like -inf
    assert keys[5] == keys[6]  # -0.0 == +0.0, as float comparison says
    assert (keys[2:6].diff() > 0).all() and (keys[6:].diff() > 0).all()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 10_000, generator=g) * torch.logspace(-30, 30, 10_000)
    assert torch.equal(float_keys(a) < float_keys(b), a < b)
    assert torch.equal(float_keys(a) == float_keys(b), a == b)
    assert float_keys(torch.tensor([1.0], dtype=torch.bfloat16)) == float_keys(torch.tensor([1.0]))
    # every key fits the bisection's int32 range
    assert keys.min() >= -2**31 and keys.max() < 2**31


def test_nm_groups_stay_local_only_when_shard_boundaries_fall_on_groups():
    assert nm_local_ok(torch.Size([15, 8]), 0, 2, 4)  # rows local
    assert nm_local_ok(torch.Size([6, 8]), 1, 2, 4)  # Conv1D rows view, inputs split 4 + 4
    assert not nm_local_ok(torch.Size([6, 12]), 1, 2, 4)  # 6 + 6
    assert nm_local_ok(torch.Size([6, 12]), 1, 2, 2)
    assert nm_local_ok(torch.Size([6, 4]), 1, 1, 4)  # one rank holds every input
    assert not nm_local_ok(torch.Size([6, 4]), 1, 8, 4)  # one input per rank
    assert not nm_local_ok(torch.Size([6, 8, 3]), 2, 2, 4)


def test_whole_tensor_paths_are_unchanged_by_the_sharded_options():
    check_sharded_nm("w", torch.zeros(4, 8), None, 4)  # a whole tensor: just check_nm
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = torch.zeros(3, 5)
    assert torch.equal(random_scores(ref, g1), torch.rand(3, 5, generator=g2))
    w, mask, grow = torch.randn(6, 4), torch.rand(6, 4) > 0.5, torch.rand(6, 4)
    one = drop_and_grow(w, mask, 2, grow)
    both = drop_and_grow({"w": w}, {"w": mask}, {"w": 2}, {"w": grow})
    assert torch.equal(both["w"], one)
