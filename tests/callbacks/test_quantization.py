"""QuantizationAwareTraining through a real Trainer: start/freeze steps, reports, checkpoints, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lichtenberg.callbacks import GradualPruning, QuantizationAwareTraining
from lichtenberg.core.quantization import export_int, quant_modules
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.targets import Targets
from tests.cases import TRAINER as BASE
from tests.cases import TinyData, TinyModel, fit_tiny as fit




class ConvModel(TinyModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(32, 4))


class Modes(Callback):
    """Records, before each training batch, whether the quantizers are on and the first LSQ scale."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        layer = quant_modules(pl_module)["net.0"]
        self.modes.append((trainer.global_step, layer.weight_quantizer.enabled, bool(layer.input_quantizer.initialized)))


def test_training_is_float_until_start_step_then_scales_come_from_observed_data():
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, activation_method="lsq", start_step=10)
    modes = Modes()
    trainer, model = fit([qat, modes])  # QAT first: Modes runs after the mode is set for the step
    for step, enabled, initialised in modes.modes:
        assert enabled == (step >= 10), step
        assert initialised == (step > 10), step  # observed on the first quantized batch
    with pytest.raises(ValueError, match="start_step=1000 is step 1000, after the last"):
        fit([QuantizationAwareTraining(start_step=1000)], max_epochs=1)  # 12 steps: would never start


class FirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}


def test_float_training_before_start_is_bit_identical_to_no_callback():
    plain, late = FirstEpoch(), FirstEpoch()
    fit([plain], max_epochs=2)
    fit([QuantizationAwareTraining(start_step=12), late], max_epochs=2)  # the first epoch's 12 steps are float
    for key, value in late.state.items():
        if key in plain.state:
            assert torch.equal(value, plain.state[key]), key


def test_report_names_quantized_and_skipped_layers_and_conv_is_quantized(caplog):
    with caplog.at_level("INFO"):
        fit([QuantizationAwareTraining()], model=ConvModel(), max_epochs=1)
    assert "2 layers quantized: net.1, net.4" in caplog.text
    assert "QuantConv1d" in caplog.text  # summary table shows the conv layer's fake-quant class


def test_freeze_step_pins_oscillating_weights():
    qat = QuantizationAwareTraining(weight_bits=2, weight_method="stat", activation_bits=None, freeze_step=0.5)
    trainer, model = fit([qat], max_epochs=4, model=TinyModel(lr=0.5))
    stats = qat.statistics()
    assert stats["frozen"] > 0
    layer = quant_modules(model)["net.0"]
    frozen = layer.weight_quantizer.frozen
    # a frozen weight keeps its frozen level in the forward, whatever its latent value says
    step = layer.weight_quantizer.step_scale(layer.weight).reshape(-1, 1)
    used = (layer.quantized_weight().detach() / step - 0.5).round()
    assert torch.equal(used[frozen], layer.weight_quantizer.level[frozen].float())


def test_checkpoint_loads_into_a_fresh_module_with_the_callback_and_exports(tmp_path):
    qat = QuantizationAwareTraining(weight_bits=4, activation_method="lsq+")
    trainer, model = fit([qat])
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    fresh = TinyModel()
    fresh_qat = QuantizationAwareTraining(weight_bits=4, activation_method="lsq+")
    L.Trainer(callbacks=[fresh_qat], **BASE).validate(fresh, datamodule=TinyData(), ckpt_path=path, verbose=False)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(5, 8)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    ints = export_int(fresh)
    assert set(ints) == {"net.0", "net.3"} and all(e["weight"].abs().max() <= 8 for e in ints.values())


def test_pruned_weights_quantize_to_exactly_zero_on_a_grid_without_zero_level():
    # "stat" has no zero level ((k + 1/2) steps): the mask must still give exact zeros.
    gp = GradualPruning(sparsity=0.5, schedule=SparsitySchedule(start=2, end=20, every_n_steps=2))
    qat = QuantizationAwareTraining(weight_bits=2, weight_method="stat")
    _, model = fit([gp, qat])
    for name, layer in quant_modules(model).items():
        w = layer.quantized_weight()
        assert (w[~layer.weight_mask] == 0).all() and (w[layer.weight_mask] != 0).all(), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 9}, "weight_bits=9 must be an int in 1..8"),
        ({"weight_bits": 0}, "weight_bits=0"),
        ({"activation_bits": 1}, "activation_bits=1 must be an int in 2..8"),
        ({"weight_bits": None, "activation_bits": None}, "nothing to quantize"),
        ({"weight_bits": "ternary", "weight_method": "lsq"}, "does not apply to weight_bits='ternary'"),
        ({"weight_bits": 4, "weight_method": "reste"}, "does not apply to weight_bits=4"),
        ({"activation_method": "max"}, "activation_method='max'"),
        ({"granularity": "group:0"}, "granularity='group:0'"),
        ({"start_step": 10, "freeze_step": 5}, "freeze_step=5 must come after"),
    ],
)
def test_bad_input_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_bad_input_raises_before_training():
    model = TinyModel()
    before = model.net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="not divisible by the group size 16"):
        fit([QuantizationAwareTraining(granularity="group:16")], model=model)  # net.0 has 8 inputs
    emb_only = QuantizationAwareTraining(targets=Targets(types=["Embedding"]))

    class EmbModel(TinyModel):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 4)

    with pytest.raises(ValueError, match="all Embedding layers"):
        fit([emb_only], model=EmbModel())
    assert torch.equal(model.net[0].weight, before)
    assert QuantizationAwareTraining(weight_bits=1).weight_bits == "binary"
