"""Scenarios for the weight-agnostic callbacks (SampleReweighting, DataPruning) under FSDP2."""

from __future__ import annotations

from tests.cases import CASES
from tests.sharded.common import crash_resume, fit, save, snapshot

CASE = {c.name: c for c in CASES}


def _equivalence(name, out):
    result = {}
    for kind in ("ddp", "fsdp2"):
        cb = CASE[name].make()
        trainer, model = fit(kind, [cb])
        result[kind] = {"model": snapshot(model), "state": cb.state_dict(), "step": trainer.global_step}
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", lambda: [CASE[name].make()], out)
    result["ref"], result["resumed"] = snapshot(ref), snapshot(resumed)
    result["ref_state"], result["resumed_state"] = ref_cbs[0].state_dict(), cbs[0].state_dict()
    save(out, result)


def reweighting(out):
    _equivalence("SampleReweighting", out)


def data_pruning(out):
    _equivalence("DataPruning", out)


def plain(out):
    result = {}
    for kind in ("ddp", "fsdp2"):
        ref, _, resumed, _ = crash_resume(kind, lambda: [], out / kind)
        result[kind] = (snapshot(ref), snapshot(resumed))
    save(out, result)
