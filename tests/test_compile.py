"""torch.compile: no graph break and no recompile caused by a lichtenberg callback.

Every callback of ``tests/cases.py`` trains a model that was compiled, across the callback's
events (mask updates, the EMA / SWA swaps for validation and at the end, QAT's start step), and
the same fit without the callback is the baseline: a plain fit compiles a second graph for
validation (no grad mode), and whatever else Lightning and the model cost. The callback must add no graph
break (dynamo's ``counters["graph_break"]``) and no compiled frame (``CompileCounter``: every
recompile is one more). The backend is ``CompileCounter``: dynamo traces, the graph runs
eagerly, no inductor, so a fit takes about a second on a CPU.

The three ways users compile (docs/compile.md):

- a compiled submodule, ``self.net = torch.compile(self.net)`` in ``__init__`` (every case);
- compiled submodules built in ``configure_model`` (a few cases: bound after the hook);
- the whole module, ``trainer.fit(torch.compile(module))``: Lightning compiles its forward,
  ``training_step`` and ``validation_step`` (a few cases, the per-sample ones among them:
  ``weighted_loss`` runs inside the compiled step). Lightning 2.6's ``self.log`` cannot be
  traced by torch 2.13 (an InternalTorchDynamoError), so that module logs nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import lightning as L
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch._dynamo.utils import counters

from lichtenberg.callbacks import GradualPruning, QuantizationAwareTraining, weighted_loss
from tests.cases import CASES, TRAINER, Case, TinyData, TinyModel, active, fit_tiny

EPOCHS = 3  # every case acts in 3 epochs: events, validation swaps, QAT's start


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


class CompiledSubmodule(TinyModel):
    """TinyModel with its layers compiled in ``__init__``, the usual way."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend=backend)


class CompiledInConfigureModel(TinyModel):
    """TinyModel whose layers are built and compiled in ``configure_model``."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        del self.net
        self.backend = backend

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = torch.compile(_net(), backend=self.backend)


class Unlogged(TinyModel):
    """TinyModel without ``self.log``, for ``trainer.fit(torch.compile(module))``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return weighted_loss(self, nn.functional.cross_entropy(self(x), y, reduction="none"))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


MODELS = {
    "submodule": CompiledSubmodule,
    "configure_model": CompiledInConfigureModel,
    "module": lambda backend: torch.compile(Unlogged(), backend=backend),
}


def compiled_fit(how: str, cb: Callback | None) -> dict[str, Any]:
    """A seeded fit of the model compiled ``how``, with ``cb`` (None: the baseline): frames
    compiled, graph breaks by reason, recompile reasons, the module."""
    torch._dynamo.reset()
    counters.clear()
    backend = torch._dynamo.testing.CompileCounter()
    L.seed_everything(0)
    model = MODELS[how](backend)
    trainer = L.Trainer(callbacks=[cb] if cb else [], max_epochs=EPOCHS, **TRAINER)
    trainer.fit(model, datamodule=TinyData())
    recompiles = {code.co_name: [str(r)[:200] for r in reasons]
                  for code, reasons in torch._dynamo.utils.guard_failures.items()}
    return {"frames": backend.frame_count, "breaks": collections.Counter(counters["graph_break"]),
            "recompiles": recompiles, "model": model}


_baselines: dict[str, dict[str, Any]] = {}


def baseline(how: str) -> dict[str, Any]:
    if how not in _baselines:
        _baselines[how] = compiled_fit(how, None)
    return _baselines[how]


def assert_clean(plain: dict[str, Any], run: dict[str, Any], name: str, full_epochs: bool = True) -> None:
    """``run`` added no graph break and no compiled frame to ``plain``."""
    breaks = run["breaks"] - plain["breaks"]
    assert not breaks, f"{name} breaks the graph: {dict(breaks)}"
    # A callback that shortens epochs (DataPruning) gives a last batch of another size: one
    # recompile, after which dynamo keeps the batch dimension dynamic. Nothing else may recompile.
    extra = run["frames"] - plain["frames"]
    reasons = [r for rs in run["recompiles"].values() for r in rs if r not in sum(plain["recompiles"].values(), [])]
    new_batch_size = not full_epochs and extra == 1 and all("size mismatch at index 0" in r for r in reasons)
    assert extra == 0 or new_batch_size, (
        f"{name} recompiles: {run['frames']} frames, {plain['frames']} without it; {run['recompiles']}")


