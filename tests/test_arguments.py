"""Every argument of every public callback is checked: a bad value is a ValueError, never another
exception and never silence.

The constructor fuzz is generated from ``inspect.signature`` of each registered callback in
``tests.cases.CASES`` (a new callback is covered automatically), and from the fields of the
dataclasses its arguments take (``schedule``, ``targets``). Each case starts from the case's
canonical config and replaces ONE argument (or one field of a dataclass argument) with a
fuzz value. It passes when

- construction (building the dataclass included) raises ``ValueError``; or
- the callback is built and a fit either raises ``ValueError`` before the first training
  batch (a setting checked against the run, e.g. one that would never act), or completes
  with finite weights and the callback active.

Error messages must name the argument and the bad value. Then come the contradictory
combinations (an argument with no effect given another's value), the settings that would never
act in a run (checked at fit start; SampleReweighting's warm-up and DataPruning's static
score_epochs are tested in tests/callbacks), and the upper bounds that keep a run finite.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lichtenberg.callbacks import (
    EMA,
    SWA,
    DataPruning,
    DynamicSparseTraining,
    GradualPruning,
    QuantizationAwareTraining,
)
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import CASES, EPOCHS, active, fit_tiny

FUZZ = [math.nan, math.inf, -math.inf, True, False, "abc", [1], {"a": 1}, -1, -0.5, 0, 0.0, 10**12, 2**64, 1e30, None]


def _dataclass_of(cls: type, arg: str) -> type | None:
    """The dataclass an init arg takes (``schedule: SparsitySchedule | None``), if any."""
    hint = typing.get_type_hints(cls.__init__).get(arg)
    options = typing.get_args(hint) or (hint,)
    return next((t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)), None)


def _generate() -> list[Any]:
    params = []
    for case in CASES:
        for arg in inspect.signature(case.cls.__init__).parameters:
            if arg == "self":
                continue
            fields = [None]
            dc = _dataclass_of(case.cls, arg)
            if dc is not None:
                fields += [f.name for f in dataclasses.fields(dc)]
            for field in fields:
                for value in FUZZ:
                    where = arg if field is None else f"{arg}.{field}"
                    params.append(pytest.param(case, arg, field, value, id=f"{case.name}-{where}={value!r}"))
    return params


CONSTRUCTOR_CASES = _generate()


class _Probe(Callback):
    """Counts the training batches that started (a ValueError after one is too late)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


_FITS: dict[tuple[str, str], tuple[str | None, str | None]] = {}  # one fit per distinct config


def _fit(cb: Callback) -> tuple[str | None, str | None]:
    """``(refusal, failure)``: the message of a ValueError raised before the first training batch,
    and what went wrong otherwise (None for a clean fit: finite weights, the callback active)."""
    key = (type(cb).__name__, repr(cb._config()))
    if key in _FITS:
        return _FITS[key]
    probe, refusal, failure = _Probe(), None, None
    try:
        _, model = fit_tiny([probe, cb], max_epochs=EPOCHS)
    except ValueError as exc:
        if probe.batches == 0:
            refusal = str(exc)
        else:
            failure = f"raised ValueError after {probe.batches} training batches: {exc}"
    except Exception as exc:  # noqa: BLE001 - any other type is the failure being tested for
        failure = f"raised {type(exc).__name__} during fit: {exc}"
    else:
        if not all(torch.isfinite(t.float()).all() for t in model.state_dict().values()):
            failure = "the fit completed with non-finite weights"
        elif not active(cb):
            failure = "the fit completed but the callback never acted"
    _FITS[key] = refusal, failure
    return refusal, failure


def _names(message: str, name: str, value: Any, none_ok: bool = False) -> bool:
    """Whether an error message names the argument and its value (with ``none_ok``, None needs no
    mention: it selects the default, which a fit-start message describes by its settings)."""
    shown = (none_ok and value is None) or repr(value) in message or str(value) in message
    if isinstance(value, dict):  # {"a": 1} may be reported item by item
        shown = shown or all(repr(k) in message for k in value)
    return name in message and shown


