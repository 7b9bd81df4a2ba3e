"""Averaging math against closed forms: no Trainer here."""

import math

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from lichtenberg.core.averaging import (
    AveragedWeights,
    averageable_tensors,
    ema_decay,
    ema_update_,
    swa_update_,
    update_bn_,
)


def test_ema_closed_form_after_n_updates():
    # avg_n = d^n avg_0 + (1 - d) sum_k d^(n-1-k) x_k, computed in float64 to compare tightly.
    torch.manual_seed(0)
    d, n = 0.9, 25
    avg0 = torch.randn(5, dtype=torch.float64)
    xs = torch.randn(n, 5, dtype=torch.float64)
    avg = [avg0.clone()]
    for k in range(n):
        ema_update_(avg, [xs[k]], d)
    expected = d**n * avg0 + (1 - d) * sum(d ** (n - 1 - k) * xs[k] for k in range(n))
    torch.testing.assert_close(avg[0], expected, rtol=0, atol=1e-12)


def test_ema_of_constant_converges_geometrically():
    avg, x = [torch.zeros(3)], [torch.ones(3)]
    for _ in range(10):
        ema_update_(avg, x, 0.5)
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - 0.5**10))


@pytest.mark.parametrize(
    "t, gamma, power, expected",
    [
        (0, 1.0, 2 / 3, 0.0),  # first update copies the weights
        (1, 1.0, 2 / 3, 1 - 2 ** (-2 / 3)),
        (10, 1.0, 2 / 3, 1 - 11 ** (-2 / 3)),
        (10, 1.0, 3 / 4, 1 - 11 ** (-3 / 4)),
        (10, 2.0, 3 / 4, 1 - 6 ** (-3 / 4)),
        (10**6, 1.0, 2 / 3, 0.999),  # capped by the target decay
    ],
)
def test_ema_warmup_values(t, gamma, power, expected):
    assert math.isclose(ema_decay(t, 0.999, gamma, power), expected, rel_tol=1e-12)


def test_ema_decay_without_warmup_and_monotone_with_it():
    assert ema_decay(0, 0.99, warmup_power=None) == 0.0
    assert ema_decay(1, 0.99, warmup_power=None) == 0.99
    values = [ema_decay(t, 0.999) for t in range(1, 5000)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] <= 0.999


def test_swa_mean_equals_arithmetic_mean_of_snapshots():
    torch.manual_seed(1)
    snaps = torch.randn(17, 4, 3, dtype=torch.float64)
    avg = [torch.full((4, 3), 123.0, dtype=torch.float64)]  # overwritten by the first update
    for n, snap in enumerate(snaps):
        swa_update_(avg, [snap], n)
    torch.testing.assert_close(avg[0], snaps.mean(0), rtol=0, atol=1e-12)


def _bn_net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_averaged_weights_tracks_params_and_buffers_and_copies_integer_buffers():
    net = _bn_net()
    avg = AveragedWeights(net)
    assert set(avg.tensors) == set(net.state_dict())
    net[1].num_batches_tracked.fill_(40)
    net[1].running_mean.fill_(2.0)
    avg.update_(1.0)  # first update: copy
    net[1].num_batches_tracked.fill_(50)
    net[1].running_mean.fill_(4.0)
    avg.update_(0.5)
    # Integer buffers are copied verbatim (Lightning's AveragedModel truncates them: 40 vs 50).
    assert avg.tensors["1.num_batches_tracked"].item() == 50
    assert avg.tensors["1.num_batches_tracked"].dtype == torch.long
    torch.testing.assert_close(avg.tensors["1.running_mean"], torch.full((4,), 3.0))
    assert avg.num_updates == 2


def test_name_pairing_survives_a_reregistered_parameter():
    # Re-registering a parameter moves it to the end of named_parameters(): a positional zip
    # (Lightning's WeightAveraging) pairs a [2] bias with a [2, 4] weight and crashes.
    net = nn.Linear(4, 2)
    avg = AveragedWeights(net)
    weight = net.weight
    del net.weight
    net.register_parameter("weight", nn.Parameter(weight.detach() + 1.0))
    assert [n for n, _ in net.named_parameters()] == ["bias", "weight"]
    avg.bind_(net)
    avg.update_(1.0)
    torch.testing.assert_close(avg.tensors["weight"], net.weight.detach())
    torch.testing.assert_close(avg.tensors["bias"], net.bias.detach())


