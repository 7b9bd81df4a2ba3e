"""Other people's models: Hugging Face GPT-2 and BERT (built from configs, no downloads), a
conv net with BatchNorm and depthwise convolutions, and our own tied LM, under every callback.

What must hold on each: exact target sparsity counted over every Linear-like weight (GPT-2's
``Conv1D`` included), pruned slots zero after fit and during every validation under every
alias of a tied weight, tied tensors still one object, every intended layer quantized.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lichtenberg.callbacks import (
    EMA,
    SWA,
    Soup,
    DataPruning,
    DynamicSparseTraining,
    GradualPruning,
    QuantizationAwareTraining,
    SampleReweighting,
)
from lichtenberg.core.quantization import dequantize, export_int, quant_modules
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import TRAINER
from tests.zoo import BATCH, N, Wrapped, data, expected_quantized, linear_like, tied

EPOCHS = 3  # 24 steps
SCHEDULE = SparsitySchedule(kind="cubic", start=2, end=14, every_n_steps=4)


class ZerosDuringValidation(Callback):
    """Pruned slots must be zero whenever validation runs (averages swapped in), under every alias."""

    def __init__(self) -> None:
        self.checked = 0

    def on_validation_batch_start(self, trainer, pl_module, *args):
        for name, buffer in pl_module.named_buffers():
            if name.endswith("_mask") and buffer.dtype == torch.bool:
                weight = pl_module.get_parameter(name[: -len("_mask")])
                assert (weight[~buffer] == 0).all(), f"{name}: pruned slots non-zero during validation"
                self.checked += 1


def fit(kind: str, callbacks: list) -> tuple[L.Trainer, Wrapped]:
    L.seed_everything(0)
    model = Wrapped(kind)
    trainer = L.Trainer(callbacks=callbacks, max_epochs=EPOCHS, **{**TRAINER, "num_sanity_val_steps": 0})
    trainer.fit(model, train_dataloaders=data(kind), val_dataloaders=data(kind))
    return trainer, model


def assert_sparse(model: Wrapped, sparsity: float, slack: int = 0) -> None:
    """Global sparsity over every Linear-like weight, counted from the masks: exact (global
    allocations) or within ``slack`` weights (per-layer rounding, e.g. ERK); pruned slots are zero
    under every alias of a tied weight."""
    weights = linear_like(model)
    masks = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        mask = model.get_submodule(owner)._buffers.get(f"{leaf}_mask")
        if id(param) in weights:
            assert mask is not None, f"{name} is Linear-like but has no mask"
            assert masks.setdefault(id(param), mask) is mask, f"{name}: another mask than its tied alias"
            assert (param[~mask] == 0).all(), f"{name}: pruned slots non-zero"
    total = sum(p.numel() for _, p in weights.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - round((1 - sparsity) * total)) <= slack, (kept, total)


def assert_tied(model: Wrapped) -> None:
    for a, b in tied(model):
        assert a is b, "tied weights were split"


# -- every callback on every model ------------------------------------------------------------------
CALLBACKS = {
    "GradualPruning": lambda: GradualPruning(sparsity=0.8, schedule=SCHEDULE),
    "DynamicSparseTraining": lambda: DynamicSparseTraining(
        sparsity=0.8, method="rigl", schedule=SparsitySchedule(start=0, end=0.75, every_n_steps=4)),
    "QuantizationAwareTraining": lambda: QuantizationAwareTraining(weight_bits=8, activation_bits=8),
    "EMA": lambda: EMA(decay=0.9),
    "SWA": lambda: SWA(start=0.5),
    "Soup": lambda: Soup(keep=2, start=0.0),
    "SampleReweighting": lambda: SampleReweighting(warmup_steps=4),
    "DataPruning": lambda: DataPruning(ratio=0.5, anneal=0.0),
}


@pytest.mark.parametrize("kind", ["gpt2", "bert", "conv"])
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_every_callback_on_other_peoples_models(kind, name):
    cb, zeros = CALLBACKS[name](), ZerosDuringValidation()
    trainer, model = fit(kind, [cb, zeros])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_tied(model)
    if name in ("GradualPruning", "DynamicSparseTraining"):  # DST: ERK rounds each layer's count
        assert_sparse(model, 0.8, slack=0 if name == "GradualPruning" else len(linear_like(model)))
        assert zeros.checked > 0
    if name == "QuantizationAwareTraining":
        layers = quant_modules(model)
        assert set(layers) == expected_quantized(model)  # Conv1D and tied embeddings included
        assert all(m.weight_quantizer.enabled for m in layers.values())
    if name in ("EMA", "SWA"):
        assert cb.raw_weights is not None and cb.averaged.num_updates > 0
    if name == "Soup":  # the module holds the mean of the last two epochs' weights
        assert cb.raw_weights is not None and len(cb.state_dict()["slots"]) == 2
    if name == "SampleReweighting":
        assert cb.state_dict()["batches_weighted"] > 0
    if name == "DataPruning":
        assert cb.state_dict()["forwarded"] < N * EPOCHS


@pytest.mark.parametrize("kind", ["gpt2", "bert", "conv"])
def test_pruning_qat_and_ema_together(kind):
    gp, qat, ema, zeros = GradualPruning(sparsity=0.8, schedule=SCHEDULE), QuantizationAwareTraining(), EMA(decay=0.9), \
        ZerosDuringValidation()
    trainer, model = fit(kind, [gp, qat, ema, zeros])
    assert_tied(model)
    assert_sparse(model, 0.8)  # the EMA weights the module holds now stay on the mask
    assert zeros.checked > 0
    for name, layer in quant_modules(model).items():  # mask first, then quantize: pruned weights are exactly 0
        mask = getattr(layer, "weight_mask", None)
        assert mask is not None or isinstance(layer, nn.Embedding), name
        if mask is not None:
            assert (layer.quantized_weight()[~mask] == 0).all(), name


# -- finding 1: tied weights and averaging ------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ["GradualPruning", "DynamicSparseTraining"])
@pytest.mark.parametrize("averaging", ["EMA", "SWA"])
def test_averages_of_a_tied_sparse_weight_stay_on_its_mask(sparsity, averaging):
    # Before: the mask sat on lm_head.weight, the average was keyed by transformer.wte.weight, and
    # writing the average back un-pruned the tied tensor (100% of its pruned slots with EMA).
    zeros = ZerosDuringValidation()
    _, model = fit("gpt2", [CALLBACKS[sparsity](), CALLBACKS[averaging](), zeros])
    head, wte = tied(model)[0]
    mask = model.net.lm_head.weight_mask
    assert model.net.transformer.wte.weight_mask is mask  # one mask, under every alias
    assert (wte[~mask] == 0).all() and int((~mask).sum()) > 0
    assert zeros.checked > 0


def test_qat_embedding_lookup_of_a_pruned_tied_weight_is_masked():
    # Before: the logits path (lm_head) was masked, the embedding lookup (wte) was not.
    _, model = fit("gpt2", [GradualPruning(sparsity=0.8, schedule=SCHEDULE), QuantizationAwareTraining()])
    wte, head = model.net.transformer.wte, model.net.lm_head
    assert wte.weight_quantizer is head.weight_quantizer  # one quantizer for one tensor
    assert (wte.quantized_weight()[~wte.weight_mask] == 0).all()
    ids = torch.arange(64).view(4, 16)
    looked_up = wte(ids).detach()
    assert (looked_up.reshape(-1, 32)[~wte.weight_mask[ids.reshape(-1)]] == 0).all()


@pytest.mark.parametrize("sparsity", ["GradualPruning", "DynamicSparseTraining"])
@pytest.mark.parametrize("averaging", ["EMA", "SWA"])
def test_our_tied_lm_with_sparsity_qat_and_averaging(sparsity, averaging):
    from lichtenberg.cli.models import TinyTransformerLM

    class LM(TinyTransformerLM):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.per_sample_loss(batch).mean())

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (N, 12), generator=g)
    loader = DataLoader(TensorDataset(x, torch.roll(x, -1, dims=1)), batch_size=BATCH)
    L.seed_everything(0)
    model, zeros = LM(vocab_size=32, context_length=12, d_model=16, n_heads=2), ZerosDuringValidation()
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8)
    trainer = L.Trainer(callbacks=[CALLBACKS[sparsity](), qat, CALLBACKS[averaging](), zeros],
                        max_epochs=EPOCHS, **{**TRAINER, "num_sanity_val_steps": 0})
    trainer.fit(model, loader, loader)
    assert model.head.weight is model.tok_emb.weight
    mask = model.head.weight_mask
    assert model.tok_emb.weight_mask is mask and int((~mask).sum()) > 0
    assert (model.tok_emb.weight[~mask] == 0).all() and zeros.checked > 0
    assert model.tok_emb.weight_quantizer is model.head.weight_quantizer  # one quantizer for the tied tensor
    assert {"tok_emb", "head"} <= set(quant_modules(model))
    assert (model.tok_emb.quantized_weight()[~mask] == 0).all()


# -- finding 2: Hugging Face Conv1D, weight [in, out] --------------------------------------------------
def conv1d_layers(model: Wrapped) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ in ("Conv1D", "QuantConv1D")}


def test_gpt2_conv1d_is_pruned_by_default_not_only_the_tied_head():
    # Before: Conv1D was skipped (INFO line only) and 80% of the token embedding was pruned instead.
    gp = GradualPruning(sparsity=0.8, schedule=SCHEDULE)
    _, model = fit("gpt2", [gp])
    conv1d = conv1d_layers(model)
    assert len(conv1d) == 8 and all(f"{n}.weight" in gp.engine.params for n in conv1d)
    density = {n: float((m.weight != 0).float().mean()) for n, m in conv1d.items()}
    assert all(d < 0.9 for d in density.values()), density  # every attention / MLP matmul is sparse


@pytest.mark.parametrize("score", ["magnitude", "wanda", "gradient"])
def test_gpt2_conv1d_nm_groups_run_along_its_input_axis(score):
    # Before: 2:4 grouped along the output axis of Conv1D ([in, out]) and wanda crashed on the shape.
    _, model = fit("gpt2", [GradualPruning(sparsity=0.5, pattern="2:4", score=score, schedule=SCHEDULE)])
    for name, module in conv1d_layers(model).items():
        w = module.weight  # [in, out]: groups of 4 consecutive inputs for each output
        groups = (w.t() != 0).reshape(w.shape[1], -1, 4).sum(-1)
        assert (groups <= 2).all() and int((groups == 2).sum()) > 0.9 * groups.numel(), name


def test_gpt2_conv1d_sr_ste_keeps_2_of_4_inputs():
    gp = GradualPruning(sparsity=0.5, pattern="2:4", sr_ste=2e-4, schedule=SCHEDULE)
    _, model = fit("gpt2", [gp])
    for name, module in conv1d_layers(model).items():
        mask = module.weight_mask.t()  # [out, in]
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_gpt2_conv1d_quantized_per_output_channel_with_exact_export():
    # Before: QAT refused Conv1D.
    _, model = fit("gpt2", [QuantizationAwareTraining(weight_bits=4, activation_bits=8)])
    layers = conv1d_layers(model)
    assert len(layers) == 8 and all(type(m).__name__ == "QuantConv1D" for m in layers.values())
    ints = export_int(model)
    for name, layer in layers.items():
        q = layer.quantized_weight().detach()
        assert torch.allclose(dequantize(ints[name]), q, atol=1e-6), name
        per_output = q.t().reshape(q.shape[1], -1)  # one scale per output feature: <= 16 levels per column
        assert all(row.unique().numel() <= 16 for row in per_output), name
        x = torch.randn(2, 5, layer.weight.shape[0])
        layer.eval()
        ref = x @ q + layer.bias  # Hugging Face's forward with the fake-quantized weight
        xq = layer.input_quantizer(x)
        torch.testing.assert_close(layer(x), xq @ q + layer.bias)
        assert ref.shape == layer(x).shape


def test_gpt2_int8_cpu_model_runs_its_conv1d_as_linear():
    from lichtenberg.core.quantization import to_int8_cpu_

    _, model = fit("gpt2", [QuantizationAwareTraining(weight_bits=8, activation_bits=8)])
    model.eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    fake = model(ids).detach()
    to_int8_cpu_(model)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))}
    assert kinds == {"Linear"} or kinds == {"DynamicQuantizedLinear"}, kinds
    real = model(ids)
    assert (real.argmax(-1) == fake.argmax(-1)).float().mean() > 0.9  # int8 kernels vs fake-quant: same predictions


def test_gpt2_dst_keeps_exact_counts_on_conv1d_for_srigl_fan_in():
    dst = DynamicSparseTraining(sparsity=0.8, method="srigl", schedule=SparsitySchedule(start=0, end=0.75, every_n_steps=4))
    _, model = fit("gpt2", [dst])
    for name, module in conv1d_layers(model).items():
        fan_in = module.weight_mask.t().reshape(module.weight.shape[1], -1).sum(1)  # per output feature
        alive = fan_in[fan_in > 0]
        assert alive.unique().numel() == 1, name  # constant fan-in along the inputs


# -- what is left out is a warning, not an INFO line ---------------------------------------------------
class TorchEncoder(L.LightningModule):
    """torch's own TransformerEncoderLayer (torchvision's ViT blocks): MultiheadAttention keeps its
    input projection as a raw ``in_proj_weight`` and calls its ``out_proj`` weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        self.head = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_encoder(callbacks):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, 16, generator=g)
    L.seed_everything(0)
    model = TorchEncoder()
    L.Trainer(callbacks=callbacks, max_epochs=2, **TRAINER).fit(model, DataLoader(TensorDataset(x, x[:, 0, :4].argmax(1)),
                                                                                    batch_size=BATCH))
    return model


