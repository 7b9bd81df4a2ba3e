"""Sparsity math: masks, allocation, schedules, the engine. No Trainer here."""

import copy
import math

import pytest
import torch
from torch import nn

from lichtenberg.core.schedules import SparsitySchedule, resolve_step
from lichtenberg.core.sparsity import (
    InputNorms,
    MaskEngine,
    allocate,
    check_nm,
    erk_densities,
    export_sparse_,
    lamp_scores,
    nm_mask,
    parse_pattern,
    prune_masks,
    topk_mask,
    wanda_score,
)
from lichtenberg.core.targets import Targets, select_targets


def test_topk_mask_exact_count_and_deterministic_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    mask = topk_mask(scores, 3)
    # 3 kept: the 3.0 and the two lowest-index 2.0s.
    assert mask.tolist() == [True, False, True, True, False, False]
    big = torch.randint(0, 5, (1000,)).float()  # many ties
    for k in (0, 1, 137, 999, 1000):
        m = topk_mask(big, k)
        assert int(m.sum()) == k
        assert torch.equal(m, topk_mask(big.clone(), k))
        if 0 < k < 1000:
            assert big[m].min() >= big[~m].max()


def test_nm_mask_keeps_n_of_every_m_along_inputs():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    mask = nm_mask(w.abs(), 2, 4)
    groups = mask.reshape(8, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept = w.abs().reshape(8, 4, 4)[groups].reshape(8, 4, 2)
    dropped = w.abs().reshape(8, 4, 4)[~groups].reshape(8, 4, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    conv = nm_mask(torch.rand(4, 2, 2, 2), 4, 8)
    assert (conv.reshape(4, -1).sum(1) == 4).all()


def test_pattern_parsing_and_divisibility():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    with pytest.raises(ValueError, match="0 < N <= M"):
        parse_pattern("5:4")
    with pytest.raises(ValueError, match="'N:M'"):
        parse_pattern("half")
    with pytest.raises(ValueError, match="not divisible by M=4"):
        check_nm("fc.weight", torch.Size([3, 6]), 4)


def test_uniform_and_global_allocation_totals():
    scores = {"a": torch.rand(100), "b": torch.rand(50) * 10}
    uniform = allocate(scores, 0.8, "uniform")
    assert uniform == {"a": 20, "b": 10}
    glob = allocate(scores, 0.8, "global")
    assert sum(glob.values()) == 30
    assert glob["b"] > glob["a"]  # b's scores are 10x larger


def test_global_floor_keeps_every_layer_alive():
    scores = {"small": torch.rand(100) * 1e-3, "big": torch.rand(1000)}
    assert allocate(scores, 0.9, "global")["small"] == 0
    floor = allocate(scores, 0.9, "global_floor", floor=0.05)
    assert floor["small"] == 5 and sum(floor.values()) == 110


def test_lamp_scores_match_the_definition():
    w = torch.tensor([3.0, -1.0, 2.0])
    # ascending w^2: 1, 4, 9 -> 1/14, 4/13, 9/9
    torch.testing.assert_close(lamp_scores(w), torch.tensor([1.0, 1 / 14, 4 / 13]))


def test_erk_densities_hit_the_budget_and_cap_at_one():
    shapes = {"in": torch.Size([256, 4]), "mid": torch.Size([256, 256]), "out": torch.Size([10, 256])}
    dens = erk_densities(shapes, 0.1)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(dens[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.1 * total)
    assert dens["in"] == 1.0 and dens["mid"] < dens["out"] < 1.0


def test_prune_masks_are_monotone():
    torch.manual_seed(0)
    w = {"a": torch.randn(20, 10), "b": torch.randn(5, 10)}
    masks = {n: torch.ones_like(t, dtype=torch.bool) for n, t in w.items()}
    for s in (0.3, 0.6, 0.9):
        scores = {n: t.abs() + torch.rand_like(t) for n, t in w.items()}  # scores change between events
        new = prune_masks(scores, masks, s, "global")
        assert all((~masks[n] <= ~new[n]).all() for n in w), "a pruned weight came back"
        assert sum(int(m.sum()) for m in new.values()) == round((1 - s) * 250)
        masks = new


@pytest.mark.parametrize("kind", ["cubic", "linear", "one_shot"])
def test_schedule_values(kind):
    sched = SparsitySchedule(kind=kind, start=10, end=50, every_n_steps=10)
    start, end = sched.resolve(100)
    assert (start, end) == ((10, 10) if kind == "one_shot" else (10, 50))
    assert sched.value(9, 0.9, start, end) == 0.0
    assert sched.value(end, 0.9, start, end) == 0.9
    assert sched.value(99, 0.9, start, end) == 0.9
    if kind == "cubic":
        # Zhu & Gupta at t = 30: s_f + (s_i - s_f)(1 - 20/40)^3 = 0.9 - 0.9 / 8
        assert sched.value(30, 0.9, start, end) == pytest.approx(0.9 - 0.9 / 8)
        assert sched.value(35, 0.9, start, end) == sched.value(30, 0.9, start, end)  # holds between events
    if kind == "linear":
        assert sched.value(30, 0.9, start, end) == pytest.approx(0.45)
    events = [t for t in range(100) if sched.is_event(t, start, end)]
    assert events == ([10] if kind == "one_shot" else [10, 20, 30, 40, 50])


def test_schedule_resolution_and_bad_input():
    assert SparsitySchedule(start=0.1, end=0.5).resolve(200) == (20, 100)
    assert resolve_step(7, 100, "x") == 7
    with pytest.raises(ValueError, match="after end"):
        SparsitySchedule(start=50, end=10)
    with pytest.raises(ValueError, match="training stops at step 100"):
        SparsitySchedule(start=10, end=150).resolve(100)
    with pytest.raises(ValueError, match=r"run's length is unknown.*max_steps"):
        SparsitySchedule(start=0.1, end=0.5).resolve(None)  # an IterableDataset with max_epochs only
    with pytest.raises(ValueError, match="every_n_steps=0"):
        SparsitySchedule(every_n_steps=0)


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(1, 4, 3), nn.Linear(4, 2))


def test_select_targets_reports_what_it_leaves_out():
    sel = select_targets(_net(), Targets())
    assert list(sel.params) == ["0.weight", "3.weight", "4.weight"]
    assert "module type BatchNorm1d not targeted" in sel.skipped["1.weight"]
    sel = select_targets(_net(), Targets(types=["Linear"], exclude=["4"]))
    assert list(sel.params) == ["0.weight"] and "excluded by '4'" in sel.report()
    with pytest.raises(ValueError, match=r"\['enc\*'\] match no module"):
        select_targets(_net(), Targets(include=["enc*"]))
    with pytest.raises(ValueError, match="has no parameter 'scale'"):
        select_targets(_net(), Targets(types=["Linear"], param="scale"))


def test_engine_masks_weights_grads_and_optimizer_state():
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(3, 6)).sum().backward()
    opt.step()  # Adam state now non-zero everywhere
    engine = MaskEngine.attach_(net, {"weight": net.weight})
    assert "weight_mask" in net.state_dict() and net.weight_mask.dtype == torch.bool
    mask = topk_mask(net.weight.abs(), 6)
    changed = engine.set_masks_({"weight": mask}, [opt])
    assert changed == {"weight": 18}
    assert (net.weight[~mask] == 0).all()
    for value in opt.state[net.weight].values():
        if value.shape == net.weight.shape:
            assert (value[~mask] == 0).all() and (value[mask] != 0).any()
    net.weight.grad.fill_(float("nan"))
    engine.mask_grads_()
    assert (net.weight.grad[~mask] == 0).all() and net.weight.grad[mask].isnan().all()
    nonzeros = engine.squash_()
    assert nonzeros == {"weight": 6} and "weight_mask" not in net.state_dict()


def test_wanda_prefers_inputs_with_large_activations():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 0.1, 0.1]]))
    x = torch.tensor([[0.1, 0.1, 10.0, 10.0]])
    with InputNorms({"w": lin}) as norms:
        lin(x)
    sq = norms.norms()["w"]
    torch.testing.assert_close(sq, x.pow(2).sum(0))
    keep = topk_mask(wanda_score(lin.weight, sq), 2)
    assert keep.tolist() == [[False, False, True, True]]  # magnitude alone would keep the first two


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_export_squashes_masks_and_csr_matches_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    params = {n: p for n, p in net.named_parameters() if n.endswith("weight")}
    engine = MaskEngine.attach_(net, params)
    engine.set_masks_({n: topk_mask(p.abs(), p.numel() // 10) for n, p in params.items()})
    x = torch.randn(5, 16)
    expected = net(x)
    dense = copy.deepcopy(net)
    report = export_sparse_(dense)
    assert report == {"0.weight": {"shape": (8, 16), "nonzeros": 12, "density": 12 / 128},
                      "2.weight": {"shape": (4, 8), "nonzeros": 3, "density": 3 / 32}}
    assert not any(k.endswith("_mask") for k in dense.state_dict())
    torch.testing.assert_close(dense(x), expected)
    csr = copy.deepcopy(net)
    export_sparse_(csr, layout="csr")
    assert csr[0].weight.layout == torch.sparse_csr
    torch.testing.assert_close(csr(x), expected)
    with pytest.raises(ValueError, match="no `<param>_mask` buffers"):
        export_sparse_(nn.Linear(2, 2))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            export_sparse_(copy.deepcopy(net), layout="semi_structured")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_masked_bits_zero_pruned_slots_exactly_and_leave_kept_bits_alone(dtype):
    from lichtenberg.core.sparsity import masked_bits_

    x = torch.tensor([1.5, -2.0, float("nan"), float("inf"), -0.0, 3.0], dtype=dtype)
    mask = torch.tensor([True, False, False, False, True, True])
    before = x.clone()
    masked_bits_([x], [mask])
    assert x[~mask].eq(0).all() and not x[~mask].signbit().any()  # +0.0, NaN and inf cleared
    assert torch.equal(x[mask].view(torch.uint8), before[mask].view(torch.uint8))  # bit-identical (-0.0 kept)


def test_sr_ste_decays_pruned_latent_weights_and_keeps_exact_nm():
    from lichtenberg.core.sparsity.srste import SRSTE

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    engine = MaskEngine.attach_(layer, {"weight": layer.weight})
    srste = SRSTE(engine, 2, 4, decay=0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    dense = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    srste.before_step_()
    kept = layer.weight_mask.clone()
    opt.step()
    srste.after_step_()
    # Zero loss gradient: kept latent weights unchanged, pruned ones shrunk by (1 - lr * decay).
    assert torch.allclose(srste.latent["weight"], torch.where(kept, dense, 0.5 * dense))
    assert torch.equal(layer.weight, torch.where(layer.weight_mask, srste.latent["weight"], 0.0))
    assert ((layer.weight != 0).reshape(-1, 4).sum(1) == 2).all()
    # A large gradient on a pruned slot makes it win its group at the next recomputation.
    slot = (~layer.weight_mask).nonzero()[0]
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.weight.grad[tuple(slot)] = -100.0
    srste.before_step_()
    opt.step()
    srste.after_step_()
    assert layer.weight_mask[tuple(slot)]
