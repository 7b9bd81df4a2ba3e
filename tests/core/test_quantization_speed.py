"""The QAT fast path: kernel counts, no host syncs, compile-clean quantizers, the fused path.

Counts are ATen ops seen by a dispatch mode during one forward + backward of a quantized
``nn.Linear``, minus the same for the plain layer: on a GPU each is a kernel launch (views
excepted), and a host sync stalls the launch queue.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch._dynamo.testing
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from lichtenberg.core.layers import as_rows
from lichtenberg.core.quantization import ActivationQuantizer, WeightQuantizer, fused, prepare_
from lichtenberg.core.quantization import functional as F

SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "masked_select"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer(weight="lsq", activation="dynamic", wbits=8, abits=8, granularity="channel", track=False):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    if weight is not None or activation is not None:
        prepare_({"l": layer},
                 lambda m, k: WeightQuantizer(as_rows(m.weight, k).shape, wbits, weight, granularity, 16, track)
                 if weight else nn.Identity(),
                 lambda m: ActivationQuantizer(abits, activation) if activation else None)
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None and not isinstance(q, nn.Identity):
                q.enabled = True
    return layer


def _step_ops(layer, x):
    layer(x).sum().backward()  # initialises scales: the first quantized forward, once per run
    layer.zero_grad(set_to_none=True)
    x.grad = None
    mode = _Ops()
    with mode:
        layer(x).sum().backward()
    return mode.ops


def test_w8a8_linear_adds_at_most_33_ops_and_no_host_sync():
    """Was 46 ops and 2 host syncs (a data-dependent clip check on CPU) per layer and step."""
    x = torch.randn(16, 64, requires_grad=True)
    plain, quant = _step_ops(_layer(None, None), x), _step_ops(_layer(), x)
    extra = sum(quant.values()) - sum(plain.values())
    assert extra <= 33, (extra, dict(quant - plain))
    assert not SYNCS & set(quant), dict(quant)


@pytest.mark.parametrize("weight,activation,wbits,granularity,track", [
    ("lsq", "lsq", 4, "channel", False), ("lsq", "lsq+", 4, "tensor", False), ("lsq", "pact", 4, "group", False),
    ("minmax", "dynamic", 8, "channel", False), ("stat", "dynamic", 4, "channel", True),
    ("lsq", None, 4, "channel", True), ("ternary", None, "ternary", "channel", False),
    ("binary", None, "binary", "channel", False),
])
def test_every_quantizer_trains_a_step_without_host_syncs(weight, activation, wbits, granularity, track):
    x = torch.randn(16, 64, requires_grad=True)
    layer = _layer(weight, activation, wbits, 8, granularity, track)
    if track:
        layer.weight_quantizer.freeze_(0.0)  # every weight frozen: the frozen-select path runs too
    ops = _step_ops(layer, x)
    assert not SYNCS & set(ops), {k: v for k, v in ops.items() if k in SYNCS}


class _QuantMLP(nn.Module):
    def __init__(self, weight="lsq", activation="dynamic", wbits=8, track=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        prepare_({"net.0": self.net[0], "net.2": self.net[2]},
                 lambda m, k: WeightQuantizer(as_rows(m.weight, k).shape, wbits, weight, "channel", 16, track),
                 lambda m: ActivationQuantizer(8, activation) if activation else None)

    def quantizers(self):
        for layer in (self.net[0], self.net[2]):
            yield layer.weight_quantizer
            if layer.input_quantizer is not None:
                yield layer.input_quantizer


@pytest.mark.parametrize("weight,wbits,track", [("lsq", 8, False), ("binary", "binary", False), ("lsq", 4, True)],
                         ids=["lsq", "binary-reste", "lsq-tracking-freeze"])
def test_compiled_quantized_model_never_recompiles_on_start_exponent_or_freeze(weight, wbits, track):
    """What the callback changes during a run -- switching quantization on (after initialising
    scales outside the forward), ReSTE's exponent every step, freezing -- reuses the graph."""
    torch.manual_seed(0)
    model = _QuantMLP(weight, "dynamic", wbits, track)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch._dynamo.reset()
    counters.clear()
    cnt = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model.net, backend=cnt)
    for step in range(6):
        if step == 2:  # the start step: what QuantizationAwareTraining._set_mode does
            for layer in (model.net[0], model.net[2]):
                layer.weight_quantizer.initialize_(layer.weight)
            for q in model.quantizers():
                q.enabled = True
        for q in model.quantizers():
            if isinstance(q, WeightQuantizer):
                q.o = 1.0 + step / 3
        if step == 4 and track:
            for q in model.quantizers():
                if isinstance(q, WeightQuantizer):
                    q.freeze_(0.0)
        opt.zero_grad()
        compiled(torch.randn(5, 8)).square().mean().backward()
        opt.step()
    assert dict(counters["graph_break"]) == {}
    assert cnt.frame_count == 1, f"{cnt.frame_count} graphs compiled: a change recompiled"


