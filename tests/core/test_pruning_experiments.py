"""The cards' small experiments: layer collapse (LAMP / floor vs global) and Wanda vs magnitude."""

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lichtenberg.core.sparsity import (
    InputNorms,
    MaskEngine,
    magnitude_score,
    nm_mask,
    prune_masks,
    topk_mask,
    wanda_score,
)


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        idx = torch.randint(0, 1400, (64,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, x, y


def _weights(net):
    return {n: p for n, p in net.named_parameters() if n.endswith("weight")}


def _masks(net, allocation, sparsity=0.95):
    params = _weights(net)
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    return prune_masks({n: magnitude_score(p) for n, p in params.items()}, ones, sparsity, allocation)


def _finetuned_accuracy(net, masks, x, y, steps=300):
    """Accuracy of ``net`` (original weights) under ``masks`` after mask-preserving fine-tuning."""
    net = copy.deepcopy(net)
    engine = MaskEngine.attach_(net, _weights(net))
    engine.set_masks_(masks)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 1400, (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        engine.mask_grads_()
        opt.step()
        engine.apply_()
    with torch.no_grad():
        return (net(x[1400:]).argmax(1) == y[1400:]).float().mean().item()


def test_layer_collapse_global_wipes_a_rescaled_layer_lamp_does_not(digits_mlp):
    net, x, y = digits_mlp
    rescaled = copy.deepcopy(net)
    with torch.no_grad():  # ReLU is positively homogeneous: the function is unchanged
        rescaled[0].weight.mul_(0.01)
        rescaled[0].bias.mul_(0.01)
        rescaled[2].weight.mul_(100)
    torch.testing.assert_close(net(x), rescaled(x), atol=1e-4, rtol=1e-4)

    glob = _masks(rescaled, "global")
    assert int(glob["0.weight"].sum()) == 0, "global magnitude wipes the down-scaled layer"
    lamp, lamp_ref = _masks(rescaled, "lamp"), _masks(net, "lamp")
    floor = _masks(rescaled, "global_floor")
    for masks in (lamp, floor):
        assert all(int(m.sum()) >= 1 for m in masks.values()), "every layer stays alive"
        assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * sum(m.numel() for m in masks.values()))
    assert all(torch.equal(lamp[n], lamp_ref[n]) for n in lamp), "LAMP is blind to the rescale"

    # Quality of each allocation decision: masks chosen on the rescaled net, fine-tuned alike.
    chance = 0.2
    acc_global = _finetuned_accuracy(net, glob, x, y)
    acc_lamp = _finetuned_accuracy(net, lamp, x, y)
    acc_lamp_ref = _finetuned_accuracy(net, lamp_ref, x, y)
    acc_floor = _finetuned_accuracy(net, floor, x, y)
    acc_global_ref = _finetuned_accuracy(net, _masks(net, "global"), x, y)
    assert acc_global < chance < 0.7 < acc_global_ref
    assert acc_lamp == acc_lamp_ref > 0.7  # as if the rescale never happened
    # A 1% floor keeps layers alive but starves the output layer: far better than global,
    # not as good as unrescaled (measured ~0.30 vs ~0.80; see docs/pruning.md).
    assert acc_floor > acc_global + 0.1


SALIENT = [0, 4, 8, 12]


@pytest.fixture(scope="module")
def scaled_channels():
    """Inputs 0, 4, 8, 12 (one per 2:4 group) carry most of the signal (weights x5) and arrive
    x50 with weights /50 (the
    function-preserving rescale of the card): their weights now look tiny to magnitude pruning,
    as outlier features do in LLMs, while |W| * ||X|| still sees what they contribute."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16, bias=False)
    x = torch.randn(512, 32)
    with torch.no_grad():
        layer.weight[:, SALIENT] *= 5
        x[:, SALIENT] *= 50
        layer.weight[:, SALIENT] /= 50
    with InputNorms({"w": layer}) as norms:
        reference = layer(x)
    return layer, x, reference, norms.norms()["w"]


def _relative_error(layer, x, reference, mask):
    with torch.no_grad():
        return ((x @ (layer.weight * mask).T - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_beats_magnitude_on_scaled_input_channels(scaled_channels, pattern):
    layer, x, reference, sq_norms = scaled_channels
    scores = {"magnitude": magnitude_score(layer.weight), "wanda": wanda_score(layer.weight, sq_norms)}
    if pattern == "2:4":
        masks = {k: nm_mask(s, 2, 4) for k, s in scores.items()}
        for mask in masks.values():
            assert (mask.reshape(16, 8, 4).sum(-1) == 2).all(), "every 2:4 group has exactly 2 non-zeros"
    else:
        masks = {k: topk_mask(s, layer.weight.numel() // 2) for k, s in scores.items()}
    err = {k: _relative_error(layer, x, reference, m) for k, m in masks.items()}
    assert err["wanda"] < 0.5 * err["magnitude"], err
    kept = {k: m[:, SALIENT].float().mean().item() for k, m in masks.items()}
    # Magnitude drops every salient weight; Wanda keeps them far above the 50% base rate.
    assert kept["magnitude"] == 0.0 and kept["wanda"] > 0.75, kept
