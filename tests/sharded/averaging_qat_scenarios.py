"""EMA, SWA and Soup listed before QAT under FSDP2 (2 ranks, gloo): the averaging callbacks bind
before the swap, pick up the replicated scales QAT adds (DTensor buffers ``..._ema`` etc.), and
restart their averages when quantization starts at step 8; the same run under DDP, and a
crash-resume through a distributed checkpoint taken after the restart (step 12: 6 steps per
epoch and rank)."""

from __future__ import annotations

from lichtenberg.callbacks import EMA, SWA, QuantizationAwareTraining, Soup
from tests.sharded.common import crash_resume, fit, save, snapshot
from tests.sharded.contract_scenarios import _state

START = 8  # after Soup's first snapshot (step 6)


def _callbacks() -> list:
    return [EMA(decay=0.9), SWA(start=6, interval="step"), Soup(keep=3, start=0, offload_to_cpu=False),
            QuantizationAwareTraining(weight_bits=4, activation_bits=8, weight_method="lsq", activation_method="lsq",
                                      start_step=START)]


def _averaging(cbs: list) -> dict:
    """Per averaging callback: its whole averages (a gather: every rank calls it) and its restarts."""
    return {type(c).__name__: {"averages": c.averaged_state_dict(), "restarted": dict(getattr(c.averaged, "restarted", {}))}
            for c in cbs if not isinstance(c, QuantizationAwareTraining)}


def averagers_before_qat(out) -> None:
    result = {}
    for kind in ("ddp", "fsdp2"):
        cbs = _callbacks()
        trainer, model = fit(kind, cbs)
        result[kind] = {"model": snapshot(model), "step": trainer.global_step, "averaging": _averaging(cbs),
                        "state": {type(c).__name__: _state(c) for c in cbs}}
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", _callbacks, out)
    result["ref"], result["resumed"] = snapshot(ref), snapshot(resumed)
    result["ref_averaging"], result["resumed_averaging"] = _averaging(ref_cbs), _averaging(cbs)
    save(out, result)
