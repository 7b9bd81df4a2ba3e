"""Quantizers and the QAT layer swap: grids, estimators, LSQ's gradient, tying, export, int8 CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lichtenberg.core.quantization import (
    ActivationQuantizer,
    WeightQuantizer,
    binarize,
    dequantize,
    export_int,
    fake_quantize,
    grad_scale,
    grouped,
    lsq_quantize,
    prepare_,
    quant_modules,
    reste_power,
    to_int8_cpu_,
    unprepare_,
)


def _enabled(q):
    q.enabled = True
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["minmax", "lsq", "stat"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_b_bit_weights_use_at_most_2_to_the_b_levels_per_group_all_on_the_grid(bits, method, granularity):
    torch.manual_seed(bits)
    w = torch.randn(6, 32) * torch.linspace(0.1, 3, 6)[:, None]
    wq = _enabled(WeightQuantizer(w.shape, bits, method, granularity, group_size=8))
    out = wq(w).detach()
    step = wq.step_scale(w)  # [rows, groups, 1]
    g = grouped(out, granularity, 8)
    for row_q in g.reshape(-1, g.shape[-1]):
        assert row_q.unique().numel() <= 2**bits
    units = g / step - (0.5 if method == "stat" else 0.0)
    assert torch.allclose(units, units.round(), atol=1e-4), "a value off the integer grid"
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert units.round().min() >= lo and units.round().max() <= hi


def test_ste_gradient_is_one_inside_the_clip_range_and_zero_outside():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.25), torch.tensor(0.0), -4, 3)  # range [-1.0, 0.75]
    y.sum().backward()
    inside = (x >= -1.0) & (x <= 0.75)
    assert torch.equal(x.grad, inside.float())


def test_lsq_step_gradient_matches_the_analytic_formula_and_finite_differences():
    torch.manual_seed(0)
    s = 0.31
    # levels -6..5 (some beyond the 3-bit range [-4, 3]) plus offsets away from rounding boundaries
    w = (torch.randint(-6, 6, (1, 200)) + (torch.rand(1, 200) - 0.5) * 0.8) * s
    wq = _enabled(WeightQuantizer(w.shape, 3, "lsq", "tensor"))
    wq(w)  # initialises the scale
    with torch.no_grad():
        wq.scale.fill_(s)
    v = w / s
    assert ((v - v.floor() - 0.5).abs() > 0.02).all(), "keep away from rounding boundaries"
    out = wq(w)
    out.sum().backward()
    qmin, qmax = -4, 3
    inside = (v >= qmin) & (v <= qmax)
    analytic = torch.where(inside, v.round() - v, v.clamp(qmin, qmax)).sum()
    g = 1.0 / (200 * qmax) ** 0.5  # LSQ's gradient scale
    assert torch.allclose(wq.scale.grad.sum(), analytic * g, rtol=1e-5)
    # Finite differences of the forward in s see the rounded levels only (the true derivative);
    # LSQ's estimator adds -v inside the range, which is the STE's contribution.
    h = 1e-4
    with torch.no_grad():
        f = [wq(w).sum().item() for wq.scale.data in (torch.full((1, 1, 1), s + h), torch.full((1, 1, 1), s - h))]
    fd = (f[0] - f[1]) / (2 * h)
    levels = v.round().clamp(qmin, qmax).sum().item()
    assert abs(fd - levels) < 1e-2 * max(1.0, abs(levels))
    assert torch.allclose(torch.tensor(fd) - v[inside].sum(), analytic, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("spread", [3.0, 0.5], ids=["some-clip", "none-clip"])
@pytest.mark.parametrize("scale_shape", [(), (1, 1, 1), (6, 1, 1), (6, 4, 1)])
def test_fused_lsq_matches_the_composed_estimator_values_and_gradients(scale_shape, spread):
    """The one-node LSQ (the fast path) against fake_quantize + grad_scale, which autograd
    differentiates: same outputs, same d/dx (clip mask), same d/ds (LSQ's, scaled)."""
    torch.manual_seed(1)
    x = (torch.randn(6, 4, 8) * spread).requires_grad_()  # 3.0: some values beyond the 3-bit range
    s = (torch.rand(scale_shape) * 0.5 + 0.5).requires_grad_()
    upstream = torch.randn(6, 4, 8)
    factor = 0.37
    lsq_quantize(x, s, -4, 3, factor).backward(upstream)
    fused = (x.grad.clone(), s.grad.clone())
    x.grad = s.grad = None
    composed = fake_quantize(x, grad_scale(s, factor), torch.zeros(()), -4, 3)
    composed.backward(upstream)
    assert torch.equal(lsq_quantize(x, s, -4, 3).detach(), composed.detach())
    assert torch.allclose(fused[0], x.grad)  # composed: grad * s / s
    v = (x / s).detach()
    outside = (v < -4) | (v > 3)
    assert outside.any() == (spread > 1) and not outside.all()
    assert torch.equal(fused[0] == 0, outside)
    assert torch.equal(fused[0][~outside], upstream[~outside])
    assert fused[1].shape == s.shape
    assert torch.allclose(fused[1], s.grad, rtol=1e-5, atol=1e-6)


def test_dynamic_activations_and_minmax_weights_pass_the_gradient_unchanged():
    """Their grids cover the input by construction, so the STE's clip mask is all ones."""
    torch.manual_seed(0)
    x = torch.randn(5, 64, requires_grad=True)
    upstream = torch.randn(5, 64)
    _enabled(ActivationQuantizer(4, "dynamic"))(x).backward(upstream)
    assert torch.equal(x.grad, upstream)
    w = torch.randn(8, 16, requires_grad=True)
    _enabled(WeightQuantizer(w.shape, 4, "minmax"))(w).backward(upstream[:, :16].repeat(2, 1)[:8])
    assert torch.equal(w.grad, upstream[:, :16].repeat(2, 1)[:8])


def test_ternary_weights_are_minus_s_zero_or_s_and_binary_weights_plus_minus_s():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    t = _enabled(WeightQuantizer(w.shape, "ternary", "ternary"))(w).detach()
    s = w.abs().mean(1, keepdim=True)
    assert torch.all((t == 0) | torch.isclose(t, s) | torch.isclose(t, -s))
    assert (t == 0).any() and (t > 0).any() and (t < 0).any()
    b = _enabled(WeightQuantizer(w.shape, "binary", "binary"))(w).detach()
    assert torch.all(torch.isclose(b.abs(), s.expand_as(b)))


def test_reste_backward_is_the_clipped_ste_at_o_1_and_a_power_law_later():
    x = torch.tensor([-2.0, -1.0, -0.05, 0.05, 0.5, 1.4, 1.6])
    assert torch.equal(reste_power(x, 1.0, 1.5), torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))
    d = reste_power(x, 3.0, 1.5)
    assert torch.isclose(d[4], torch.tensor(0.5 ** (-2 / 3) / 3))  # (1/o)|x|^((1-o)/o)
    assert d[2] == d[3] == 0.1 ** (1 / 3) / 0.1  # secant below the knee: no singularity at 0
    w = torch.tensor([0.5, -0.2], requires_grad=True)
    binarize(w, torch.tensor(1.0), o=3.0).sum().backward()
    assert torch.allclose(w.grad, reste_power(w.detach(), 3.0, 1.5))


