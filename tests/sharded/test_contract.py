"""The contract's sharded column (2 processes, gloo, ModelParallelStrategy): every registered
callback fits a model that shards itself in ``configure_model`` (uneven shards: hidden width
15), ends where the same run under DDP ends (weights, masks, averages, scales to float
tolerance; bool and integer state exactly), and a crash-resume through a distributed
checkpoint is bit-identical to the uninterrupted run. One launch runs every selected case."""

from __future__ import annotations

import pytest
import torch

from tests.cases import CASES, flat_state
from tests.sharded.launch import result

pytestmark = pytest.mark.slow

NAMES = [c.name for c in CASES]


def scenarios(items):
    """The selected cases only (``-k EMA`` runs the baseline and EMA's scenario)."""
    wanted = {item.callspec.params["name"] for item in items if hasattr(item, "callspec") and "name" in item.callspec.params}
    names = ["plain"] + [f"case_{n}" for n in NAMES if n in wanted]
    names += [s for s in ("composition", "data_parallel_mesh", "averaging_per_step")
              if any(i.name.startswith(f"test_{s}") for i in items)]
    return "contract_scenarios", names



def same(a: dict, b: dict, what: str, exact: bool = True, keys=None) -> None:
    keys = a.keys() if keys is None else keys
    if keys is a.keys():
        assert a.keys() == b.keys(), f"{what}: keys {sorted(set(a) ^ set(b))}"
    for key in keys:
        x, y = a[key], b[key]
        if not isinstance(x, torch.Tensor):
            assert x == y, f"{what}: {key}: {x} != {y}"
        elif exact or not x.is_floating_point():
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


def test_plain_trainer_fsdp2_equals_ddp_and_resumes_bit_exact(results):
    rank0 = result(results, "plain")[0]
    for kind in ("ddp", "fsdp2"):
        ref, resumed = rank0[kind]
        same(resumed, ref, f"{kind} resume")
    same(rank0["fsdp2"][0], rank0["ddp"][0], "fsdp2 vs ddp", exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_callback_under_fsdp2_equals_ddp_and_resumes_bit_exact(results, name):
    r0, r1 = result(results, f"case_{name}")
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert fsdp["step"] == ddp["step"] > 0
    # The model keeps its own keys; sharded runs may hold more (state kept where DCP shards it).
    assert ddp["model"].keys() <= fsdp["model"].keys()
    same(ddp["model"], fsdp["model"], "final model, fsdp2 vs ddp", exact=False, keys=ddp["model"].keys())
    common = ddp["state"].keys() & fsdp["state"].keys()
    same(ddp["state"], fsdp["state"], "callback state, fsdp2 vs ddp", exact=False, keys=common)
    same(fsdp["state"], r1["fsdp2"]["state"], "callback state across ranks")
    same(r0["ref"], r0["resumed"], "crash-resume through DCP: model")
    same(r0["ref_state"], r0["resumed_state"], "crash-resume through DCP: callback state")


@pytest.mark.parametrize("name", ["SampleReweighting", "DataPruning"])
def test_data_parallel_mesh_per_sample_callbacks_treat_tensor_parallel_ranks_as_one_replica(results, name):
    r0, r1 = result(results, "data_parallel_mesh")
    mesh, single = r0[f"{name}/mesh"], r0[f"{name}/single"]
    assert mesh["step"] == single["step"] > 0
    same(single["model"], mesh["model"], "1 x 2 mesh vs one device: weights", exact=False)
    same(single["state"], mesh["state"], "1 x 2 mesh vs one device: callback state", exact=False)
    same(mesh["state"], r1[f"{name}/mesh"]["state"], "callback state across tensor-parallel ranks")


def test_composition_pruning_qat_ema_under_fsdp2(results):
    r0, r1 = result(results, "composition")
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert ddp["model"].keys() <= fsdp["model"].keys()
    same(ddp["model"], fsdp["model"], "final model, fsdp2 vs ddp", exact=False, keys=ddp["model"].keys())
    for name, state in ddp["state"].items():
        common = state.keys() & fsdp["state"][name].keys()
        same(state, fsdp["state"][name], f"{name} state, fsdp2 vs ddp", exact=False, keys=common)
    # The shippable model: one call on the sharded checkpoint directory gives DDP's plain EMA weights.
    same(ddp["export"], fsdp["export"], "plain averaged export, DCP directory vs DDP file", exact=False)
    same(r0["ref"], r0["resumed"], "crash-resume through DCP: model")
    same(flat_state(r0["ref_state"]), flat_state(r0["resumed_state"]), "crash-resume through DCP: callback states")


def test_averaging_per_step_is_shard_local_no_collective_no_host_sync(results):
    r0, _ = result(results, "averaging_per_step")
    assert r0["hooks"] >= r0["steps"] > 0 and min(r0["updates"]) > 0, r0
    assert r0["calls"] == {}, f"collectives or host syncs in EMA/SWA's per-step hook: {r0['calls']}"
