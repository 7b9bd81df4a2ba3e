"""Generic contract tests, parametrized over every public callback in ``tests/cases.py``."""

from __future__ import annotations

import io
import itertools
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import lichtenberg.callbacks
from lichtenberg.core.quantization import quant_modules
from tests.cases import CASES, EPOCHS, INCOMPATIBLE, Crash, StateDump, TinyData, TinyModel, active, flat_state

BASE = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    deterministic=True,
)


def fit(callbacks, ckpt_path=None, **kwargs):
    L.seed_everything(0)
    model = TinyModel()
    kwargs = {**BASE, "max_epochs": EPOCHS, "enable_checkpointing": False, **kwargs}
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        kwargs["enable_checkpointing"] = True
    trainer = L.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer, model


def assert_same(a, b, what):
    fa, fb = flat_state(a), flat_state(b)
    assert fa.keys() == fb.keys(), what
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert torch.equal(fa[key], fb[key]), f"{what}: {key} differs"
        else:
            assert fa[key] == fb[key], f"{what}: {key} {fa[key]} != {fb[key]}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fit(case):
    cb = case.make()
    trainer, model = fit([cb])
    case.check(cb, trainer, model)
    assert all(torch.isfinite(t.float()).all() for t in model.state_dict().values())
    assert torch.isfinite(trainer.callback_metrics["val_acc"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_round_trip(case):
    cb = case.make()
    fit([cb], max_epochs=3)  # DataPruning's anneal leaves no pruned epoch in 2 (refused as never acting)
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    fresh = case.make()
    fresh.load_state_dict(torch.load(buffer))
    assert_same(fresh.state_dict(), cb.state_dict(), "state after round trip")


def crash_and_resume(callbacks_factory, tmp_path: Path, **kwargs):
    """Uninterrupted run vs crash after epoch 1 + resume from its checkpoint."""
    ref_cbs = callbacks_factory()
    _, ref = fit(ref_cbs, **kwargs)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(callbacks_factory() + [Crash(2), ModelCheckpoint(dirpath=run_dir, save_top_k=-1)], **kwargs)
    (ckpt,) = run_dir.glob("epoch=1-*.ckpt")
    cbs = callbacks_factory()
    _, resumed = fit(cbs, ckpt_path=str(ckpt), **kwargs)
    return ref_cbs, ref, cbs, resumed


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("setting", [{}, {"accumulate_grad_batches": 2}], ids=["plain", "accum2"])
def test_crash_resume_is_bit_exact(case, setting, tmp_path):
    (ref_cb,), ref, (cb,), resumed = crash_and_resume(lambda: [case.make()], tmp_path, **setting)
    assert_same(resumed.state_dict(), ref.state_dict(), "final weights (and masks)")
    assert_same(cb.state_dict(), ref_cb.state_dict(), "callback state")
    if getattr(cb, "raw_weights", None) is not None:
        assert_same(cb.raw_weights, ref_cb.raw_weights, "final raw weights")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ddp_two_processes_agree(case, tmp_path):
    cb = case.make()
    trainer = L.Trainer(
        **{**BASE, "devices": 2}, strategy="ddp_spawn", max_epochs=EPOCHS, enable_checkpointing=False,
        callbacks=[cb, StateDump(str(tmp_path))],
    )
    L.seed_everything(0)
    trainer.fit(TinyModel(), datamodule=TinyData())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["callbacks"][case.name] and r0["model"]
    assert_same(r0["callbacks"], r1["callbacks"], "callback state across ranks")
    assert_same(r0["model"], r1["model"], "final weights across ranks")


PAIRS = list(itertools.combinations(CASES, 2))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "+".join(map(str, p)))
def test_pairs_compose_and_resume_bit_exact(pair, tmp_path):
    first, second = pair
    if (first.name, second.name) in INCOMPATIBLE:  # refused before training, with the fix in the message
        with pytest.raises(ValueError, match=INCOMPATIBLE[first.name, second.name]):
            fit([first.make(), second.make()])
        return
    refs, ref, cbs, resumed = crash_and_resume(lambda: [first.make(), second.make()], tmp_path)
    for case, ref_cb, cb in zip(pair, refs, cbs):
        assert active(cb), case
        assert_same(cb.state_dict(), ref_cb.state_dict(), f"{case} state")
    assert_same(resumed.state_dict(), ref.state_dict(), "final weights")
    averaging = [cb for cb in cbs if hasattr(cb, "averaged")]
    if averaging:  # the later averaging callback ships its average
        shipped = averaging[-1].state_dict()["tensors"]
        for name, tensor in resumed.state_dict().items():
            if name in shipped:
                assert torch.allclose(tensor, shipped[name].to(tensor.dtype) * resumed.state_dict().get(f"{name}_mask", 1)), name
    for cb in cbs:  # averaged weights of a sparse model stay on the mask
        if getattr(cb, "engine", None) is not None:
            for name, param in cb.engine.params.items():
                assert (param[~cb.engine.masks[name]] == 0).all(), name
    for name, layer in quant_modules(resumed).items():  # mask first, then quantize: pruned weights are exactly 0
        if hasattr(layer, "weight_mask"):
            assert (layer.quantized_weight()[~layer.weight_mask] == 0).all(), name


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("setting", [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}], ids=["bf16", "accum2"])
def test_precision_and_accumulation(case, setting):
    cb = case.make()
    trainer, model = fit([cb], **setting)
    expected_steps = EPOCHS * 12 // setting.get("accumulate_grad_batches", 1)
    if case.full_epochs:
        assert trainer.global_step == expected_steps
    else:
        assert 0 < trainer.global_step < expected_steps
    case.check(cb, trainer, model)
    assert all(torch.isfinite(t.float()).all() for t in model.state_dict().values())


def _cli(args):
    return LightningCLI(
        TinyModel, TinyData, args=args, save_config_kwargs={"overwrite": True}, trainer_defaults={"logger": False}
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cli_yaml_instantiate_and_print_config_round_trip(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lichtenberg"])
    config = {
        "trainer": {
            "max_epochs": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": f"lichtenberg.callbacks.{case.name}", "init_args": case.init_args}],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(path), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert f"lichtenberg.callbacks.{case.name}" in printed.read_text()
    cli = _cli(["fit", "--config", str(printed)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, getattr(lichtenberg.callbacks, case.name))]
    for key in case.init_args:
        assert getattr(cb, key) == case.value(key), key
    assert active(cb)


def test_every_public_callback_is_registered():
    public = {n for n in lichtenberg.callbacks.__all__ if isinstance(getattr(lichtenberg.callbacks, n), type)}
    assert {c.name for c in CASES} == public


class FSDPStrategy:  # stand in for Lightning's: only their names are checked
    pass


class DeepSpeedStrategy:
    pass


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in ("SampleReweighting", "DataPruning")], ids=str)
@pytest.mark.parametrize("strategy, message", [
    (FSDPStrategy, "does not support FSDPStrategy .FSDP1.* use ModelParallelStrategy .FSDP2."),
    (DeepSpeedStrategy, "does not support DeepSpeedStrategy; supported: a single device, DDP .* or FSDP2"),
], ids=["fsdp1", "deepspeed"])
def test_weight_touching_callbacks_refuse_fsdp1_and_deepspeed_naming_what_works(case, strategy, message):
    trainer = types.SimpleNamespace(strategy=strategy(), callbacks=[], world_size=1)
    with pytest.raises(ValueError, match=message):
        case.make().setup(trainer, TinyModel(), "fit")
