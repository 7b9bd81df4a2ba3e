"""GradualPruning and DynamicSparseTraining under FSDP2 (ModelParallelStrategy, 2 processes,
gloo) against the same seeded DDP run: masks exactly equal, weights to float tolerance,
optimizer state zeroed in the changed slots on every shard, masks and per-weight state
saved sharded by the distributed checkpoint and restored bit-exact, uneven shards, and no
gather or host sync in the per-step path between events. One launch runs every scenario."""

from __future__ import annotations

import pytest
import torch

from lichtenberg.core.sparsity import erk_densities
from tests.sharded.launch import result
from tests.sharded.sparsity_scenarios import SCENARIOS

pytestmark = pytest.mark.slow

MASKS = ("net.0.weight_mask", "net.3.weight_mask")


def scenarios(items):
    return "sparsity_scenarios", SCENARIOS



def _same_run(r0: dict, masks=MASKS) -> None:
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert not ddp["sharded"] and fsdp["sharded"]
    assert fsdp["step"] == ddp["step"] > 0
    assert ddp["model"].keys() <= fsdp["model"].keys()
    for key, x in ddp["model"].items():
        y = fsdp["model"][key]
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), f"{key} differs"
    for key in masks:  # exact, and actually sparse
        assert fsdp["model"][key].dtype == torch.bool and not fsdp["model"][key].all(), key


def _reset_slots(r0: dict, r1: dict) -> None:
    """Right after the first mask change: momentum is zero in every changed slot, on each shard,
    and the whole momentum / masks match DDP's."""
    ddp, fsdp = r0["ddp"]["probe"], r0["fsdp2"]["probe"]
    assert ddp is not None and fsdp is not None and ddp["step"] == fsdp["step"]
    changes = 0
    for rank in (r0, r1):
        for name, (before, after, momentum) in rank["fsdp2"]["probe"]["local"].items():
            changed = before ^ after
            changes += int(changed.sum())
            assert (momentum[changed] == 0).all(), f"{name}: a reset slot kept its momentum on a shard"
            assert (momentum[after] != 0).any(), name
    assert changes > 0
    for name, (before, after, momentum) in ddp["whole"].items():
        fb, fa, fm = fsdp["whole"][name]
        assert torch.equal(fb, before) and torch.equal(fa, after), name
        torch.testing.assert_close(fm, momentum, rtol=1e-5, atol=1e-6)


def test_uneven_shards(results):
    r0, r1 = result(results, "pruning_global")
    assert r0["fsdp2"]["local_shapes"]["net.0.weight"] == (8, 8)
    assert r1["fsdp2"]["local_shapes"]["net.0.weight"] == (7, 8)


@pytest.mark.parametrize("name", ["pruning_global", "pruning_lamp", "pruning_erk", "pruning_uniform"])
def test_gradual_pruning_fsdp2_equals_ddp(results, name):
    r0, r1 = result(results, name)
    _same_run(r0)
    _reset_slots(r0, r1)
    assert r0["fsdp2"]["events"] == r0["ddp"]["events"] > 1


def test_rewind_point_is_a_sharded_buffer(results):
    r0, _ = result(results, "pruning_lamp")
    assert {"net.0.weight_rewind", "net.3.weight_rewind"} <= set(r0["fsdp2"]["buffers"])
    assert "net.0.weight_rewind" not in r0["ddp"]["buffers"]


def test_export_under_fsdp2(results):
    r0, _ = result(results, "pruning_global")
    assert r0["fsdp2"]["export"] == r0["ddp"]["export"]
    assert not any(k.endswith("_mask") for k in r0["fsdp2"]["exported"])


def test_nm_pattern_fsdp2_equals_ddp(results):
    r0, r1 = result(results, "pruning_nm")
    _same_run(r0, masks=("net.0.weight_mask",))
    _reset_slots(r0, r1)
    groups = r0["fsdp2"]["model"]["net.0.weight_mask"].reshape(15, 2, 4)
    assert (groups.sum(-1) == 2).all()


def test_make_permanent_fsdp2_equals_ddp(results):
    r0, _ = result(results, "pruning_permanent")
    ddp, fsdp = r0["ddp"]["model"], r0["fsdp2"]["model"]
    assert ddp.keys() == fsdp.keys() and not any(k.endswith(("_mask", "_rewind")) for k in fsdp)
    for key, x in ddp.items():
        torch.testing.assert_close(fsdp[key], x, rtol=1e-5, atol=1e-6, msg=key)
    assert (fsdp["net.0.weight"] == 0).float().mean() > 0.3


