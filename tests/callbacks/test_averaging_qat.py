"""QAT with EMA, SWA and Soup: the averages of the quantizers' tensors restart when quantization starts.

Before QuantizationAwareTraining's start step its quantizers are off and their learned tensors
hold placeholders (LSQ scales of 1.0); at the start they are initialised from the weights and
the first quantized batch. An average that had been blending in the placeholders would give
the averaged model scales it never trained with, so every averaging callback restarts the
average of those tensors there (docs/averaging.md, "QAT and weight averaging"):

- EMA and SWA as if they had started at the start step: the next update copies, then EMA's
  warm-up and SWA's count go on from the restart;
- Soup: the mean of the snapshots taken after it (the value at the start until there is one).

One fit per callback order holds all three averagers (12 optimizer steps per epoch).
"""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lichtenberg.callbacks import EMA, SWA, QuantizationAwareTraining, Soup
from lichtenberg.core.averaging import AveragedWeights, ema_decay
from tests.cases import TRAINER, Crash, TinyData, TinyModel, fit_tiny

START = 14  # QAT's start step: in the second epoch, after Soup's first snapshot (step 12)
EPOCHS = 3
SCALES = ["net.0.weight_quantizer.scale", "net.0.input_quantizer.scale",
          "net.3.weight_quantizer.scale", "net.3.input_quantizer.scale"]


def _qat(start: int = START) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(weight_bits=4, activation_bits=8, weight_method="lsq", activation_method="lsq",
                                     start_step=start)


def _averagers() -> list[Callback]:
    return [EMA(decay=0.9), SWA(start=12, interval="step"), Soup(keep=3, start=0)]


def _make(order: str, start: int = START) -> list[Callback]:
    averagers = _averagers()
    return [_qat(start), *averagers] if order == "qat_first" else [*averagers, _qat(start)]


def _show(t: torch.Tensor) -> str:
    """The first values of a tensor, for short assertion messages."""
    return "[" + ", ".join(f"{v:.4f}" for v in t.flatten()[:4].tolist()) + (", ...]" if t.numel() > 4 else "]")


def _scales(pl_module) -> dict[str, torch.Tensor]:
    params = dict(pl_module.named_parameters())
    return {n: params[n].detach().clone() for n in SCALES}