def test_compiled_quantizers_match_eager_values_and_gradients():
    torch.manual_seed(0)
    eager, compiled = _QuantMLP(), _QuantMLP()
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        for layer in (model.net[0], model.net[2]):
            layer.weight_quantizer.initialize_(layer.weight)
        for q in model.quantizers():
            q.enabled = True
    torch._dynamo.reset()
    fn = torch.compile(compiled.net, backend="aot_eager", fullgraph=True)
    x = torch.randn(7, 8)
    a, b = eager.net(x), fn(x)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fused, "DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "BACKEND", torch._dynamo.testing.CompileCounterWithBackend("aot_eager"))
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", set())
    torch._dynamo.reset()
    return fused.BACKEND


def test_fused_path_is_exact_and_one_graph_serves_every_layer_width(fused_on_cpu):
    """The CUDA path (torch.compile'd autograd nodes), run on CPU with a cheap backend: the same
    values and gradients as eager, and no recompile per layer width or LSQ gradient factor."""
    torch.manual_seed(0)
    for rows, cols in ((32, 64), (48, 80), (16, 24)):
        x = torch.randn(rows, cols, requires_grad=True)
        p = (torch.rand(rows, 1) * 0.05 + 0.01).requires_grad_()
        factor = 1 / math.sqrt(cols * 127)
        out = F.lsq_quantize(x, p, -128, 127, factor)
        out.backward(torch.ones_like(out))
        grads = x.grad.clone(), p.grad.clone()
        x.grad = p.grad = None
        ref = F._LSQ.apply(x, p, -128, 127, factor)
        ref.backward(torch.ones_like(ref))
        assert torch.equal(out, ref) and torch.equal(grads[0], x.grad)
        assert torch.allclose(grads[1], p.grad, rtol=1e-6)
        assert torch.equal(F.dynamic_quantize(x, 8), F._Dynamic.apply(x, 8, True))
    assert fused_on_cpu.frame_count <= 4, "layers of other sizes recompiled the fused functions"


def test_a_fused_compile_failure_warns_once_and_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "BACKEND", broken)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", set())
    torch._dynamo.reset()
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="fused fake-quant failed"):
        out = F.dynamic_quantize(x, 8)
    assert torch.equal(out, F._Dynamic.apply(x, 8, True))
    assert fused.fused(F._Dynamic.apply, x) is None  # no second attempt


def test_fused_path_is_off_on_cpu_and_inside_a_compiled_region():
    assert not fused.fused_enabled(torch.zeros(1))


@pytest.mark.parametrize("activation", ["lsq", "pact"])
def test_data_initialised_inputs_recompile_around_their_first_quantized_batch_only(activation):
    """The documented exception: lsq / lsq+ / pact inputs read their first quantized batch on
    the host: at the start step and the step after, dynamo breaks the graph around each layer's
    observation and recompiles (measured: 11 frames and 9 breaks for 2 layers, all of them
    then). From then on nothing recompiles."""
    torch.manual_seed(0)
    model = _QuantMLP("lsq", activation)
    torch._dynamo.reset()
    counters.clear()
    cnt = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model.net, backend=cnt)
    frames = []
    for step in range(6):
        if step == 2:
            for layer in (model.net[0], model.net[2]):
                layer.weight_quantizer.initialize_(layer.weight)
            for q in model.quantizers():
                q.enabled = True
        compiled(torch.randn(5, 8)).square().mean().backward()
        frames.append(cnt.frame_count)
    assert frames[0] == frames[1] == 1
    assert frames[-1] == frames[3] <= 12, frames  # settled right after the start step
    assert sum(counters["graph_break"].values()) <= 10, dict(counters["graph_break"])  # 9 measured, all at the start


@pytest.mark.skipif(not torch.cuda.is_available() or not fused._has_triton(), reason="needs CUDA and triton")
def test_fused_path_on_cuda_is_used_and_exact():
    """On a GPU the fused path is the default: the same values and gradients as the eager nodes."""
    torch.manual_seed(0)
    x = torch.randn(64, 96, device="cuda", requires_grad=True)
    p = (torch.rand(64, 1, device="cuda") * 0.05 + 0.01).requires_grad_()
    assert fused.fused_enabled(x)
    out = F.lsq_quantize(x, p, -128, 127, 0.01)
    out.backward(torch.ones_like(out))
    grads = x.grad.clone(), p.grad.clone()
    x.grad = p.grad = None
    ref = F._LSQ.apply(x, p, -128, 127, 0.01)
    ref.backward(torch.ones_like(ref))
    assert F._LSQ.apply in fused._compiled and F._LSQ.apply not in fused._failed
    assert torch.equal(out, ref) and torch.equal(grads[0], x.grad)
    assert torch.allclose(grads[1], p.grad, rtol=1e-5)
    assert torch.equal(F.dynamic_quantize(x, 8), F._Dynamic.apply(x, 8, True))