@pytest.mark.parametrize("case, arg, field, value", CONSTRUCTOR_CASES)
def test_a_bad_argument_is_a_value_error_at_construction_or_fit_start(case, arg, field, value):
    where = arg if field is None else f"{arg}.{field}"
    label = f"{case.name}({where}={value!r})"
    kwargs = {k: case.value(k) for k in case.init_args}
    try:
        if field is None:
            kwargs[arg] = value
        else:
            kwargs[arg] = _dataclass_of(case.cls, arg)(**{**case.init_args.get(arg, {}), field: value})
        cb = case.cls(**kwargs)
    except ValueError as exc:
        assert _names(str(exc), field or arg, value), f"{label}: the message does not name the argument and value: {exc}"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{label} raised {type(exc).__name__} at construction, not ValueError: {exc}")
    refusal, failure = _fit(cb)
    if failure is not None:
        pytest.fail(f"{label} was accepted, then {failure}")
    if refusal is not None:
        assert _names(refusal, field or arg, value, none_ok=True), \
            f"{label}: the fit-start message does not name the argument and value: {refusal}"


def test_the_fuzz_covers_every_argument_of_every_registered_callback():
    covered = {(p.values[0].name, p.values[1]) for p in CONSTRUCTOR_CASES}
    for case in CASES:
        names = [a for a in inspect.signature(case.cls.__init__).parameters if a != "self"]
        assert names and all((case.name, a) in covered for a in names), case.name
    fields = {(p.values[0].name, p.values[1], p.values[2]) for p in CONSTRUCTOR_CASES if p.values[2] is not None}
    assert ("GradualPruning", "schedule", "every_n_steps") in fields
    assert ("DynamicSparseTraining", "targets", "types") in fields
    assert ("QuantizationAwareTraining", "targets", "include") in fields


# -- contradictory combinations: an argument that has no effect given another's value ---------
@pytest.mark.parametrize("make, message, fine", [
    (lambda: EMA(warmup_power=None, warmup_gamma=2.0), r"warmup_gamma=2.0.*warmup_power=None",
     lambda: EMA(warmup_gamma=2.0)),
    (lambda: SWA(bn_batches=4, apply_at_end=False), r"bn_batches=4.*apply_at_end=False",
     lambda: SWA(bn_batches=4)),
    (lambda: GradualPruning(sparsity=0.5, pattern="2:4", allocation="uniform"),
     r"allocation='uniform'.*pattern='2:4'", lambda: GradualPruning(sparsity=0.5, allocation="uniform")),
    (lambda: DynamicSparseTraining(method="rigl", gamma=0.5), r"gamma=0.5.*method='rigl'",
     lambda: DynamicSparseTraining(method="srigl", gamma=0.5)),
    (lambda: DynamicSparseTraining(method="static", drop_fraction=0.5), r"drop_fraction=0.5.*method='static'",
     lambda: DynamicSparseTraining(method="set", drop_fraction=0.5)),
    (lambda: QuantizationAwareTraining(activation_bits=None, activation_method="lsq"),
     r"activation_method='lsq'.*activation_bits=None", lambda: QuantizationAwareTraining(activation_method="lsq")),
    (lambda: QuantizationAwareTraining(weight_bits=None, weight_method="lsq"), r"weight_method='lsq'.*weight_bits=None",
     lambda: QuantizationAwareTraining(weight_method="lsq")),
    (lambda: QuantizationAwareTraining(weight_bits=None, granularity="tensor"), r"granularity='tensor'.*weight_bits=None",
     lambda: QuantizationAwareTraining(granularity="tensor")),
    (lambda: QuantizationAwareTraining(weight_bits="ternary", freeze_step=0.5), r"freeze_step=0.5.*weight_bits='ternary'",
     lambda: QuantizationAwareTraining(weight_bits=2, freeze_step=0.5)),
    (lambda: DataPruning(ratio=0.0, anneal=0.25), r"anneal=0.25.*ratio=0.0",
     lambda: DataPruning(ratio=0.5, anneal=0.25)),
], ids=["ema-warmup", "swa-bn", "gp-nm-allocation", "dst-gamma", "dst-static-drop", "qat-activation-method",
        "qat-weight-method", "qat-granularity", "qat-ternary-freeze", "dp-ratio0-anneal"])