class Recorder(Callback):
    """Last in ``callbacks``: the raw scales before each optimizer step (``pre``, by the step that
    is about to run) and after it (``post``), and each averager's averaged scales after its update
    (``avg``, by global_step after the step; None where it does not average a scale)."""

    def __init__(self, averagers):
        self.averagers, self.pre, self.post, self.avg = averagers, {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre[trainer.global_step] = _scales(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.post[step] = _scales(pl_module)
        self.avg[step] = {type(cb).__name__: {n: cb.averaged.tensors[n].clone() if n in cb.averaged.tensors else None
                                              for n in SCALES} for cb in self.averagers}


@functools.cache
def _run(order: str):
    callbacks = _make(order)
    averagers = [cb for cb in callbacks if not isinstance(cb, QuantizationAwareTraining)]
    recorder = Recorder(averagers)
    trainer, model = fit_tiny([*callbacks, recorder], max_epochs=EPOCHS)
    return averagers, recorder, trainer, model


def _expected(recorder) -> dict[str, dict[str, torch.Tensor]]:
    """What the rule says each averager holds at the end, from the raw scales the run had."""
    after = sorted(s for s in recorder.post if s > START)  # the steps trained with quantization on
    ema = dict(recorder.post[after[0]])  # the first update after the restart copies
    for k, step in enumerate(after[1:], start=1):  # then EMA's warm-up counts from the restart
        ema = {n: torch.lerp(v, recorder.post[step][n], 1.0 - ema_decay(k, 0.9)) for n, v in ema.items()}
    swa = {n: torch.stack([recorder.post[s][n] for s in after]).mean(0) for n in SCALES}
    snapshots = [s for s in after if s % 12 == 0]  # Soup's candidates after the start: epoch ends
    soup = {n: torch.stack([recorder.post[s][n] for s in snapshots]).mean(0) for n in SCALES}
    return {"EMA": ema, "SWA": swa, "Soup": soup}


@pytest.mark.parametrize("order", ["qat_first", "averagers_first"])
def test_averaged_scales_restart_at_the_start_step_in_either_order(order):
    averagers, rec, _, _ = _run(order)
    first = START + 1  # global_step after the first quantized optimizer step
    for name, averaged in rec.avg[first].items():
        missing = [n for n, v in averaged.items() if v is None]
        assert not missing, f"{name} ({order}) does not average the quantizer tensors {missing}"
    for n in SCALES:
        init = rec.pre[START][n]  # initialised from the weights / the first quantized batch
        assert not torch.equal(init, torch.ones_like(init)), n
        # EMA and SWA: the first update after the restart copies the raw scale.
        for name in ("EMA", "SWA"):
            got, raw = rec.avg[first][name][n], rec.post[first][n]
            assert torch.equal(got, raw), f"{name} {n} after the start step: average {_show(got)}, raw {_show(raw)}"
        # Soup: no snapshot since the start yet, so the soup holds the value it started from.
        for step in range(first, 24):
            got = rec.avg[step]["Soup"][n]
            assert torch.equal(got, init), f"Soup {n} at step {step}: soup {_show(got)}, initialised {_show(init)}"
    expected = _expected(rec)
    for cb in averagers:
        name = type(cb).__name__
        for n in SCALES:
            torch.testing.assert_close(cb.averaged.tensors[n], expected[name][n], msg=f"{name} {n} at the end")


def test_both_orders_give_the_same_averages_and_model():
    a, _, _, model_a = _run("qat_first")
    b, _, _, model_b = _run("averagers_first")
    for cb_a, cb_b in zip(a, b):
        state_a, state_b = cb_a.averaged.state_dict(), cb_b.averaged.state_dict()
        assert state_a["tensors"].keys() == state_b["tensors"].keys()
        for n, v in state_a["tensors"].items():
            assert torch.equal(v, state_b["tensors"][n]), (type(cb_a).__name__, n)
    for n, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[n]), n


def _val_loss(model, state=None) -> float:
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict({**model.state_dict(), **{k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}})
    (out,) = L.Trainer(**TRAINER).validate(model, datamodule=TinyData(), verbose=False)
    return out["val_loss"]


def test_the_averaged_models_hold_scales_they_trained_with_and_validate_sanely():
    averagers, rec, _, model = _run("qat_first")
    after = [rec.post[s] for s in sorted(rec.post) if s > START] + [rec.pre[START]]
    raw = _val_loss(model, averagers[-1].raw_weights)  # the module holds Soup's average (the last applier)
    losses = {type(cb).__name__: _val_loss(model, cb.averaged_state_dict()) for cb in averagers}
    outside = []
    for cb in averagers:
        for n in SCALES:  # an average of values the run had lies within their range (no placeholder 1.0)
            seen, avg = torch.stack([v[n] for v in after]), cb.averaged.tensors[n]
            if not bool((avg >= seen.amin(0) - 1e-6).all() and (avg <= seen.amax(0) + 1e-6).all()):
                outside.append(f"{type(cb).__name__} {n}: {_show(avg)} not in [{_show(seen.amin(0))}, {_show(seen.amax(0))}]")
    assert not outside, "averaged scales the run never had:\n" + "\n".join(outside)
    assert all(loss < raw + 0.25 for loss in losses.values()), f"val_loss of the averaged models {losses}, raw {raw:.3f}"


def _crash_resume(start: int, tmp_path):
    """(reference averagers, model) of an uninterrupted run, and the same of a run that crashed
    at the start of epoch 2 and resumed from the end-of-epoch-1 checkpoint (step 24)."""
    if start == START:
        ref, _, _, ref_model = _run("qat_first")
    else:
        ref_cbs = _make("qat_first", start)
        _, ref_model = fit_tiny(ref_cbs, max_epochs=EPOCHS)
        ref = ref_cbs[1:]
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_tiny(_make("qat_first", start) + [Crash(2), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)],
                 max_epochs=EPOCHS, enable_checkpointing=True)
    (ckpt,) = tmp_path.glob("epoch=1-*.ckpt")
    cbs = _make("qat_first", start)
    L.seed_everything(0)
    model = TinyModel()
    L.Trainer(callbacks=cbs, max_epochs=EPOCHS, **TRAINER).fit(model, datamodule=TinyData(), ckpt_path=str(ckpt))
    return ref, ref_model, cbs[1:], model


