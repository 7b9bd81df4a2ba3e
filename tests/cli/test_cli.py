"""The `lichtenberg` console script: recipes parse and run, the default job prints its summary."""

import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lichtenberg.callbacks

from lichtenberg.cli import main, recipe_path, recipes
from lichtenberg.cli.main import _resolve_args

QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lichtenberg"])
    monkeypatch.chdir(tmp_path)  # config.yaml and logs land in the test's folder


def test_shipped_recipes_include_the_default_and_one_per_demo_model():
    names = recipes()
    assert "default" in names
    configs = [yaml.safe_load(open(recipe_path(n))) for n in names]
    assert {c["model"]["class_path"].rsplit(".", 1)[1] for c in configs} == {"SmallCNN", "MLP", "TinyTransformerLM"}
    callbacks = {cb["class_path"].rsplit(".", 1)[1] for c in configs for cb in c["trainer"]["callbacks"]}
    public = {n for n in lichtenberg.callbacks.__all__ if isinstance(getattr(lichtenberg.callbacks, n), type)}
    assert callbacks == public  # a recipe for every public callback


def test_config_names_resolve_and_default_recipe_is_implied():
    assert _resolve_args(["fit"])[:3] == ["fit", "--config", recipe_path("default")]
    assert _resolve_args(["fit", "--config", "swa-digits"])[2].endswith("recipes/swa-digits.yaml")
    with pytest.raises(ValueError, match="neither a file nor a shipped recipe"):
        _resolve_args(["fit", "--config", "nope"])


SHARDED = [n for n in recipes() if n.startswith("fsdp2")]  # 2 processes: run as a console script below


def test_default_job_is_quiet_and_prints_its_checkpoint_and_the_commands_that_use_it(capfd, caplog):
    caplog.set_level(logging.INFO)  # what Lightning logs reaches the terminal outside pytest
    main(["fit", "--trainer.max_epochs", "1"])
    out, err = capfd.readouterr()
    err += caplog.text
    assert "SmallCNN / DigitsDataModule" in out
    assert "val_acc, EMA average (40 updates)" in out  # 1257 train images / batch 32 = 40 steps
    assert "the model now holds" in out and "EMA average" in out
    assert "epoch 1/1  step 40  " in out and "val_acc " in out  # per-epoch metrics
    for noise in ("GPU available", "TPU available", "Tip:", "Seed set", "does not have many workers"):
        assert noise not in out + err, noise
    (ckpt,) = Path("lightning_logs").glob("version_0/checkpoints/*.ckpt")
    assert f"checkpoint: {ckpt}" in out
    commands = [line.strip() for line in out.split("\nnext:\n")[1].splitlines() if line.strip().startswith("lichtenberg ")]
    assert [c.split()[1] for c in commands] == ["validate", "test", "export"]
    main(shlex.split(commands[0])[1:])  # the printed command runs as printed
    assert "val_acc" in capfd.readouterr().out


def test_verbose_brings_lightnings_banners_back(caplog):
    caplog.set_level(logging.INFO)
    main(["fit", "--trainer.fast_dev_run", "1", *QUIET])
    assert "GPU available" not in caplog.text
    main(["fit", "-v", "--trainer.fast_dev_run", "1", *QUIET])
    assert "GPU available" in caplog.text


def test_print_config_feeds_back_into_fit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "ema-swa-digits", "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    config = yaml.safe_load(printed.read_text())
    kinds = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
    assert kinds == ["lichtenberg.callbacks.EMA", "lichtenberg.callbacks.SWA"]
    main(["fit", "--config", str(printed), "--trainer.fast_dev_run", "2", *QUIET])
    assert "SWA average" in capsys.readouterr().out


