"""Zeros nobody can undo: pruned weights stay exactly zero whatever the module does to its
gradients, and NaN / inf in pruned gradient slots never reach scores, masks or weights."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lichtenberg.callbacks import DynamicSparseTraining, GradualPruning
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import erk_densities
from tests.cases import TinyModel, fit_tiny

DST_SCHEDULE = SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=4)
GRANET = SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=4, initial=0.5)
PRUNING = SparsitySchedule(kind="cubic", start=4, end=28, every_n_steps=4)


def sparsity_callback(kind: str):
    if kind == "pruning":
        return GradualPruning(sparsity=0.75, schedule=PRUNING)
    if kind == "sr_ste":
        return GradualPruning(sparsity=0.5, pattern="2:4", sr_ste=2e-4, schedule=PRUNING)
    return DynamicSparseTraining(0.75, kind, GRANET if kind == "granet" else DST_SCHEDULE)


class Audit(Callback):
    """After every optimizer step: pruned weights exactly zero, every weight finite, counts."""

    def __init__(self, cb):
        self.cb, self.zeros, self.finite, self.counts = cb, [], [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        engine = self.cb.engine
        self.zeros.append(all(bool((p[~engine.masks[n]] == 0).all()) for n, p in engine.params.items()))
        self.finite.append(all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()))
        self.counts.append({n: int(m.sum()) for n, m in engine.masks.items()})


def make_model(optimizer: str, edit: str | None):
    class Model(TinyModel):
        def on_before_optimizer_step(self, optimizer):
            # Runs after every callback's hook (Lightning's order): gradient centralisation or a
            # custom clip that writes into every slot, pruned ones included.
            for p in self.parameters():
                if p.grad is None or p.dim() < 2:
                    continue
                if edit == "centralise":
                    p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
                elif edit == "noise":
                    p.grad.add_(0.01)

        def configure_optimizers(self):
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=0.02)
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Model()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("edit", ["centralise", "noise"])
@pytest.mark.parametrize("kind", ["pruning", "rigl", "static"])
def test_pruned_weights_stay_zero_when_the_module_edits_gradients(kind, edit, optimizer):
    # Before: under SGD / Adam (no post-step re-mask) every pruned weight became non-zero while
    # masks and logs still said 75%.
    cb = sparsity_callback(kind)
    audit = Audit(cb)
    fit_tiny([cb, audit], make_model(optimizer, edit), max_epochs=4)
    assert all(audit.zeros), f"pruned weights non-zero after step {audit.zeros.index(False) + 1}"


class PoisonPrunedGradients(Callback):
    """NaN and inf in the gradient slots of pruned weights (what an overflowing fp16 loss scale
    leaves), written after backward and before any callback reads the gradients."""

    def __init__(self, cb):
        self.cb, self.poisoned = cb, 0

    def on_after_backward(self, trainer, pl_module):
        for name, param in self.cb.engine.params.items():
            pruned = (~self.cb.engine.masks[name]).nonzero()
            if len(pruned) < 2 or param.grad is None:
                continue
            grad = param.grad
            grad[tuple(pruned[0::2].T)] = float("nan")
            grad[tuple(pruned[1::2].T)] = float("inf")
            self.poisoned += 1


@pytest.mark.parametrize("kind", ["set", "rigl", "srigl", "granet", "sr_ste"])
def test_nan_and_inf_in_pruned_gradient_slots_never_reach_masks_or_weights(kind):
    # Before: topk_mask kept fewer than k on NaN scores (RigL density 0.25 -> lower), inf grew
    # weights that became non-finite, and SR-STE stepped the NaN into its latent weights.
    cb = sparsity_callback(kind)
    poison, audit = PoisonPrunedGradients(cb), Audit(cb)
    fit_tiny([poison, cb, audit], make_model("sgd", None), max_epochs=4)
    assert poison.poisoned > 0
    assert all(audit.finite), f"non-finite weights after step {audit.finite.index(False) + 1}"
    assert all(audit.zeros)
    sizes = {n: p.numel() for n, p in cb.engine.params.items()}
    if kind in ("set", "rigl"):  # exact ERK counts at every step
        expected = erk_densities({n: p.shape for n, p in cb.engine.params.items()}, 0.25)
        assert all(c == {n: round(expected[n] * sizes[n]) for n in sizes} for c in audit.counts)
    if kind == "granet":
        final = sum(audit.counts[-1].values())
        assert final == round(0.25 * sum(sizes.values()))
    if kind == "srigl":
        assert all(sum(c.values()) > 0.2 * sum(sizes.values()) for c in audit.counts)
    if kind == "sr_ste":
        assert all(c == {n: s // 2 for n, s in sizes.items()} for c in audit.counts[4:])
