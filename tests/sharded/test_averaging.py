"""EMA and SWA under FSDP2 (ModelParallelStrategy, 2 processes, gloo), beyond the generic
sharded contract: averages are shard-local (memory per rank measured), equal DDP's (uneven
shards; bf16 parameters get float32 averages), evaluation swaps copy shard to shard, SWA's
BatchNorm pass runs through FSDP2's all-gather, the gathered export equals DDP's averages,
and a crash-resume through torch.distributed.checkpoint restores the averages (model
buffers) and the update count. One launch runs every scenario."""

from __future__ import annotations

import pytest
import torch

from tests.sharded.launch import result

pytestmark = pytest.mark.slow

SCENARIOS = ["equivalence", "memory", "bf16", "resume"]
NAMES = ["EMA", "SWA"]
PARAMS = ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]


def scenarios(items):
    return "averaging_scenarios", SCENARIOS



def close(a: dict, b: dict, what: str, **tol) -> None:
    assert a.keys() == b.keys(), f"{what}: keys {sorted(set(a) ^ set(b))}"
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], msg=f"{what}: {key}", **tol)
        else:
            assert torch.equal(a[key], b[key]), f"{what}: {key}"


@pytest.mark.parametrize("name", NAMES)
def test_averages_per_rank_are_shards_of_the_parameters(results, name):
    ranks = result(results, "memory")
    for rank, r in enumerate(ranks):
        fsdp, ddp = r[f"{name}-fsdp2"], r[f"{name}-ddp"]
        # Measured: bytes of every average this rank holds, local shards summed (uneven 8 + 7 rows).
        assert fsdp["held_bytes"]["all"] <= 0.55 * fsdp["param_bytes"], (rank, fsdp["held_bytes"], fsdp["param_bytes"])
        assert ddp["held_bytes"]["all"] == ddp["param_bytes"]  # DDP: a whole copy on every rank
        assert all(fsdp["sharded"].values()) and not any(ddp["sharded"].values())
    # Together the ranks hold one copy, no more.
    assert sum(r[f"{name}-fsdp2"]["held_bytes"]["all"] for r in ranks) == ranks[0][f"{name}-ddp"]["param_bytes"]
    # With BatchNorm, its (unsharded) statistics are averaged whole, beside the parameter shards.
    bn = result(results, "equivalence")[0][f"{name}-fsdp2"]
    assert bn["held_bytes"]["params"] <= 0.55 * bn["param_bytes"]


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_averages_and_export_equal_ddp(results, name):
    r0, r1 = result(results, "equivalence")
    ddp, fsdp = r0[f"{name}-ddp"], r0[f"{name}-fsdp2"]
    assert fsdp["step"] == ddp["step"] > 0 and fsdp["num_updates"] == ddp["num_updates"] > 0
    # The gathered export (averaged_state_dict) equals DDP's, with uneven shards (hidden width 15).
    close(ddp["export"], fsdp["export"], f"{name} export, fsdp2 vs ddp", rtol=1e-5, atol=1e-6)
    close(fsdp["export"], r1[f"{name}-fsdp2"]["export"], f"{name} export across ranks", rtol=0, atol=0)
    # Training was not perturbed: the raw weights and the averaged model equal DDP's.
    close(ddp["raw"], fsdp["raw"], f"{name} raw weights", rtol=1e-5, atol=1e-6)
    close(ddp["model"], fsdp["model"], f"{name} final model", rtol=1e-5, atol=1e-6)
    # Sharded averages are saved with the model (buffers), not in the callback state (rank 0's only).
    assert fsdp["state_tensors"] == ["net.1.num_batches_tracked", "net.1.running_mean", "net.1.running_var"]


def test_bf16_parameters_get_float32_averages(results):
    r0 = result(results, "bf16")[0]
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    for name, (avg_dtype, param_dtype) in fsdp["dtypes"].items():
        assert (avg_dtype, param_dtype) == (torch.float32, torch.bfloat16), name
    assert all(fsdp["sharded"][n] for n in fsdp["dtypes"])
    # bf16 training itself differs in rounding between the strategies' gradient reductions.
    close(ddp["export"], fsdp["export"], "bf16 export, fsdp2 vs ddp", rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_and_end_of_fit_swap_shard_locally(results, name):
    for rank, r in enumerate(result(results, "equivalence")):
        fsdp, ddp = r[f"{name}-fsdp2"], r[f"{name}-ddp"]
        probe = fsdp["probe"]
        # Each rank's shards held the averages during validation, the raw weights again afterwards.
        assert probe["val_is_average"] and all(probe["val_is_average"]), rank
        assert probe["train_is_raw"] and all(probe["train_is_raw"]), rank
        # Validation really ran on the averages (FSDP2 gathered the swapped-in shards): DDP's losses.
        assert probe["val_loss"] == pytest.approx(ddp["probe"]["val_loss"], rel=1e-5)
        # The averages were model buffers during fit; the shipped model has its own keys only.
        suffix = f"_{name.lower()}"
        assert probe["buffers_during_fit"] == sorted(f"{n}{suffix}" for n in fsdp["dtypes"])
        assert fsdp["model"].keys() == ddp["model"].keys()
        # After fit the module holds the averaged weights (the raw ones kept apart; net.0.bias, ahead
        # of BatchNorm, gets no gradient and never moves).
        for key in fsdp["dtypes"]:
            assert torch.equal(fsdp["model"][key], fsdp["export"][key].to(fsdp["model"][key].dtype)), key
        assert any(not torch.equal(fsdp["model"][k], fsdp["raw"][k]) for k in fsdp["dtypes"])


def test_swa_batchnorm_pass_under_fsdp2(results):
    r0 = result(results, "equivalence")[0]
    ddp, fsdp = r0["SWA-ddp"], r0["SWA-fsdp2"]
    assert fsdp["bn_seen"] == ddp["bn_seen"] == 6  # one epoch: 96 samples / batch 8 / 2 ranks
    stats = ["net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"]
    close({k: ddp["model"][k] for k in stats}, {k: fsdp["model"][k] for k in stats}, "BatchNorm pass", rtol=1e-5, atol=1e-6)
    # The pass replaced the last training statistics, and the averages hold its result.
    assert not torch.equal(fsdp["model"]["net.1.running_mean"], fsdp["raw"]["net.1.running_mean"])
    for key in stats:
        assert torch.equal(fsdp["model"][key], fsdp["export"][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_crash_resume_through_dcp_restores_averages_and_counts(results, name):
    for rank, r in enumerate(result(results, "resume")):
        res = r[name]
        suffix = f"_{name.lower()}"
        # The distributed checkpoint holds the sharded averages as model buffers.
        assert [k for k in res["ckpt_keys"] if k.endswith(suffix)] == sorted(f"state_dict.{n}{suffix}" for n in PARAMS)
        # Right after the restore the resumed run holds what the crashed run saved, bit for bit.
        assert res["restored"]["num_updates"] == res["saved"]["num_updates"] > 0, rank
        close(res["saved"]["averages"], res["restored"]["averages"], f"{name} restored averages", rtol=0, atol=0)
        # Then it counts on as the uninterrupted run did, and ends bit-identical.
        for epoch, state in res["resumed_end"].items():
            assert state["num_updates"] == res["ref_end"][epoch]["num_updates"], (rank, epoch)
            close(res["ref_end"][epoch]["averages"], state["averages"], f"{name} epoch {epoch}", rtol=0, atol=0)
        close(res["ref_export"], res["resumed_export"], f"{name} export after resume", rtol=0, atol=0)
        close(res["ref_model"], res["resumed_model"], f"{name} model after resume", rtol=0, atol=0)