def test_a_strategy_from_a_recipe_round_trips_through_print_config(tmp_path, capsys):
    from lichtenberg.cli.main import build
    from lichtenberg.plugins import SparseDDPStrategy

    with pytest.raises(SystemExit):
        main(["fit", "--config", "sparse-ddp-mnist1d", "--trainer.strategy.init_args.bucket_cap_mb", "4",
              "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    for key in ("ckpt_path", "weights_only"):  # build() makes the Trainer as export does, without fit's arguments
        config.pop(key)
    printed = tmp_path / "printed.yaml"
    printed.write_text(yaml.safe_dump(config))
    strategy = build([str(printed)]).trainer.strategy
    assert type(strategy) is SparseDDPStrategy and strategy._ddp_kwargs["bucket_cap_mb"] == 4
    assert strategy._start_method == "popen" and strategy.num_processes == 2


def test_bad_callback_argument_fails_before_training_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lichtenberg.callbacks.EMA", "init_args": {"decay": 1.5}}]}}))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "default", "--config", str(bad), *QUIET])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "lichtenberg: error: EMA decay=1.5 must lie in (0, 1); typical values are 0.999 to 0.9999.", err
    assert len(err) == 2 and "--debug" in err[1]
    assert not (tmp_path / "lightning_logs").exists(), "nothing trained"
    with pytest.raises(ValueError, match=r"decay=1.5 must lie in \(0, 1\)"):  # --debug: the error itself
        main(["fit", "--config", "default", "--config", str(bad), "--debug", *QUIET])


TYPO = {"trainer": {"max_epoch": 3}}
CALLBACK_TYPO = {"trainer": {"callbacks": [{"class_path": "lichtenberg.callbacks.EMA", "init_args": {"decy": 0.5}}]}}
CLASS_TYPO = {"trainer": {"callbacks": [{"class_path": "lichtenberg.callbacks.EMAA"}]}}


@pytest.mark.parametrize("args, expected", [
    (["--config", TYPO], "trainer.max_epoch is not an argument of the trainer (did you mean 'max_epochs'?)"),
    (["--trainer.max_epochz", "3"], "--trainer.max_epochz is not an option (did you mean 'max_epochs'?)"),
    (["--config", CALLBACK_TYPO], "'decy' is not an argument of lichtenberg.callbacks.EMA (did you mean 'decay'?)"),
    (["--config", CLASS_TYPO], "lichtenberg.callbacks.EMAA does not exist (did you mean 'lichtenberg.callbacks.EMA'?)"),
    (["--model.init_args.chanels", "3"], "'chanels' is not an argument of lichtenberg.cli.models.SmallCNN (did you mean 'channels'?)"),
    (["--model.init_args.lr", "abc"], "model.lr: expected float, got 'abc'"),
    (["--model.class_path", "SmallCN"], "(did you mean 'lichtenberg.cli.models.SmallCNN'?)"),
    (["--config", "defualt"], "'defualt' is neither a file nor a shipped recipe (did you mean 'default'?)"),
])
def test_configuration_errors_are_one_line_with_a_suggestion(args, expected, tmp_path, capsys):
    args = [str(_write(tmp_path, a)) if isinstance(a, dict) else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, *QUIET])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("lichtenberg: error: ") and expected in err[0], err


def _write(tmp_path, config: dict):
    path = tmp_path / f"config{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_unknown_command_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        main(["fti"])
    assert "unknown command 'fti' (did you mean 'fit'?)" in capsys.readouterr().err


def test_help_lists_every_command_without_importing_lightning():
    code = ("import sys; from lichtenberg.cli import main; main(['--help']); main(['recipes']); "
            "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'jsonargparse', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("fit", "validate", "test", "predict", "recipes", "export", "merge"):
        assert f"\n  {command} " in out, command
    assert "default " in out and "swa-digits " in out
    assert "imported: []" in out


def test_callbacks_only_yaml_runs_on_the_default_model_and_data(tmp_path, capsys):
    mine = _write(tmp_path, {"trainer": {"callbacks": [{"class_path": "lichtenberg.callbacks.SWA",
                                                        "init_args": {"start": 0.5}}]}})
    resolved = _resolve_args(["fit", "--config", str(mine)])
    assert resolved[1:3] == ["--config", recipe_path("default")] and resolved[4] == str(mine)
    main(["fit", "--config", str(mine), "--trainer.fast_dev_run", "2", *QUIET])
    out = capsys.readouterr().out
    assert "SmallCNN / DigitsDataModule" in out and "SWA average" in out and "EMA average" not in out  # replaced


def test_a_live_progress_bar_in_a_terminal_and_epoch_lines_elsewhere(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from lichtenberg.cli.main import build
    from lichtenberg.cli.runner import EpochLines

    for recipe in recipes():
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        assert isinstance(build([recipe]).trainer.progress_bar_callback, RichProgressBar), recipe
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    trainer = build(["default"]).trainer
    assert trainer.progress_bar_callback is None and any(isinstance(c, EpochLines) for c in trainer.callbacks)


def test_console_script_lists_recipes():
    result = subprocess.run([sys.executable, "-c", "from lichtenberg.cli import main; main(['recipes'])"],
                            capture_output=True, text=True, check=True)
    assert "default" in result.stdout and "swa-digits" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDED)
def test_sharded_recipe_trains_on_two_processes_and_exports_a_plain_model(name, tmp_path):
    # A real 2-process run (Lightning re-launches the console script per rank), a few epochs'
    # worth of steps, a distributed checkpoint, and the plain averaged model from it.
    script = Path(sys.executable).with_name("lichtenberg")  # Lightning re-runs argv per rank: no `python -c`
    cmd = [str(script), "fit", "--config", name,
           "--trainer.max_steps", "40", "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path),
           "--trainer.enable_model_summary", "false"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "lichtenberg fit summary" in run.stdout
    (ckpt,) = (tmp_path / "lightning_logs").glob("version_*/checkpoints/*.ckpt")
    assert ckpt.is_dir(), "a sharded run writes a DCP directory"
    from lichtenberg.core import plain_state_dict

    state = plain_state_dict(ckpt, averaged="EMA")
    assert not any(k.endswith(("_mask", "_ema")) or "_quantizer." in k for k in state)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.3, f"the pruning schedule had begun by step 40: {zeros:.2f} of the weights are zero"


@pytest.mark.slow
def test_sparse_ddp_recipe_trains_on_two_processes_and_sends_a_fraction_of_the_bytes(tmp_path):
    script = Path(sys.executable).with_name("lichtenberg")  # Lightning re-runs argv per rank: no `python -c`
    cmd = [str(script), "fit", "--config", "sparse-ddp-mnist1d", "--trainer.max_steps", "80",
           "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (line,) = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("SparseDDPStrategy:")]
    ratio = float(re.search(r"\(([0-9.]+)x\)", line).group(1))
    assert "80 steps (1 dense)" in line and ratio < 0.15, line  # 90% sparse, RigL's update at step 50 dense
    assert "lichtenberg fit summary" in run.stdout


def test_quiet_also_after_the_standalone_pytorch_lightning_package_is_imported(caplog):
    # Importing pytorch_lightning re-points lightning_utilities' shared rank-zero logger at
    # "pytorch_lightning.utilities.rank_zero": Lightning's banners then came through (seen in the full suite).
    import pytorch_lightning  # noqa: F401

    caplog.set_level(logging.INFO)
    main(["fit", "--trainer.fast_dev_run", "1", *QUIET])
    assert "GPU available" not in caplog.text
