"""`lichtenberg merge` on the checkpoints of one tiny run (trained once, shared by every test)."""

import sys

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lichtenberg.callbacks import EMA
from lichtenberg.cli.data import DigitsDataModule
from lichtenberg.cli.merge import merge_main
from lichtenberg.cli.models import SmallCNN
from lichtenberg.core import plain_state_dict
from lichtenberg.core.averaging import update_bn_

CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                "callbacks": [{"class_path": "lichtenberg.callbacks.EMA", "init_args": {"decay": 0.9}}]},
    "model": {"class_path": "lichtenberg.cli.models.SmallCNN", "init_args": {"channels": 4}},
    "data": {"class_path": "lichtenberg.cli.data.DigitsDataModule", "init_args": {"batch_size": 64}},
}


def quiet_trainer(**kwargs) -> L.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three epoch checkpoints of SmallCNN (BatchNorm) on digits with EMA, and the config that builds it."""
    root = tmp_path_factory.mktemp("merge")
    L.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpts", filename="{epoch}", save_top_k=-1)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[EMA(decay=0.9), checkpoints], enable_checkpointing=True)
    trainer.fit(SmallCNN(channels=4, lr=0.05, optimizer="sgd"), datamodule=DigitsDataModule(batch_size=64))
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    paths = [str(root / "ckpts" / f"epoch={e}.ckpt") for e in range(3)]
    return {"root": root, "ckpts": paths, "config": str(config)}


def mean_state(states):
    return {k: torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}


def test_uniform_without_config_writes_three_files_and_warns_about_batchnorm(run, tmp_path, capsys):
    out = tmp_path / "soup.ckpt"
    with pytest.warns(UserWarning, match="2 BatchNorm layers keep the merged running statistics"):
        written = merge_main([*run["ckpts"], "--method", "uniform", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in printed] == [str(out), str(tmp_path / "soup.pt"), str(tmp_path / "soup.yaml")]
    plain = torch.load(tmp_path / "soup.pt")
    expected = mean_state([plain_state_dict(p) for p in run["ckpts"]])
    torch.testing.assert_close(plain, expected)  # num_batches_tracked: the first checkpoint's
    SmallCNN(channels=4).load_state_dict(plain, strict=True)
    checkpoint = torch.load(out, weights_only=False)
    assert "optimizer_states" not in checkpoint and "lr_schedulers" not in checkpoint
    assert checkpoint["callbacks"] == {}  # EMA would swap its old average in; ModelCheckpoint's is another run's
    assert checkpoint["pytorch-lightning_version"] and checkpoint["hyper_parameters"]["channels"] == 4
    described = yaml.safe_load((tmp_path / "soup.yaml").read_text())
    assert described["merge_method"] == "uniform" and described["base_model"] is None
    assert [m["model"] for m in described["models"]] == run["ckpts"]
    assert described["models"][0]["parameters"] == {"weight": pytest.approx(1 / 3)}
    assert described["dtype"] == "float32" and described["batchnorm"] == "merged statistics (not re-estimated)"
    assert written["checkpoint"] == str(out)


def test_greedy_with_config_reestimates_batchnorm_and_validate_reproduces_the_metric(run, tmp_path):
    out = tmp_path / "greedy.ckpt"
    written = merge_main([*run["ckpts"], "--method", "greedy", "--config", run["config"], "--out", str(out)])
    described = yaml.safe_load((tmp_path / "greedy.yaml").read_text())
    greedy = described["greedy"]
    assert greedy["metric"] == "val_acc" and greedy["higher_is_better"] is True
    scores = greedy["ingredient_scores"]
    assert set(scores) == set(run["ckpts"]) and greedy["chosen"][0] == max(scores, key=scores.get)
    assert described["validation"]["val_acc"] >= max(scores.values())  # a greedy soup never loses to its best
    assert [m["parameters"]["chosen"] for m in described["models"]] == [p in greedy["chosen"] for p in run["ckpts"]]
    assert written["greedy"]["chosen"] == greedy["chosen"]
    # BatchNorm: one cumulative pass over the 1257 / 64 -> 20 training batches, for the merged weights.
    plain = torch.load(tmp_path / "greedy.pt")
    assert described["batchnorm"] == "re-estimated over 20 training batches"
    assert plain["features.1.num_batches_tracked"].item() == 20
    model, dm = SmallCNN(channels=4), DigitsDataModule(batch_size=64)
    model.load_state_dict(plain, strict=True)
    dm.setup("fit")
    update_bn_(model, dm.train_dataloader(), lambda m, b: m(b[0]))
    torch.testing.assert_close(model.state_dict()["features.1.running_var"], plain["features.1.running_var"])
    # The .pt scores what the YAML says; the .ckpt, validated with the run's EMA attached, scores the same.
    (from_pt,) = quiet_trainer().validate(model, datamodule=dm, verbose=False)
    assert from_pt["val_acc"] == pytest.approx(described["validation"]["val_acc"])
    (from_ckpt,) = quiet_trainer(callbacks=[EMA(decay=0.9)]).validate(
        SmallCNN(channels=4), datamodule=dm, ckpt_path=str(out), verbose=False)
    assert from_ckpt["val_acc"] == pytest.approx(from_pt["val_acc"])
    assert from_ckpt["val_loss"] == pytest.approx(from_pt["val_loss"])


def test_averaged_merges_the_ema_weights(run, tmp_path):
    with pytest.warns(UserWarning, match="BatchNorm"):
        merge_main([*run["ckpts"][1:], "--method", "uniform", "--averaged", "EMA", "--out", str(tmp_path / "ema.ckpt")])
    expected = mean_state([plain_state_dict(p, averaged="EMA") for p in run["ckpts"][1:]])
    raw = mean_state([plain_state_dict(p) for p in run["ckpts"][1:]])
    merged = torch.load(tmp_path / "ema.pt")
    torch.testing.assert_close(merged, expected)
    assert not torch.allclose(merged["classifier.weight"], raw["classifier.weight"])
    assert yaml.safe_load((tmp_path / "ema.yaml").read_text())["averaged"] == "EMA"


def with_mask(path, out, seed):
    """A copy of a checkpoint pruned by a random mask on the classifier (as a sparsity callback leaves it)."""
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    mask = torch.rand(state["classifier.weight"].shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    state["classifier.weight"] = state["classifier.weight"] * mask
    state["classifier.weight_mask"] = mask
    torch.save(checkpoint, out)
    return mask


@pytest.mark.parametrize("rule", ["intersection", "union"])
def test_pruned_checkpoints_stay_on_the_merged_mask(run, tmp_path, rule):
    masks = [with_mask(p, tmp_path / f"p{i}.ckpt", i) for i, p in enumerate(run["ckpts"][:2])]
    with pytest.warns(UserWarning, match="BatchNorm"):
        merge_main([str(tmp_path / "p0.ckpt"), str(tmp_path / "p1.ckpt"), "--method", "uniform", "--masks", rule,
                    "--out", str(tmp_path / "m.ckpt")])
    merged = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    expected = masks[0] & masks[1] if rule == "intersection" else masks[0] | masks[1]
    assert torch.equal(merged["classifier.weight_mask"], expected)
    assert (merged["classifier.weight"][~expected] == 0).all()
    plain = torch.load(tmp_path / "m.pt")
    assert "classifier.weight_mask" not in plain
    SmallCNN(channels=4).load_state_dict(plain, strict=True)


def test_tied_names_stay_one_tensor_in_both_outputs(tmp_path):
    paths = []
    for i in range(2):
        emb = torch.randn(4, 3)
        state = {"emb.weight": emb, "head.weight": emb, "head.bias": torch.zeros(4)}
        average = {"emb.weight": emb + 1.0, "head.bias": torch.ones(4)}
        checkpoint = {"state_dict": state, "pytorch-lightning_version": "2.6.0",
                      "callbacks": {"EMA{'decay': 0.9}": {"tensors": average}}}
        paths.append(str(tmp_path / f"t{i}.ckpt"))
        torch.save(checkpoint, paths[-1])
    for averaged in ([], ["--averaged", "EMA"]):
        merge_main([*paths, "--method", "uniform", *averaged, "--out", str(tmp_path / "tied.ckpt")])
        merged = torch.load(tmp_path / "tied.ckpt", weights_only=False)["state_dict"]
        plain = torch.load(tmp_path / "tied.pt")
        for state in (merged, plain):
            assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
        inputs = [torch.load(p, weights_only=False)["state_dict"]["emb.weight"] for p in paths]
        torch.testing.assert_close(plain["head.weight"], sum(inputs) / 2 + (1.0 if averaged else 0.0))


def other_architecture(run, tmp_path):
    checkpoint = torch.load(run["ckpts"][0], weights_only=False)
    checkpoint["state_dict"]["classifier.weight"] = torch.zeros(10, 3)
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.mark.parametrize("args, match", [
    (["{c0}", "{c1}", "--method", "uniform", "--out", "{out}.pt"], r"--out '.*\.pt' must end in \.ckpt"),
    (["{c0}", "{tmp}/missing.ckpt", "--method", "uniform"], r"checkpoint '.*missing\.ckpt' does not exist"),
    (["{c0}", "{other}", "--method", "uniform"], r".*other\.ckpt: 'classifier\.weight' is torch\.float32 \[10, 3\], "
                                                 r"torch\.float32 \[10, 128\] in .*epoch=0\.ckpt"),
    (["{c0}", "{c1}", "--method", "unifrom"], r"--method 'unifrom' is unknown; did you mean 'uniform'\?"),
    (["{c0}", "{c1}", "--method", "ties"], r"--method 'ties' needs a base .*; pass --base\."),
    (["{c0}", "{c1}", "--method", "uniform", "--base", "{c2}"], r"--method 'uniform' takes no base"),
    (["{c0}", "{c1}", "--method", "wise_ft", "--base", "{c2}"], r"--method 'wise_ft' merges exactly 1 fine-tuned"),
    (["{c0}", "--method", "uniform"], r"--method 'uniform' merges at least 2 fine-tuned state\(s\), got 1"),
    (["{c0}", "{c1}", "--method", "uniform", "--alpha", "0.3"], r"--alpha has no effect with --method uniform"),
    (["{c0}", "--method", "wise_ft", "--base", "{c1}", "--alpha", "2"], r"--alpha 2\.0 must lie in \[0, 1\]"),
    (["{c0}", "{c1}", "--method", "greedy"], r"--method greedy scores .* pass --config"),
    (["{c0}", "{c1}", "--method", "uniform", "--averaged", "SWA"], r".*epoch=0\.ckpt: averaged='SWA'"),
    (["{c0}", "{c0}", "--method", "uniform"], r"checkpoint '.*epoch=0\.ckpt' is given twice"),
    (["{c0}", "{c1}", "--method", "uniform", "--out", "{c1}"], r"--out '.*epoch=1\.ckpt' would overwrite the input"),
    (["{c0}", "{c1}", "--method", "uniform", "--bogus", "1"], r"unrecognized arguments: --bogus 1"),
    (["{c0}", "{c1}", "--method", "greedy", "--config", "{config}", "--metric", "val_f1"],
     r"validation logs no 'val_f1' \(it logs \['val_acc', 'val_loss'\]\)"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, args, match):
    out = tmp_path / "out" / "merged"
    values = {"c0": run["ckpts"][0], "c1": run["ckpts"][1], "c2": run["ckpts"][2], "tmp": tmp_path, "out": out,
              "config": run["config"], "other": other_architecture(run, tmp_path) if "{other}" in args else ""}
    argv = [a.format(**values) for a in args]
    if "--out" not in argv:
        argv += ["--out", f"{out}.ckpt"]
    with pytest.raises(ValueError, match="^lichtenberg merge: " + match) as err:
        merge_main(argv)
    assert "\n" not in str(err.value) and err.value.__context__ is None and err.value.__cause__ is None
    assert not (tmp_path / "out").exists()


def test_the_console_script_prints_the_one_line_error(run, tmp_path, capsys, monkeypatch):
    from lichtenberg.cli.main import main

    monkeypatch.setattr(sys, "argv", ["lichtenberg"])
    with pytest.raises(SystemExit) as exit_:
        main(["merge", run["ckpts"][0], "--method", "ties", "--out", str(tmp_path / "x.ckpt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lichtenberg merge: error: --method 'ties' needs a base") and len(err.splitlines()) == 2
    assert "Traceback" not in err and not list(tmp_path.iterdir())
