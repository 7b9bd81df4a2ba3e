"""QuantizationAwareTraining under FSDP2 (ModelParallelStrategy, 2 processes, gloo; scenarios in
qat_scenarios.py, one launch): the run ends where the same run under DDP ends (weights and every
quantizer scale), replicated scales agree across ranks, the weight quantizers saw whole weights,
the swap keeps FSDP2's class, a DCP crash-resume is bit-exact, and the export equals DDP's."""

from __future__ import annotations

import pytest
import torch

from tests.sharded.launch import result
from tests.sharded.qat_scenarios import CONFIGS

pytestmark = pytest.mark.slow

SCENARIOS = [*CONFIGS, "resume", "mixed_precision"]


def scenarios(items):
    return "qat_scenarios", SCENARIOS



def close(a: dict, b: dict, what: str, exact: bool = False) -> None:
    assert a.keys() == b.keys(), f"{what}: keys {sorted(set(a) ^ set(b))}"
    for key in a:
        x, y = a[key], b[key]
        if exact or not x.is_floating_point():
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_run_equals_ddp_run_weights_and_every_quantizer_tensor(results, config):
    r0 = result(results, config)[0]
    ddp, fsdp = r0["ddp"], r0["fsdp2"]
    assert fsdp["step"] == ddp["step"] > 0 and fsdp["enabled"] and ddp["enabled"]
    assert any("quantizer.scale" in k for k in ddp["model"]) or config == "stat_freeze"
    close(ddp["model"], fsdp["model"], f"{config}: fsdp2 vs ddp")
    assert fsdp["frozen"] == pytest.approx(ddp["frozen"])
    if config == "stat_freeze":
        assert ddp["frozen"]["frozen"] > 0, "nothing froze: the tracking buffers were not exercised"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_replicated_scales_are_identical_on_every_rank(results, config):
    r0, r1 = result(results, config)
    assert r0["fsdp2"]["locals"], "no quantizer state"
    close(r0["fsdp2"]["locals"], r1["fsdp2"]["locals"], f"{config}: rank 0 vs rank 1", exact=True)
    learned = {n: p for n, p in r0["fsdp2"]["replicated"].items()}
    assert all(p == ("DTensor", "(Replicate(),)") for p in learned.values()), learned


@pytest.mark.parametrize("config", list(CONFIGS))
def test_weight_quantizers_fake_quantize_the_whole_unsharded_weight(results, config):
    r0 = result(results, config)[0]
    # FSDP2 holds rows 8 + 7 of the 15-row weight per rank; its forward sees all of them, as DDP.
    assert r0["fsdp2"]["seen"] == r0["ddp"]["seen"] == {"net.0": {("Parameter", (15, 8))},
                                                         "net.3": {("Parameter", (4, 15))}}


def test_the_swap_subclasses_fsdp2s_class_and_unprepare_restores_it(results):
    r0 = result(results, "lsq")[0]
    assert r0["fsdp2"]["classes"] == {"net.0": "QuantFSDPLinear", "net.3": "QuantFSDPLinear"}
    assert r0["fsdp2"]["unprepared"] == {"net.0": "FSDPLinear", "net.3": "FSDPLinear"}
    assert r0["ddp"]["unprepared"] == {"net.0": "Linear", "net.3": "Linear"}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_export_and_fold_from_the_sharded_run_equal_ddps(results, config):
    r0, r1 = result(results, config)
    ddp, fsdp = r0["ddp"]["ints"], r0["fsdp2"]["ints"]
    assert ddp.keys() == fsdp.keys() == {"net.0", "net.3"}
    for name in ddp:
        assert fsdp[name]["weight"].shape == ddp[name]["weight"].shape
        assert torch.equal(fsdp[name]["weight"], ddp[name]["weight"]), f"{config}: {name} integers differ"
        torch.testing.assert_close(fsdp[name]["scale"], ddp[name]["scale"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fsdp[name]["bias"], ddp[name]["bias"], rtol=1e-5, atol=1e-6)
        assert torch.equal(r1["fsdp2"]["ints"][name]["weight"], fsdp[name]["weight"]), "ranks export differently"
    close(r0["ddp"]["folded"], r0["fsdp2"]["folded"], f"{config}: folded weights")
    assert "export_int" in r0["fsdp2"]["int8_refused"], "to_int8_cpu_ must refuse shards, naming the way out"


def test_crash_resume_through_dcp_is_bit_exact_including_quantizer_state(results):
    r0, r1 = result(results, "resume")
    for r in (r0, r1):
        close(r["ref"], r["resumed"], "crash-resume: model", exact=True)
        close(r["ref_locals"], r["resumed_locals"], "crash-resume: this rank's quantizer tensors", exact=True)
    assert r0["ref_state"] == r0["resumed_state"]
    close(r0["resumed_locals"], r1["resumed_locals"], "resumed: rank 0 vs rank 1", exact=True)


def test_bf16_mixed_precision_policy_trains_with_float32_scales_identical_on_every_rank(results):
    r0, r1 = result(results, "mixed_precision")
    assert r0["step"] > 0 and r0["seen"]["net.0"] == {("Parameter", (15, 8))}  # FSDP2's bf16 copy, whole
    assert r0["dtypes"] == {"torch.bfloat16"}
    scales = {k: v for k, v in r0["locals"].items() if k.endswith("scale")}
    assert scales and all(v.dtype == torch.float32 and v.isfinite().all() for v in scales.values())
    close(r0["locals"], r1["locals"], "bf16: rank 0 vs rank 1", exact=True)
    assert all(v.isfinite().all() for v in r0["model"].values() if v.is_floating_point())
