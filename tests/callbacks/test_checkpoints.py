"""One call from any sparse / QAT / averaged checkpoint to the plain module's state dict."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lichtenberg.callbacks import EMA, GradualPruning, QuantizationAwareTraining
from lichtenberg.core import load_checkpoint, plain_state_dict
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import TRAINER, TinyData, TinyModel
from tests.zoo import Wrapped, data


def test_a_pruned_qat_ema_checkpoint_becomes_a_plain_state_dict(tmp_path):
    L.seed_everything(0)
    model = TinyModel()
    callbacks = [GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=2, end=20, every_n_steps=4)),
                 QuantizationAwareTraining(weight_bits=4), EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    trainer = L.Trainer(callbacks=callbacks, max_epochs=3, **{**TRAINER, "enable_checkpointing": True})
    trainer.fit(model, datamodule=TinyData())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    raw = plain_state_dict(checkpoint)
    plain = TinyModel()
    plain.load_state_dict(raw, strict=True)  # no mask, no quantizer keys left
    masks = {k[:-5]: v for k, v in checkpoint["state_dict"].items() if k.endswith("_mask")}
    assert set(masks) == {"net.0.weight", "net.3.weight"}
    for name, mask in masks.items():
        assert torch.equal(raw[name], checkpoint["state_dict"][name] * mask)
        assert int((raw[name] == 0).sum()) >= int((~mask).sum())
    averaged = plain_state_dict(checkpoint, averaged="EMA")
    ema = checkpoint["callbacks"][callbacks[2].state_key]["tensors"]
    for name in ("net.0.weight", "net.3.bias", "net.1.running_mean"):
        expected = ema[name] * masks[name] if name in masks else ema[name]
        assert torch.equal(averaged[name], expected), name
    TinyModel().load_state_dict(averaged, strict=True)


def test_a_tied_gpt2_checkpoint_loads_into_plain_gpt2_and_stays_tied(tmp_path):
    L.seed_everything(0)
    model = Wrapped("gpt2")
    callbacks = [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(start=2, end=10, every_n_steps=4)), EMA(decay=0.9),
                 ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    trainer = L.Trainer(callbacks=callbacks, max_epochs=2, **{**TRAINER, "enable_checkpointing": True,
                                                               "num_sanity_val_steps": 0})
    trainer.fit(model, train_dataloaders=data("gpt2"))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for averaged in (None, "EMA"):  # the tie is one tensor in the plain state dict: torch.save stores it once
        tied = plain_state_dict(checkpoint, averaged=averaged)
        assert tied["net.lm_head.weight"] is tied["net.transformer.wte.weight"], averaged
    state = plain_state_dict(checkpoint, averaged="EMA")
    plain = Wrapped("gpt2")
    plain.load_state_dict(state, strict=True)
    head, wte = plain.net.lm_head.weight, plain.net.transformer.wte.weight
    assert head is wte and torch.equal(wte, state["net.transformer.wte.weight"])
    mask = model.net.lm_head.weight_mask
    assert (wte[~mask] == 0).all() and torch.equal(wte, model.net.transformer.wte.weight)  # = the shipped EMA weights


def _sharded_checkpoint_dir(path, state, meta):
    """A directory laid out as Lightning's ModelParallelStrategy writes it (DCP + meta.pt)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": state}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    torch.save(meta, path / "meta.pt")


def test_a_sharded_checkpoint_directory_becomes_a_plain_state_dict(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight, average = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    mask = torch.rand(5, 3, generator=g) > 0.5
    state = {"fc.weight": weight, "fc.weight_mask": mask, "fc.weight_ema": average, "fc.bias": torch.ones(5)}
    _sharded_checkpoint_dir(tmp_path, state, {"global_step": 7, "callbacks": {"EMA{'decay': 0.9}": {"num_updates": 3}}})
    loaded = load_checkpoint(tmp_path)
    assert loaded["global_step"] == 7 and set(loaded["state_dict"]) == set(state)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())
    raw = plain_state_dict(tmp_path)
    assert set(raw) == {"fc.weight", "fc.bias"}, "masks and averages kept beside the weights are not model keys"
    assert torch.equal(raw["fc.weight"], weight * mask)
    averaged = plain_state_dict(str(tmp_path), averaged="EMA")
    assert torch.equal(averaged["fc.weight"], average * mask) and torch.equal(averaged["fc.bias"], torch.ones(5))
    with pytest.raises(ValueError, match="averaged='SWA': the checkpoint holds 0 SWA"):
        plain_state_dict(tmp_path, averaged="SWA")