def test_activation_quantizers_levels_and_pact_clip_gradient():
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    dyn = _enabled(ActivationQuantizer(4, "dynamic", per_token=True))(x)
    assert all(r.unique().numel() <= 16 for r in dyn)
    pact = _enabled(ActivationQuantizer(4, "pact"))
    relu = x.relu()
    pact(relu)  # initialises alpha to the max, unsigned
    with torch.no_grad():
        pact.scale.fill_(1.0)
    pact(relu).sum().backward()
    assert pact.scale.grad == (relu > 1.0).sum()  # d clip / d alpha = 1 where x >= alpha
    for method in ("lsq", "lsq+"):
        q = _enabled(ActivationQuantizer(3, method))
        assert q(x).detach().unique().numel() <= 8


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(h))


def _prepare(model, bits=8, method="minmax", act=8):
    modules = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)}
    skipped = prepare_(modules, lambda m, kind: _enabled(WeightQuantizer(m.weight.shape, bits, method)),
                       lambda m: _enabled(ActivationQuantizer(act, per_token=isinstance(m, nn.Linear))))
    return skipped


def test_tied_embedding_and_head_stay_one_tensor_after_prepare_and_after_convert():
    model = TiedLM()
    weight = model.emb.weight
    _prepare(model)
    assert model.head.weight is model.emb.weight is weight
    assert model.head.weight_quantizer is model.emb.weight_quantizer  # one grid for the tied weight
    assert sum(p is weight for p in model.parameters()) == 1
    assert type(model.conv).__name__ == "QuantConv1d"  # conv layers are quantized, not skipped
    model(torch.randint(0, 20, (2, 7))).sum().backward()
    unprepare_(model, fold=True)
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight is weight
    assert not hasattr(model.head, "weight_quantizer")


def test_a_subclass_with_its_own_forward_is_reported_not_swapped():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(4, 4), nn.Linear(4, 2))
    skipped = prepare_({"0": model[0], "1": model[1]}, lambda m, kind: WeightQuantizer(m.weight.shape, 8, "minmax"),
                       lambda m: None)
    assert "0" in skipped and "subclass keeps its own forward" in skipped["0"]
    assert type(model[0]) is MyLinear and type(model[1]).__name__ == "QuantLinear"


