"""`lichtenberg export`: every format from one tiny run's checkpoint (and two derived from it), and
one-line refusals of config / checkpoint / format mismatches before anything is written."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import yaml

from lichtenberg.cli.export import export_main
from lichtenberg.cli.main import main
from lichtenberg.cli.models import SmallCNN
from lichtenberg.core import decompress_state_dict, plain_state_dict
from lichtenberg.core.quantization import dequantize

PRUNING = {"class_path": "lichtenberg.callbacks.GradualPruning",
           "init_args": {"sparsity": 0.75, "schedule": {"kind": "cubic", "start": 0, "end": 4, "every_n_steps": 2}}}
QAT = {"class_path": "lichtenberg.callbacks.QuantizationAwareTraining",
       "init_args": {"weight_bits": 4, "activation_bits": 8, "start_step": 2}}
EMA = {"class_path": "lichtenberg.callbacks.EMA", "init_args": {"decay": 0.9}}
MODEL = {"channels": 4, "lr": 0.05, "optimizer": "sgd"}


def _config(path, callbacks, **model):
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 12, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": callbacks},
        "model": {"class_path": "lichtenberg.cli.models.SmallCNN", "init_args": {**MODEL, **model}},
        "data": {"class_path": "lichtenberg.cli.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 12-step fit with pruning, QAT and EMA; a QAT-only and a pruning-only checkpoint cut from it."""
    tmp = tmp_path_factory.mktemp("export")
    both = _config(tmp / "both.yaml", [PRUNING, QAT, EMA])
    main(["fit", "--config", both, "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp),
          "--trainer.logger", "false"])
    (ckpt,) = tmp.glob("**/*.ckpt")
    full = torch.load(ckpt, weights_only=False)
    runs = {"both": (both, str(ckpt))}
    for name, callbacks, drop in (("qat", [QAT, EMA], ("_mask", "GradualPruning")),
                                  ("pruning", [PRUNING, EMA], ("_quantizer.", "QuantizationAwareTraining"))):
        cut = dict(full, state_dict={k: v for k, v in full["state_dict"].items() if drop[0] not in k},
                   callbacks={k: v for k, v in full["callbacks"].items() if not k.startswith(drop[1])})
        torch.save(cut, tmp / f"{name}.ckpt")
        runs[name] = (_config(tmp / f"{name}.yaml", callbacks), str(tmp / f"{name}.ckpt"))
    runs["tmp"] = tmp
    return runs


def _export(run, name, out, *extra):
    config, ckpt = run[name]
    return export_main(["--config", config, "--ckpt_path", ckpt, "--out", str(out), *extra])


def _plain_model(state):
    model = SmallCNN(**MODEL)
    model.load_state_dict(state, strict=True)  # the plain module, without lichtenberg
    return model.eval()


def test_int_and_int8_formats_write_integer_weights_and_an_int8_model(run, tmp_path):
    written = _export(run, "qat", tmp_path / "m.int.pt")  # --format int is the default
    saved = torch.load(tmp_path / "m.int.pt", weights_only=False)
    assert written["format"] == "int" and set(saved["quantized"]) == {"features.0", "features.3", "classifier"}
    for entry in saved["quantized"].values():
        assert entry["weight"].dtype == torch.int8 and entry["weight"].abs().max() <= 8  # 4-bit levels
        assert dequantize(entry).shape == entry["weight"].shape
    assert not any("quantizer" in k or k.endswith("_mask") for k in saved["float"])
    for flag in (["--int8"], ["--format", "int8"]):  # --int8 is kept as an alias
        _export(run, "qat", tmp_path / "m.int8.pt", *flag)
        int8 = torch.load(tmp_path / "m.int8.pt", weights_only=False)
        assert "DynamicQuantizedLinear" in repr(int8) and int8(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_compressed_qat_export_holds_the_exported_integers_exactly(run, tmp_path):
    _export(run, "qat", tmp_path / "m.int.pt")
    written = _export(run, "qat", tmp_path / "m.safetensors", "--format", "compressed")
    ints = torch.load(tmp_path / "m.int.pt", weights_only=False)["quantized"]
    state = decompress_state_dict(tmp_path / "m.safetensors")
    for name, entry in ints.items():
        assert torch.equal(state[f"{name}.weight"], dequantize(entry))
    plain = plain_state_dict(run["qat"][1])
    assert all(torch.equal(state[k], v) for k, v in plain.items() if not any(k == f"{n}.weight" for n in ints))
    _plain_model(state)
    assert written["bytes"] == (tmp_path / "m.safetensors").stat().st_size and written["ratio"] < 1


def test_compressed_pruning_export_is_bit_exact_and_smaller(run, tmp_path):
    written = _export(run, "pruning", tmp_path / "p.safetensors", "--format", "compressed")
    state, plain = decompress_state_dict(tmp_path / "p.safetensors"), plain_state_dict(run["pruning"][1])
    assert list(state) == list(plain) and all(torch.equal(state[k], plain[k]) for k in plain)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(_plain_model(state)(x), _plain_model(plain)(x))
    from safetensors import safe_open

    with safe_open(tmp_path / "p.safetensors", "pt") as f:
        assert {"classifier.weight.bitmask", "classifier.weight.compressed", "classifier.weight.shape"} <= set(f.keys())
    assert written["ratio"] < 0.8  # 75% of the weights pruned; on a 1,700-parameter model the header is ~2 KiB


def test_pruning_qat_and_ema_export_the_averaged_quantized_sparse_model(run, tmp_path):
    from lichtenberg.callbacks import QuantizationAwareTraining
    from lichtenberg.cli.main import build
    from lichtenberg.core.quantization import quant_modules

    _export(run, "both", tmp_path / "b.safetensors", "--format", "compressed", "--averaged", "EMA")
    state = decompress_state_dict(tmp_path / "b.safetensors")
    # what EMA evaluates: the checkpoint's model with the averages (weights, BatchNorm, LSQ scales) swapped in
    checkpoint = torch.load(run["both"][1], weights_only=False)
    (averages,) = [v["tensors"] for k, v in checkpoint["callbacks"].items() if k.startswith("EMA")]
    cli = build([run["both"][0]])
    (qat,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining)]
    qat.setup(cli.trainer, cli.model, "validate")
    cli.model.configure_model()
    for key, mask in checkpoint["state_dict"].items():
        if key.endswith("_mask"):
            owner, _, leaf = key.rpartition(".")
            cli.model.get_submodule(owner).register_buffer(leaf, mask)
    cli.model.load_state_dict({**checkpoint["state_dict"], **averages})
    for name, layer in quant_modules(cli.model).items():
        layer.weight_quantizer.enabled = True
        assert torch.equal(state[f"{name}.weight"], layer.quantized_weight())
        assert bool((state[f"{name}.weight"][~layer.weight_mask] == 0).all())  # still on the masks
    assert torch.equal(state["features.1.running_var"], averages["features.1.running_var"])
    _plain_model(state)