def check_compile_clean(how: str, case: Case) -> dict[str, Any]:
    """Fits with the case's callback, asserts it added no break and no frame; returns the run."""
    cb = case.make()
    plain, run = baseline(how), compiled_fit(how, cb)
    assert plain["frames"] >= 1 and active(cb), "the model ran compiled and the callback acted"
    assert_clean(plain, run, case.name, case.full_epochs)
    return run


def _default_inputs(case: Case) -> Case:
    """QAT's case with the default ``dynamic`` inputs. Its registered lsq inputs are initialised
    from their first quantized batch in eager code (a documented exception, tested below)."""
    if case.cls is QuantizationAwareTraining:
        return dataclasses.replace(case, init_args={**case.init_args, "activation_method": "dynamic"})
    return case


@pytest.mark.parametrize("case", [_default_inputs(c) for c in CASES], ids=str)
def test_a_compiled_submodule_trains_without_breaks_or_recompiles(case):
    check_compile_clean("submodule", case)


def test_qat_data_initialised_inputs_break_and_recompile_only_around_their_first_quantized_batch():
    """lsq inputs read the sign of their first quantized batch on the host and average the
    initial scale over ranks: dynamo breaks the graph there and recompiles, at QAT's start step
    and the step after, never again (docs/quantization.md, "Speed")."""
    (case,) = [c for c in CASES if c.cls is QuantizationAwareTraining]
    plain, run = baseline("submodule"), compiled_fit("submodule", case.make())
    breaks = run["breaks"] - plain["breaks"]
    assert breaks and all("disable" in reason for reason in breaks), dict(breaks)
    extra = run["frames"] - plain["frames"]
    assert 0 < extra <= 12, run["recompiles"]


@pytest.mark.parametrize("case", [_default_inputs(c) for c in CASES
                                  if c.name in ("EMA", "GradualPruning", "DynamicSparseTraining",
                                                "QuantizationAwareTraining")], ids=str)
def test_submodules_compiled_in_configure_model(case):
    check_compile_clean("configure_model", case)


@pytest.mark.parametrize("case", [_default_inputs(c) for c in CASES
                                  if c.name in ("SWA", "GradualPruning", "SampleReweighting", "DataPruning",
                                                "QuantizationAwareTraining")], ids=str)
def test_a_compiled_lightning_module(case):
    # weighted_loss runs inside the compiled training_step: the per-sample callbacks' part of it
    # is traced too (batch positions and warm-up decided before the step, logging after it)
    check_compile_clean("module", case)


def test_wanda_collects_its_input_norms_in_a_compiled_model():
    # Wanda's input-norm hooks are added around each event, after the forward was compiled:
    # a compiled forward skips them (dynamo does not guard on hooks) and the scores silently
    # fell back to magnitudes. The event step now runs eagerly: the masks are the eager run's.
    (gradual,) = [c for c in CASES if c.cls is GradualPruning]
    case = dataclasses.replace(gradual, init_args={**gradual.init_args, "score": "wanda"})
    run = check_compile_clean("submodule", case)
    _, eager = fit_tiny([case.make()], max_epochs=EPOCHS)
    compiled = {k.replace("_orig_mod.", ""): v for k, v in run["model"].state_dict().items()}
    masks = {k: v for k, v in eager.state_dict().items() if k.endswith("_mask")}
    assert masks and all(torch.equal(compiled[k], m) for k, m in masks.items())


class Recompiles(Callback):
    """What the checks must catch: a Python value the compiled forward reads, changed mid-fit,
    and a host read inside the forward."""

    def setup(self, trainer, pl_module, stage):
        self.layers = pl_module.net._orig_mod
        self.layers[0].register_forward_pre_hook(lambda module, args: None if float(args[0].sum()) else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.layers[1].eps = 1e-5 if trainer.global_step < 5 else 2e-5


def test_the_checks_catch_a_recompile_and_a_graph_break():
    plain, run = baseline("submodule"), compiled_fit("submodule", Recompiles())
    with pytest.raises(AssertionError, match="breaks the graph"):
        assert_clean(plain, run, "Recompiles")
    with pytest.raises(AssertionError, match="recompiles"):
        assert_clean(plain, {**run, "breaks": plain["breaks"]}, "Recompiles")