@pytest.mark.parametrize("name", ["dst_set", "dst_rigl", "dst_srigl", "dst_granet"])
def test_dynamic_sparse_training_fsdp2_equals_ddp(results, name):
    r0, r1 = result(results, name)
    _same_run(r0)
    _reset_slots(r0, r1)
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert fsdp["updates"] == ddp["updates"] > 1 and fsdp["itop"] == ddp["itop"] > 0.25
    for n, alive in ddp["alive"].items():
        assert torch.equal(fsdp["alive"][n], alive)
    assert {"net.0.weight_ever", "net.3.weight_ever"} <= set(fsdp["buffers"])


@pytest.mark.parametrize("name", ["resume_pruning_lamp", "resume_rigl"])
def test_crash_resume_through_dcp_is_bit_exact(results, name):
    r0, r1 = result(results, name)
    for key, x in r0["ref"].items():
        assert x.dtype == r0["resumed"][key].dtype and torch.equal(x, r0["resumed"][key]), f"{key} differs"
    buffers = ("_mask", "_rewind") if name == "resume_pruning_lamp" else ("_mask", "_ever")
    assert f"state_dict.net.0.weight{buffers[1]}" in r0["dcp_keys"]
    for suffix in buffers:  # saved sharded by DCP, not in the callback state rank 0 writes
        assert {f"state_dict.net.0.weight{suffix}", f"state_dict.net.3.weight{suffix}"} <= set(r0["dcp_keys"])
    state, ref = r0["state"], r0["ref_state"]
    assert not state.get("initial") and not state.get("ever")  # per-weight state is not in callback state
    assert _flat(ref).keys() == _flat(state).keys()
    for key, x in _flat(ref).items():
        y = _flat(state)[key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    assert r1["state"].keys() == state.keys()


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_sr_ste_fsdp2_equals_ddp_and_resumes_bit_exact(results):
    r0, _ = result(results, "pruning_srste")
    _same_run(r0, masks=("net.0.weight_mask",))
    assert "net.0.weight_latent" in r0["fsdp2"]["buffers"] and "net.0.weight_latent" not in r0["ddp"]["buffers"]
    groups = r0["fsdp2"]["model"]["net.0.weight_mask"].reshape(15, 2, 4)
    assert (groups.sum(-1) == 2).all()
    r0, r1 = result(results, "resume_srste")
    for key, x in r0["ref"].items():
        assert torch.equal(x, r0["resumed"][key]), f"{key} differs"
    assert {"state_dict.net.0.weight_latent", "state_dict.net.0.weight_mask"} <= set(r0["dcp_keys"])
    assert r0["state"]["sr_ste_started"] is True and r0["state"]["sr_ste_latent"] == {}
    assert r1["state"]["sr_ste_started"] is True


def test_no_gather_or_host_sync_between_events(results):
    r0, r1 = result(results, "no_gather_between_events")
    for r in (r0, r1):
        assert r["events"] > 1 and r["updates"] > 1
        assert r["hooks"] > 2 * r["steps"], "the per-step hooks ran"
        assert r["calls"] == {}, f"collectives or host syncs in the per-step path: {r['calls']}"
        assert r["at_events"].get("all_reduce", 0) > 0 and r["at_events"].get("tolist", 0) > 0, "the patch counts"


def test_bound_to_meta_weights_starts_from_the_materialised_ones(results):
    r0, r1 = result(results, "meta_init")
    for name in ("pruning", "dst"):
        model = r0[name]["model"]
        assert all(torch.isfinite(v.float()).all() for v in model.values()), name
        masks = {k: v for k, v in model.items() if k.endswith("_mask")}
        if name == "pruning":  # LAMP: global and exact
            assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * sum(m.numel() for m in masks.values()))
        else:  # ERK densities per layer, as drawn at the start
            densities = erk_densities({k: m.shape for k, m in masks.items()}, 0.25)
            assert all(int(m.sum()) == round(densities[k] * m.numel()) for k, m in masks.items())
        for key, mask in masks.items():
            assert (model[key[: -len("_mask")]][~mask] == 0).all(), key
        assert r0[name]["kept"] == r1[name]["kept"]
    assert r0["pruning"]["events"] > 1 and r0["dst"]["updates"] > 1
    rewind = r0["pruning"]["model"]["net.0.weight_rewind"]
    assert rewind.abs().sum() > 0 and torch.isfinite(rewind).all()
