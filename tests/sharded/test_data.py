"""The sharded contract column for the weight-agnostic callbacks (and the plain Trainer as a
baseline): under FSDP2 each equals its DDP run, and a crash-resume through a distributed
checkpoint is bit-identical to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from tests.cases import flat_state
from tests.sharded.launch import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("data_scenarios", ["plain", "reweighting", "data_pruning"], tmp_path_factory.mktemp("data"))


def _same(a, b, what):
    a, b = flat_state(a), flat_state(b)
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            assert a[key] == b[key], f"{what}: {key}"


def test_plain_trainer_fsdp2_equals_ddp_and_resumes_bit_exact(results):
    rank0 = results["plain"][0]
    for kind in ("ddp", "fsdp2"):
        ref, resumed = rank0[kind]
        _same(resumed, ref, f"{kind} resume")
    _same(rank0["fsdp2"][0], rank0["ddp"][0], "fsdp2 vs ddp")


@pytest.mark.parametrize("name", ["reweighting", "data_pruning"])
def test_weight_agnostic_callbacks_under_fsdp2(results, name):
    r0, r1 = results[name]
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert fsdp["step"] == ddp["step"] > 0
    _same(fsdp["model"], ddp["model"], "final weights, fsdp2 vs ddp")
    _same(fsdp["state"], ddp["state"], "callback state, fsdp2 vs ddp")
    _same(r1["fsdp2"]["state"], fsdp["state"], "callback state across ranks")
    _same(r0["resumed"], r0["ref"], "crash-resume through DCP: weights")
    _same(r0["resumed_state"], r0["ref_state"], "crash-resume through DCP: callback state")