def test_an_argument_without_effect_given_another_is_refused(make, message, fine):
    with pytest.raises(ValueError, match=message):
        make()
    fine()  # the same value where it applies


# -- settings that would never act in this run: refused at fit start, before any step ----------
# TinyData with batch 8: 12 optimizer steps per epoch, 48 in the EPOCHS=4 of fit_tiny.
@pytest.mark.parametrize("make, message", [
    (lambda: EMA(start_step=48), r"EMA start_step=48, every_n_steps=1.*step 49.*step 48.*start earlier"),
    (lambda: EMA(start_step=40, every_n_steps=10), r"start_step=40, every_n_steps=10.*step 50.*update more often"),
    (lambda: EMA(every_n_steps=100), r"every_n_steps=100.*step 100.*stops at step 48"),
    (lambda: SWA(start=0.25, every_n=5), r"every_n=5 epoch.*never adds a snapshot.*max_epochs=4.*lower every_n"),
    (lambda: SWA(start=10, interval="step", every_n=50), r"every_n=50 step.*never adds a snapshot.*lower every_n"),
    (lambda: QuantizationAwareTraining(start_step=0.1, freeze_step=48),
     r"freeze_step=48.*stops at step 48.*Freeze earlier"),
    (lambda: DynamicSparseTraining(sparsity=0.75), r"DynamicSparseTraining\('rigl'\) would never update.*schedule "
     r"start=0, end=0.75, every_n_steps=100.*step 100.*stop at step 36.*every_n_steps <= 35"),
    (lambda: DynamicSparseTraining(schedule=SparsitySchedule(start=0, end=10, every_n_steps=10)),
     r"step 10 \(start 0 \+ every_n_steps 10\).*stop at step 10.*every_n_steps <= 9"),
], ids=["ema-start", "ema-start-every", "ema-every", "swa-epochs", "swa-steps", "qat-freeze", "dst-default", "dst-tight"])
def test_a_setting_that_would_never_act_is_refused_at_fit_start(make, message):
    probe = _Probe()
    with pytest.raises(ValueError, match=message):
        fit_tiny([probe, make()], max_epochs=EPOCHS)
    assert probe.batches == 0, "refused only after training started"


@pytest.mark.parametrize("make", [
    lambda: EMA(start_step=46, every_n_steps=2),  # the first update follows the last step
    lambda: SWA(start=0.25, every_n=4),  # one snapshot, after the fourth epoch
    lambda: QuantizationAwareTraining(start_step=0.1, freeze_step=47),
    lambda: DynamicSparseTraining(sparsity=0.75, schedule=SparsitySchedule(start=0, end=10, every_n_steps=9)),
], ids=["ema", "swa", "qat", "dst"])
def test_the_nearest_settings_that_act_are_accepted(make):
    cb = make()
    fit_tiny([cb], max_epochs=EPOCHS)
    assert active(cb)
    if isinstance(cb, QuantizationAwareTraining):
        assert cb.state_dict()["frozen_at"] == 47


# -- upper bounds that keep a run finite ---------------------------------------------------------
@pytest.mark.parametrize("make, message, fine", [
    # Before: accepted, and the run diverged to NaN weights once the LR was switched.
    (lambda: SWA(swa_lr=1e3), r"SWA swa_lr=1000.0 must lie in \(0, 100\]; a learning rate", lambda: SWA(swa_lr=100)),
    # Before: accepted, then torch's manual_seed overflowed ("Overflow when unpacking long long").
    (lambda: DataPruning(seed=2**32), r"DataPruning seed=4294967296 must be in \[0, 4294967295\]",
     lambda: DataPruning(seed=2**32 - 1)),
], ids=["swa-lr", "dp-seed"])
def test_a_value_too_large_to_run_is_refused_with_the_bound(make, message, fine):
    with pytest.raises(ValueError, match=message):
        make()
    fine()