def test_reparametrised_tensor_raises_a_clear_error():
    net = nn.Linear(4, 2)
    avg = AveragedWeights(net)
    prune.l1_unstructured(net, "weight", amount=0.5)  # weight -> weight_orig + hook
    with pytest.raises(ValueError, match="no longer a parameter or buffer"):
        avg.bind_(net)


def test_tied_weights_are_averaged_once_and_non_persistent_buffers_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    names = set(averageable_tensors(Tied()))
    assert names == {"emb.weight"}


def test_copy_snapshot_restore_round_trip():
    torch.manual_seed(0)
    net = _bn_net()
    avg = AveragedWeights(net)
    avg.update_(1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    raw = avg.snapshot()
    avg.copy_to_()
    for name, t in averageable_tensors(net).items():
        assert torch.equal(t, avg.tensors[name].to(t.dtype))
    avg.restore_(raw)
    for name, t in averageable_tensors(net).items():
        assert torch.equal(t, raw[name])


def test_half_precision_weights_are_averaged_in_float32():
    net = nn.Linear(8, 8).to(torch.bfloat16)
    avg = AveragedWeights(net)
    assert avg.tensors["weight"].dtype == torch.float32
    avg.update_(1.0)
    # Increments far below bf16 resolution accumulate in the float32 average.
    target = avg.tensors["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(5):
        avg.update_(1e-3)
    expected = target + (1 - (1 - 1e-3) ** 5) * (net.weight.float() - target)
    torch.testing.assert_close(avg.tensors["weight"], expected, rtol=1e-5, atol=1e-6)


def test_offloaded_average_matches_on_device_average():
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    on_dev, off = AveragedWeights(net), AveragedWeights(net, device="cpu")
    for w in (1.0, 0.3, 0.2):
        with torch.no_grad():
            net.weight.mul_(1.1)
        on_dev.update_(w)
        off.update_(w)
    for name in on_dev.tensors:
        assert torch.equal(on_dev.tensors[name], off.tensors[name])


def test_state_dict_round_trip_reports_unknown_names():
    net = nn.Linear(3, 3)
    a = AveragedWeights(net)
    a.update_(1.0)
    state = a.state_dict()
    state["tensors"]["extra.weight"] = torch.zeros(1)
    b = AveragedWeights(nn.Linear(3, 3))
    unknown = b.load_state_dict(state)
    assert set(unknown) == {"extra.weight"}
    assert b.num_updates == 1
    assert torch.equal(b.tensors["weight"], net.weight.detach())


def test_update_bn_recomputes_exact_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(3))
    data = [torch.randn(10, 3) * 2 + 5 for _ in range(4)]
    net[0].running_mean.fill_(-7.0)
    seen = update_bn_(net, data, lambda m, x: m(x))
    assert seen == 4
    allx = torch.cat(data)
    # Cumulative averaging of per-batch means (equal batch sizes) equals the global mean.
    torch.testing.assert_close(net[0].running_mean, allx.mean(0))
    torch.testing.assert_close(net[0].running_var, torch.stack([x.var(0) for x in data]).mean(0))
    assert net[0].momentum == 0.1  # restored
    assert update_bn_(net, data, lambda m, x: m(x), max_batches=2) == 2


def test_averages_written_into_a_sparse_model_stay_on_its_mask():
    net = nn.Linear(4, 3)
    avg = AveragedWeights(net)
    avg.update_(1.0)  # dense average
    mask = torch.rand(3, 4) > 0.5
    net.register_buffer("weight_mask", mask)
    assert "weight_mask" not in averageable_tensors(net)  # masks are structure, never averaged
    avg.bind_(net)
    avg.copy_to_()
    assert (net.weight[~mask] == 0).all()
    assert torch.equal(net.weight[mask], avg.tensors["weight"][mask])
    assert torch.equal(net.weight_mask, mask)


# -- sharded runs: the buffer helpers (DTensor paths run in tests/sharded/test_averaging.py) -----


def _pretend_sharded(monkeypatch, tensors):
    """Make the helpers treat ``tensors`` (by identity) as FSDP2 shards."""
    import lichtenberg.core.averaging.sharded as sharded

    ids = {id(t) for t in tensors}
    monkeypatch.setattr(sharded, "is_sharded", lambda t: id(t) in ids)


def test_averages_attached_beside_parameters_are_never_averaged():
    from lichtenberg.core.averaging import attach_buffers_

    net = nn.Sequential(nn.Linear(3, 2))
    net[0].register_buffer("weight_ema", torch.zeros(2, 3))  # as attach_buffers_ names them
    net[0].register_buffer("scale_ema", torch.zeros(1))  # no parameter 'scale': an ordinary buffer
    names = set(averageable_tensors(net))
    assert names == {"0.weight", "0.bias", "0.scale_ema"}
    with pytest.raises(ValueError, match="suffix='_avg' is not one of"):
        attach_buffers_(net, {}, "_avg")


def test_attach_read_detach_buffers(monkeypatch):
    from lichtenberg.core.averaging import attach_buffers_, detach_buffers_, read_buffers

    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg_w, avg_b, stat = torch.ones(2, 3), torch.ones(2), torch.zeros(2)
    _pretend_sharded(monkeypatch, [avg_w, avg_b])
    added = attach_buffers_(net, {"0.weight": avg_w, "0.bias": avg_b, "1.running_mean": stat}, "_ema")
    # Only sharded averages go into the model (whole ones stay with their owner), persistent.
    assert added == ["0.weight_ema", "0.bias_ema"]
    assert net[0].weight_ema is avg_w and "0.weight_ema" in net.state_dict()
    assert "1.running_mean_ema" not in net.state_dict()
    # A second callback of the same kind is refused, and leaves nothing half-attached.
    other = torch.ones(2)
    _pretend_sharded(monkeypatch, [other, avg_w])
    net.add_module("2", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already has a buffer '0.weight_ema'.*one callback of this kind"):
        attach_buffers_(net, {"2.bias": other, "0.weight": avg_w}, "_ema")
    assert "bias_ema" not in net[2]._buffers
    del net[2]
    # A precision plugin's module.to(dtype) casts buffers: read_buffers casts back and re-registers.
    net.to(torch.bfloat16)
    back = read_buffers(net, {"0.weight": torch.float32, "0.bias": torch.float32}, "_ema")
    assert back["0.weight"].dtype == torch.float32 and net[0].weight_ema is back["0.weight"]
    detach_buffers_(net, added + ["missing.weight_ema"])
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                     "1.running_var", "1.num_batches_tracked"}


def test_reshard_is_a_no_op_without_fsdp2():
    from lichtenberg.core.averaging import reshard_

    net = nn.Linear(3, 2)
    before = net.weight
    reshard_(net)
    assert net.weight is before


def test_full_state_dict_is_whole_copies_on_the_masks():
    net = nn.Linear(4, 3)
    mask = torch.rand(3, 4) > 0.5
    net.register_buffer("weight_mask", mask)
    avg = AveragedWeights(net)
    out = avg.full_state_dict()
    assert set(out) == {"weight", "bias"}
    assert torch.equal(out["weight"], net.weight.detach() * mask) and out["weight"] is not avg.tensors["weight"]
    out["bias"].add_(1.0)  # a copy: the averages are untouched
    assert torch.equal(avg.tensors["bias"], net.bias.detach())


def test_load_tensors_refuses_mixing_sharded_and_whole(monkeypatch):
    import lichtenberg.core.averaging.weights as weights

    dst, src = torch.zeros(2), torch.ones(2)
    monkeypatch.setattr(weights, "is_sharded", lambda t: t is dst)
    with pytest.raises(ValueError, match="cannot copy a non-sharded tensor into a sharded one"):
        weights.load_tensors_({"a": dst}, {"a": src})