@pytest.mark.parametrize("bits, method", [(8, "minmax"), (4, "lsq"), (2, "stat"), (3, "stat"), ("ternary", "ternary"),
                                          ("binary", "binary")])
def test_export_reproduces_the_fake_quant_weights_and_forward(bits, method):
    torch.manual_seed(0)
    model = TiedLM()
    _prepare(model, bits, method)
    idx = torch.randint(0, 20, (3, 9))
    with torch.no_grad():
        reference = model(idx)
        ints = export_int(model)
        for name, layer in quant_modules(model).items():
            assert ints[name]["weight"].dtype in (torch.int8, torch.int16)
            assert torch.allclose(dequantize(ints[name]), layer.quantized_weight(), atol=1e-6, rtol=1e-6), name
        for name, layer in quant_modules(model).items():  # rebuild the layers from the integers only
            layer.weight_quantizer.enabled = False
            layer.weight.copy_(dequantize(ints[name]))
        assert torch.allclose(model(idx), reference, atol=1e-5)


def test_int8_cpu_model_matches_the_fake_quant_w8a8_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    _prepare(model, 8, "minmax", act=8)
    x = torch.randn(32, 64)
    with torch.no_grad():
        fake = model(x)
        int8 = to_int8_cpu_(model)
        real = int8(x)
    assert isinstance(int8[0], torch.ao.nn.quantized.dynamic.Linear)
    rel = (real - fake).norm() / fake.norm()
    assert rel < 0.02, rel  # dynamic per-tensor activation scales vs our per-token ones


def test_convert_or_export_before_prepare_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no fake-quant layers"):
        export_int(model)
    with pytest.raises(ValueError, match="no fake-quant layers"):
        unprepare_(model)


def _fsdp_wrapped(module):
    """``module`` with the class FSDP2's fully_shard gives it (FSDP<Name>(FSDPModule, Name)), no
    process group needed: the class is all the swap looks at."""
    from torch.distributed.fsdp import FSDPModule

    module.__class__ = type(f"FSDP{type(module).__name__}", (FSDPModule, type(module)), {})
    return module


def test_fsdp2_wrapped_layers_are_swapped_keeping_fsdps_class_and_unprepare_restores_it():
    from torch.distributed.fsdp import FSDPModule

    from lichtenberg.core.layers import layer_kind
    from lichtenberg.core.quantization.modules import swappable_kind

    torch.manual_seed(0)
    model = nn.Sequential(_fsdp_wrapped(nn.Linear(8, 15)), _fsdp_wrapped(nn.Conv1d(3, 5, 3)))
    wrapped = [type(m) for m in model]
    assert layer_kind(model[0]) == (layer_kind(nn.Linear(1, 1))[0], False)  # Linear at MRO index 2
    assert swappable_kind(model[0])[1] and swappable_kind(model[1])[1]
    ref = nn.Linear(8, 15)
    ref.load_state_dict(model[0].state_dict())
    skipped = prepare_({"0": model[0], "1": model[1]}, lambda m, k: WeightQuantizer(m.weight.shape, 8, "minmax"),
                       lambda m: None)
    assert skipped == {}
    for module, cls in zip(model, wrapped):
        assert isinstance(module, FSDPModule) and isinstance(module, cls) and type(module).__name__ == f"Quant{cls.__name__}"
        assert type(module).__mro__[type(module)._orig_cls_mro_index] is cls.__mro__[2]  # FSDPModule.__new__'s rule
        assert layer_kind(module)[0].name == cls.__mro__[2].__name__
    x = torch.randn(4, 8)
    model[0].weight_quantizer.enabled = True
    quantized = _enabled(WeightQuantizer(ref.weight.shape, 8, "minmax"))(ref.weight)
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, quantized, ref.bias))
    unprepare_(model)
    assert [type(m) for m in model] == wrapped


def test_a_user_subclass_under_fsdp2_is_still_reported_not_swapped():
    from lichtenberg.core.quantization.modules import swappable_kind

    class Mine(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    layer = _fsdp_wrapped(Mine(4, 4))
    assert swappable_kind(layer)[1] is False
    skipped = prepare_({"m": layer}, lambda m, k: WeightQuantizer(m.weight.shape, 8, "minmax"), lambda m: None)
    assert "own forward" in skipped["m"] and type(layer).__name__ == "FSDPMine"


def test_a_bf16_weight_with_float32_scales_keeps_the_layers_dtype():
    # FSDP2's MixedPrecisionPolicy hands the forward bf16 weights while learned scales stay float32.
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    prepare_({"fc": layer}, lambda m, k: _enabled(WeightQuantizer(m.weight.shape, 4, "lsq")),
             lambda m: _enabled(ActivationQuantizer(8, "lsq")))
    assert layer.weight_quantizer.scale.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.quantized_weight().dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight_quantizer.scale.grad.dtype == torch.float32