def test_masks_kept_in_callback_state_make_permanent_export_alike(run, tmp_path):
    # GradualPruning(make_permanent=True) writes checkpoints without mask buffers, the masks in its state
    checkpoint = torch.load(run["both"][1], weights_only=False)
    masks = {k[: -len("_mask")]: v for k, v in checkpoint["state_dict"].items() if k.endswith("_mask")}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.endswith("_mask")}
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GradualPruning")]
    checkpoint["callbacks"][key] = {**checkpoint["callbacks"][key], "masks": masks}
    torch.save(checkpoint, tmp_path / "permanent.ckpt")
    _export({"p": (run["both"][0], str(tmp_path / "permanent.ckpt"))}, "p", tmp_path / "p.safetensors", "--format",
            "compressed")
    _export(run, "both", tmp_path / "b.safetensors", "--format", "compressed")
    a, b = decompress_state_dict(tmp_path / "p.safetensors"), decompress_state_dict(tmp_path / "b.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_format_writes_the_plain_state_dict(run, tmp_path):
    _export(run, "both", tmp_path / "p.pt", "--format", "plain", "--averaged", "EMA")
    saved, expected = torch.load(tmp_path / "p.pt"), plain_state_dict(run["both"][1], averaged="EMA")
    assert list(saved) == list(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)
    _plain_model(saved)


def test_mismatches_are_one_line_errors_and_write_nothing(run, tmp_path):
    tmp = run["tmp"]
    early = torch.load(run["qat"][1], weights_only=False)  # as if written before QAT's start step
    early["state_dict"] = {k: (torch.tensor(False) if k.endswith("weight_quantizer.initialized") else v)
                           for k, v in early["state_dict"].items()}
    torch.save(early, tmp_path / "early.ckpt")
    other_bits = _config(tmp_path / "w8.yaml", [{**QAT, "init_args": {**QAT["init_args"], "weight_bits": 8}}, EMA])
    wider = _config(tmp_path / "wide.yaml", [PRUNING, EMA], channels=8)
    cases = [
        (run["pruning"], ["--format", "int"], "--format int needs a QAT run"),
        (run["pruning"], ["--int8"], "--format int8 needs a QAT run"),
        ((run["qat"][0], run["pruning"][1]), ["--format", "compressed"], "holds no quantizer state"),
        ((run["pruning"][0], run["qat"][1]), ["--format", "compressed"], "attaches none"),
        ((run["qat"][0], str(tmp_path / "early.ckpt")), ["--format", "compressed"], "before quantization started"),
        ((other_bits, run["qat"][1]), ["--format", "int"], "weight_bits: 4 -> 8"),
        ((wider, run["pruning"][1]), ["--format", "plain"], "does not fit the model"),
        (run["pruning"], ["--format", "plain", "--averaged", "SWA"], "SWA"),
        (run["qat"], ["--int8", "--format", "compressed"], "two formats"),
        (run["qat"], ["--format", "gzip"], "invalid choice"),
        ((run["qat"][0], str(tmp / "missing.ckpt")), [], "no such file"),
    ]
    for (config, ckpt), extra, match in cases:
        out = tmp_path / "never" / "out.bin"
        with pytest.raises(ValueError, match=match) as err:
            export_main(["--config", config, "--ckpt_path", ckpt, "--out", str(out), *extra])
        assert "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "never").exists(), extra


def test_export_prints_one_line_and_no_warnings(run, tmp_path, capsys, caplog):
    config, ckpt = run["pruning"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        main(["export", "--config", config, "--ckpt_path", ckpt, "--out", str(tmp_path / "m.pt"), "--format", "plain"])
    printed = capsys.readouterr()
    assert not [str(w.message) for w in caught if "args and command line" in str(w.message)]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "export" not in r.name]
    (line,) = printed.out.strip().splitlines()
    assert line.startswith("lichtenberg export: wrote") and "x the dense fp32 state dict" in line
    assert "GPU available" not in printed.out + printed.err
