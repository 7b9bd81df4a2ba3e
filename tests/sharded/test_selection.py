"""Mask selection on FSDP2 shards equals the whole-tensor rule exactly (2 processes, gloo): top-k,
every allocation, pruning schedules (monotone), N:M incl. Hugging Face Conv1D's split inputs,
SET/RigL/SRigL updates, random and fan-in masks, Wanda scores; on tie-free, tied and NaN inputs.
One launch runs every scenario."""

from __future__ import annotations

import pytest
import torch

from tests.sharded.launch import result

pytestmark = pytest.mark.slow

SCENARIOS = ["topk", "allocation", "pruning", "nm", "dst", "wanda"]


def scenarios(items):
    return "selection_scenarios", SCENARIOS



def equal(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS])
def test_sharded_selection_equals_whole_tensor_selection(results, scenario):
    r0, r1 = result(results, scenario)
    cases = {k: v for k, v in r0.items() if isinstance(v, tuple)}
    assert cases
    wrong = [k for k, (sharded, whole) in cases.items() if not equal(sharded, whole)]
    assert not wrong, f"sharded != whole: {wrong}"
    # both ranks hold the same (gathered) masks and counts
    assert all(equal(r0[k][0], r1[k][0]) for k in cases)


def test_conv1d_nm_with_misaligned_shards_raises_naming_the_layer_and_fix(results):
    message = result(results, "nm")[0]["conv1d_error"]
    assert "h.0.mlp.c_fc.weight" in message and "blocks of 6" in message and "M=4" in message
    assert "exclude it from the targets" in message