@pytest.mark.parametrize("start", [START, 26], ids=["restarts_in_the_checkpoint", "resume_crosses_the_start"])
def test_crash_resume_across_the_start_step_is_bit_exact(start, tmp_path):
    # START: the checkpoint (step 24) holds restarted averages, and a Soup snapshot from before
    # the restart (step 12) that the soup of the scales must go on leaving out.
    ref, ref_model, resumed, model = _crash_resume(start, tmp_path)
    for a, b in zip(ref, resumed):
        state_a, state_b = a.averaged.state_dict(), b.averaged.state_dict()
        assert state_a.keys() == state_b.keys() and state_a["num_updates"] == state_b["num_updates"]
        for key in state_a.keys() - {"num_updates", "tensors"}:
            assert state_a[key] == state_b[key], (type(a).__name__, key)
        for n, v in state_a["tensors"].items():
            assert torch.equal(v, state_b["tensors"][n]), (type(a).__name__, n)
    for n, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[n]), n


class InputScaleAtStart(Callback):
    def __init__(self):
        self.raw = self.ema = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 12:
            ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
            self.raw = _scales(pl_module)
            self.ema = {n: ema.averaged.tensors[n].clone() for n in SCALES}


def test_quantization_starting_at_a_validation_keeps_the_scales_it_observed():
    # Step 12 ends the first epoch: its validation is the first quantized forward, run while EMA
    # holds its averages in the module. The input scales observed there are the model's from then on.
    seen = InputScaleAtStart()
    ema = EMA(decay=0.9)
    fit_tiny([_qat(12), ema, seen], max_epochs=2, max_steps=14)
    lost = [n for n in SCALES if torch.equal(seen.raw[n], torch.ones_like(seen.raw[n]))]
    assert not lost, f"{lost}: back at the placeholder 1.0 after the validation that initialised them"
    for n in SCALES:
        assert torch.equal(seen.ema[n], seen.raw[n]), f"{n}: EMA {_show(seen.ema[n])}, raw {_show(seen.raw[n])}"


def test_restarts_add_no_host_sync_to_any_step():
    # The restart is copies at the event; the per-tensor update weights are Python floats.
    from tests.test_host_syncs import EVENT_BOUND, LOG_EVERY, added

    steps = added([_qat(), EMA(decay=0.9), SWA(start=12, interval="step"), Soup(keep=3, start=0)])
    start = [w for w in steps if w.step == START]
    steady = {w.step: dict(w.counts) for w in steps
              if w.step != START and (w.step + 1) % LOG_EVERY and w.where != "last" and w.counts}
    assert len(steps) > 40 and not steady, f"syncs in steady-state steps: {steady}"
    # The start step is QAT's event and, as step 15 ends it, a logging step (EMA and SWA log 2 floats each).
    counts = dict(start[0].counts)
    logged = counts.pop("H2D torch.tensor", 0)
    assert sum(counts.values()) <= EVENT_BOUND["QuantizationAwareTraining"] and logged <= 4, dict(start[0].counts)


def test_core_restart_counts_updates_per_tensor_and_round_trips():
    model = torch.nn.Linear(2, 2)
    avg = AveragedWeights(model)
    swa = lambda n: 1.0 / (n + 1)  # noqa: E731  SWA's running mean
    values = []
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias.add_(1.0)
        if step == 2:
            avg.restart_(avg.names_of([model.bias]))  # re-initialised here: its mean restarts
            assert torch.equal(avg.tensors["bias"], model.bias) and avg.restarted == {"bias": 2}
        values.append((model.weight.detach().clone(), model.bias.detach().clone()))
        avg.update_(swa)
    torch.testing.assert_close(avg.tensors["weight"], torch.stack([w for w, _ in values]).mean(0))
    torch.testing.assert_close(avg.tensors["bias"], torch.stack([b for _, b in values[2:]]).mean(0))
    fresh = AveragedWeights(model)
    fresh.load_state_dict(avg.state_dict())
    assert fresh.restarted == {"bias": 2} and len(fresh._groups) == len(avg._groups) == 2
    avg.update_(0.5)  # a float weight applies to every tensor alike
    fresh.update_(0.5)
    assert all(torch.equal(fresh.tensors[n], t) for n, t in avg.tensors.items())
