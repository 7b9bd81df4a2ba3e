"""SparseDDPStrategy (2 processes, gloo): every run bit-identical to the same run under
strategy="ddp" (weights, masks, optimizer and callback state), packed steps send the kept
entries only and leave exact zeros in pruned slots, update steps go dense, crash-resume is
exact, masks that differ between ranks stop the run, and the bytes are logged. One launch
runs every scenario (tests/sharded/conftest.py); the ddp_spawn launcher is tested here too."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.plugins import SparseDDPStrategy
from tests.sharded.launch import result
from tests.sharded.sparse_ddp_scenarios import DST, SCENARIOS, fit

pytestmark = pytest.mark.slow

SAME_AS_DDP = ["pruning", "pruning_by_gradient", "rigl", "set_growth", "accumulation", "bf16_mixed", "bf16_true",
               "compose", "unused", "compiled", "static_graph", "tied", "manual", "gpt2", "conv", "clipped",
               "module_asks", "sr_ste"]
# 8->32->32->4 MLP: its weights, and what is never masked (biases and the LayerNorm)
WEIGHTS, UNMASKED = 8 * 32 + 32 * 32 + 32 * 4, 32 + 32 + 32 + 32 + 4


def scenarios(items):
    return "sparse_ddp_scenarios", SCENARIOS


def _equal(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            _equal(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y)):
            _equal(a, b, f"{where}[{i}]")
    elif torch.is_tensor(x):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{where} differs"
    else:
        assert x == y, where


@pytest.mark.parametrize("name", SAME_AS_DDP)
def test_bit_identical_to_ddp(results, name):
    for rank in result(results, name):
        ddp, sparse = rank["ddp"], rank["sparse"]
        assert sparse["global_step"] == ddp["global_step"] == 24
        _equal(ddp["model"], sparse["model"], "model")
        _equal(ddp["optimizer"], sparse["optimizer"], "optimizer")
        _equal(ddp["callbacks"], sparse["callbacks"], "callbacks")
        masks = [v for k, v in sparse["model"].items() if k.endswith("_mask")]
        assert masks and not all(bool(m.all()) for m in masks), "the run ended sparse"


@pytest.mark.parametrize("name", ["pruning", "rigl", "accumulation", "compose", "unused", "bf16_true", "static_graph",
                                  "tied", "manual", "gpt2", "conv"])
def test_packed_steps_send_kept_entries_only_and_leave_exact_zeros(results, name):
    r0, _ = result(results, name)
    sparse, ddp = r0["sparse"], r0["ddp"]
    size = 2 if name == "bf16_true" else 4
    last = sparse["steps"][-1]  # after the last mask change: the kept entries and every unmasked parameter
    assert not last["dense"] and last["dense_bytes"] == size * sparse["trainable"]
    assert last["sent"] == size * (sparse["trainable"] - sum(n for n, _ in sparse["masks"]) +
                                   sum(k for _, k in sparse["masks"]))
    assert last["sent"] < 0.5 * last["dense_bytes"]
    packed = [s for s in sparse["steps"] if not s["dense"] and s["pruned_grad"] is not None]
    assert len(packed) > 5
    assert all(s["pruned_grad"] == 0.0 for s in packed), "a pruned slot held a gradient after the packed all-reduce"
    by_step = {s["step"]: s for s in ddp["steps"]}
    if name != "compose":  # QAT's fake-quantized weight is weight * mask: pruned gradients are zero under DDP too
        assert all(by_step[s["step"]]["pruned_grad"] > 0 for s in packed), "DDP averages pruned slots: it differs here"
    assert sparse["totals"]["bytes"] < sparse["totals"]["dense_bytes"] == 24 * last["dense_bytes"]


def test_packed_bytes_count_kept_weights_and_unmasked_parameters_exactly(results):
    r0, _ = result(results, "rigl")
    masks = [v for k, v in r0["sparse"]["model"].items() if k.endswith("_mask")]
    kept = sum(int(m.sum()) for m in masks)
    last = r0["sparse"]["steps"][-1]
    assert last["dense_bytes"] == 4 * (WEIGHTS + UNMASKED)
    assert last["sent"] == 4 * (kept + UNMASKED)


@pytest.mark.parametrize("name", ["rigl", "set_growth", "accumulation", "compiled"])
def test_update_steps_go_dense_and_carry_pruned_gradients(results, name):
    r0, _ = result(results, name)
    steps = r0["sparse"]["steps"]
    dense = [s["step"] for s in steps if s["dense"]]
    assert dense == [4, 8, 12, 16]  # DST: every 4 steps in (0, 0.75 * 24)
    for s in steps:
        if s["dense"]:
            assert s["sent"] == s["dense_bytes"] and s["pruned_grad"] > 0


def test_pruning_is_dense_before_masking_starts_and_at_each_event(results):
    r0, _ = result(results, "pruning")
    steps = r0["sparse"]["steps"]
    events = r0["sparse"]["callbacks"]["GradualPruning"]["events"]
    dense = [s["step"] for s in steps if s["dense"]]
    assert dense == r0["sparse"]["due"] and len(dense) > events > 1  # before the schedule's start, then each event


def test_the_lightning_module_can_ask_for_dense_steps_too(results):
    r0, _ = result(results, "module_asks")
    steps = r0["sparse"]["steps"]
    assert [s["step"] for s in steps if s["dense"]] == list(range(0, 24, 3))
    assert all(s["sent"] < s["dense_bytes"] for s in steps if not s["dense"])


def test_sr_ste_reads_dense_gradients_every_step(results):
    r0, _ = result(results, "sr_ste")
    assert all(s["dense"] and s["sent"] == s["dense_bytes"] for s in r0["sparse"]["steps"])


def test_crash_resume_is_bit_exact(results):
    for rank in result(results, "crash_resume"):
        _equal(rank["ref"], rank["resumed"], "model")
        packed = [s for s in rank["steps"] if not s["dense"]]
        assert packed and all(s["sent"] < s["dense_bytes"] for s in packed), "the resumed run packs again"


def test_masks_that_differ_between_ranks_stop_the_run(results):
    for rank in result(results, "mismatch"):
        message = rank["message"]
        assert message is not None, "the run went on with masks that differ between ranks"
        assert "'net.3.weight' differs between ranks" in message and "seeded alike on every rank" in message


def test_without_masks_it_warns_and_is_plain_ddp(results):
    r0, r1 = result(results, "no_masks")
    assert any("no `<param>_mask` buffers" in w and "as with strategy='ddp'" in w for w in r0["warnings"])
    for rank in (r0, r1):
        _equal(rank["plain"], rank["model"], "model")
        assert rank["totals"]["bytes"] == rank["totals"]["dense_bytes"] > 0


def test_masks_that_no_callback_enforces_are_a_warning(results):
    r0, _ = result(results, "unowned")
    assert any("1 weights carry masks but no callback masks their gradients" in w for w in r0["warnings"])
    assert r0["totals"]["bytes"] < r0["totals"]["dense_bytes"]  # still packed: pruned entries get zero gradients


def test_bytes_are_logged_every_step_and_summarised_at_the_end(results):
    r0, r1 = result(results, "logged")
    rows = [line.split(",") for line in r0["csv"].strip().splitlines()]
    header = rows[0]
    logged = [dict(zip(header, r)) for r in rows[1:] if r[header.index("sparse_ddp/bytes")]]
    assert len(logged) == r0["totals"]["steps"] == 24
    ratios = [float(r["sparse_ddp/ratio"]) for r in logged]
    assert min(ratios) < 0.2 and max(ratios) == 1.0  # packed steps, and RigL's dense updates
    total = sum(float(r["sparse_ddp/bytes"]) for r in logged)
    assert total == r0["totals"]["bytes"]
    (line,) = [x for x in r0["lines"] if x.startswith("SparseDDPStrategy:")]
    assert "24 steps (4 dense)" in line and f"({r0['totals']['bytes'] / r0['totals']['dense_bytes']:.3f}x)" in line
    assert not [x for x in r1["lines"] if x.startswith("SparseDDPStrategy:")], "the summary is rank zero's"


def test_ddp_spawn_launcher_gives_the_same_run(results):
    """``start_method="spawn"`` (strategy "ddp_spawn"): the same weights and masks as the
    externally launched DDP run of the same scenario."""
    (expected, _) = result(results, "rigl")
    cb = DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))
    trainer, model = fit(SparseDDPStrategy(start_method="spawn", bucket_cap_mb=0.002), [cb], {"optimizer": "adam"})
    got = model.state_dict()  # the weights come back from rank 0 (the masks lived in the ranks)
    assert got.keys() == {k for k in expected["ddp"]["model"] if not k.endswith("_mask")}
    _equal({k: expected["ddp"]["model"][k] for k in got}, got, "model")


def test_the_command_line_knows_the_strategy_names():
    from lichtenberg.cli.main import build

    trainer = build(["default"], ["--trainer.strategy", "sparse_ddp", "--trainer.devices", "2"]).trainer
    assert type(trainer.strategy) is SparseDDPStrategy and trainer.strategy._start_method == "popen"


def test_strategy_names_and_own_hook():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="sparse_ddp_spawn", logger=False)
    assert isinstance(trainer.strategy, SparseDDPStrategy) and trainer.strategy._start_method == "spawn"
    with pytest.raises(ValueError, match="registers its own communication hook; remove ddp_comm_hook"):
        SparseDDPStrategy(ddp_comm_hook=lambda state, bucket: None)
