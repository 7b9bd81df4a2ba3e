"""Every shipped recipe trains for real: a short run with the recipe's own trainer settings.

`fast_dev_run` (tests/cli/test_cli.py) skips what a real run does: validation at the recipe's
interval, epoch ends, schedules resolved against the run's length, logging steps and
checkpoints, and the callbacks' refusal of settings that would never act. Here each recipe
runs with only its length and the validation batches cut, so a recipe that would crash on a
real run crashes here, and each technique must have acted.
"""

import sys
import warnings

import lightning as L
import pytest
import yaml

from lichtenberg.callbacks import (
    DataPruning,
    DynamicSparseTraining,
    GradualPruning,
    QuantizationAwareTraining,
    SampleReweighting,
)
from lichtenberg.callbacks._averaging import _Averaging
from lichtenberg.cli import main, recipe_path, recipes
from lichtenberg.core.quantization import quant_modules

# One logging step per run at the recipes' log_every_n_steps: 20 (EMA logs on those steps).
BATCHES = 20
# Step-bounded recipes (max_steps) cross epoch boundaries and end mid-epoch; so does the test.
STEPS = BATCHES + BATCHES // 2
# Recipes whose technique needs more than one short epoch to act. Their own settings stay.
LONGER = {
    # InfoBatch scores epoch 0, prunes epoch 1 and trains on full data in its last anneal
    # share: 3 epochs at anneal 0.125, uncut, since a batch limit would hide the shorter epoch.
    "infobatch-mnist1d": ["--trainer.max_epochs", "3"],
    # SampleReweighting's warmup_steps (200) is a step count, not a fraction: 6 digits epochs
    # (240 steps) is the shortest run in which it weights anything.
    "reweight-noisy-digits": ["--trainer.max_epochs", "6"],
    # RigL's first mask update at step 50 must fall before the schedule's end (0.75 of the
    # run): 2 epochs of 40 steps.
    "rigl-mnist1d": ["--trainer.max_epochs", "2"],
}
# 2 processes (Lightning re-runs the console script per rank): tests/cli/test_cli.py runs them
MULTI_PROCESS = [n for n in recipes() if (yaml.safe_load(open(recipe_path(n))).get("trainer") or {}).get("devices", 1) != 1]
SLOW_ADAM = "pass fused=True"  # callbacks/_sparsity.py: non-fused CPU Adam under masks


def _length(name: str) -> list[str]:
    if name in LONGER:
        return LONGER[name]
    trainer = yaml.safe_load(open(recipe_path(name))).get("trainer") or {}
    if trainer.get("max_steps", -1) != -1:
        return ["--trainer.max_steps", str(STEPS), "--trainer.limit_train_batches", str(BATCHES)]
    return ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(BATCHES)]


def _check_acted(cb, trainer: L.Trainer) -> None:
    """The technique did something in this run (cheap checks on public state)."""
    name = type(cb).__name__
    if isinstance(cb, _Averaging):  # EMA, SWA, Soup
        assert cb.averaged.num_updates > 0, f"{name} never updated its average"
    elif isinstance(cb, GradualPruning):
        assert cb.state_dict()["events"] > 0
        assert cb.engine.sparsity_report()[1] == pytest.approx(cb.sparsity, abs=0.01), "final sparsity not reached"
    elif isinstance(cb, DynamicSparseTraining):
        assert cb.state_dict()["updates"] > 0, "RigL never updated its masks"
        assert cb.engine.sparsity_report()[1] == pytest.approx(cb.sparsity, abs=0.01)
    elif isinstance(cb, QuantizationAwareTraining):
        layers = quant_modules(trainer.lightning_module)
        assert layers and all(m.weight_quantizer.enabled for m in layers.values()), "quantization never started"
    elif isinstance(cb, SampleReweighting):
        assert cb.state_dict()["batches_weighted"] > 0, "every batch was still in the warm-up"
    elif isinstance(cb, DataPruning):
        full = len(trainer.datamodule.train_set) * trainer.current_epoch
        assert 0 < cb.state_dict()["forwarded"] < full, "no epoch was shorter than the full data"


@pytest.fixture
def fitted(monkeypatch, tmp_path):
    """The Trainer of the fit that main() runs, captured as it starts."""
    monkeypatch.setattr(sys, "argv", ["lichtenberg"])
    monkeypatch.chdir(tmp_path)  # logs and checkpoints land in the test's folder
    seen = []
    fit = L.Trainer.fit

    def capture(self, *args, **kwargs):
        seen.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", capture)
    return seen


@pytest.mark.parametrize("name", [n for n in recipes() if n not in MULTI_PROCESS])
def test_recipe_trains_for_real_and_its_technique_acts(name, fitted, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning already shown in this process must count again
        main(["fit", "--config", name, *_length(name), "--trainer.limit_val_batches", "2"])
    (trainer,) = fitted
    assert not trainer.fast_dev_run and trainer.state.finished
    assert trainer.global_step >= BATCHES
    assert "lichtenberg fit summary" in capsys.readouterr().out
    ours = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lichtenberg.")]
    assert ours, "a recipe shows a lichtenberg technique"
    for cb in ours:
        _check_acted(cb, trainer)
    slow = [str(w.message) for w in caught if SLOW_ADAM in str(w.message)]
    assert not slow, f"set `fused: true` on the recipe's Adam: {slow[0]}"


def test_slow_adam_warning_is_seen_through_main(fitted, capsys):
    # The check above is only as good as the recorder: a sparsity recipe on non-fused Adam warns.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", "pruning-digits", "--model.init_args.optimizer", "adam", "--trainer.fast_dev_run", "1",
              "--trainer.logger", "false"])
    assert any(SLOW_ADAM in str(w.message) for w in caught)
