"""QAT after EMA, SWA and Soup in ``callbacks`` under FSDP2 (scenario in averaging_qat_scenarios.py):
the averages of the replicated scales exist, restart at QAT's start step alike on every rank and
as under DDP, and survive a crash-resume through torch.distributed.checkpoint bit-exactly."""

from __future__ import annotations

import pytest
import torch

from tests.sharded.averaging_qat_scenarios import START
from tests.sharded.launch import result

pytestmark = pytest.mark.slow

SCALES = ["net.0.weight_quantizer.scale", "net.0.input_quantizer.scale",
          "net.3.weight_quantizer.scale", "net.3.input_quantizer.scale"]


def scenarios(items):
    return "averaging_qat_scenarios", ["averagers_before_qat"]


def _same(a: dict, b: dict, what: str, exact: bool) -> None:
    assert a.keys() == b.keys(), f"{what}: keys {sorted(set(a) ^ set(b))}"
    for key, x in a.items():
        if exact or not x.is_floating_point():
            assert x.dtype == b[key].dtype and torch.equal(x, b[key]), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(b[key], x, rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


@pytest.mark.parametrize("name", ["EMA", "SWA", "Soup"])
def test_ema_swa_soup_before_qat_restart_scale_averages_under_fsdp2_as_under_ddp(results, name):
    r0, r1 = result(results, "averagers_before_qat")
    ddp, fsdp = r0["ddp"]["averaging"][name], r0["fsdp2"]["averaging"][name]
    assert r0["fsdp2"]["step"] == r0["ddp"]["step"] > START
    assert set(SCALES) <= set(fsdp["averages"]), f"{name} does not average the scales QAT added after it bound"
    # Restarted at the start step (EMA and SWA: after 8 and 2 updates; Soup: after its first snapshot).
    assert fsdp["restarted"] == ddp["restarted"] == dict.fromkeys(SCALES, {"EMA": 8, "SWA": 2, "Soup": 1}[name])
    _same(ddp["averages"], fsdp["averages"], f"{name} averages, fsdp2 vs ddp", exact=False)
    _same(fsdp["averages"], r1["fsdp2"]["averaging"][name]["averages"], f"{name} averages across ranks", exact=True)
    _same(r0["ref_averaging"][name]["averages"], r0["resumed_averaging"][name]["averages"],
          f"{name} averages after a DCP crash-resume", exact=True)
    assert r0["ref_averaging"][name]["restarted"] == r0["resumed_averaging"][name]["restarted"]


def test_ema_swa_soup_before_qat_final_model_fsdp2_vs_ddp_and_resume(results):
    r0, _ = result(results, "averagers_before_qat")
    ddp, fsdp = r0["ddp"]["model"], r0["fsdp2"]["model"]
    assert ddp.keys() <= fsdp.keys()
    _same(ddp, {k: fsdp[k] for k in ddp}, "final model, fsdp2 vs ddp", exact=False)
    _same(r0["ref"], r0["resumed"], "final model after a DCP crash-resume", exact=True)