def test_weights_of_unknown_layer_types_are_warned_and_subclasses_are_pruned():
    gp = GradualPruning(sparsity=0.5, schedule=SparsitySchedule(start=0, end=8, every_n_steps=4))
    with pytest.warns(UserWarning, match=r"encoder.self_attn.in_proj_weight \(MultiheadAttention\) is a weight of a layer "
                                         "type lichtenberg does not know"):
        model = fit_encoder([gp])
    assert "encoder.self_attn.out_proj.weight" in gp.engine.params  # NonDynamicallyQuantizableLinear is a Linear
    assert float((model.encoder.self_attn.out_proj.weight == 0).float().mean()) > 0.2


def test_qat_warns_about_layers_it_cannot_swap():
    with pytest.warns(UserWarning, match=r"encoder.self_attn.out_proj is not quantized: .*subclass keeps its own forward"):
        model = fit_encoder([QuantizationAwareTraining()])
    assert {"encoder.linear1", "encoder.linear2", "head"} <= set(quant_modules(model))


def test_a_target_tied_to_a_layer_outside_the_targets_is_warned():
    with pytest.warns(UserWarning, match=r"net.lm_head.weight is the same tensor as net.transformer.wte.weight"):
        fit("gpt2", [GradualPruning(sparsity=0.5, schedule=SCHEDULE)])
