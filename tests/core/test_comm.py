"""The masked all-reduce hook on a real DistributedDataParallel of one process (gloo): every
parameter's gradient lands where DDP keeps it (channels_last, transposed and strided
parameters, several buckets, bf16), pruned entries come back exactly zero and kept ones
exactly as computed, index lists are rebuilt only when a mask changes, and the per-step path
makes no host sync. Two processes (averaging, ranks that disagree) are in tests/sharded."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lichtenberg.core.sparsity.comm import MaskedAllReduce, _memory_order, mask_fingerprint, masked_allreduce_hook


@pytest.fixture
def one_process():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Zoo(nn.Module):
    """Layouts DDP treats differently: channels_last conv, a transposed weight (dense, permuted),
    a strided slice (not dense: laid out contiguous), unmasked LayerNorm and biases."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.fc.weight = nn.Parameter(torch.randn(16, 8 * 4 * 4).t().contiguous().t())  # strides (1, 16)
        self.norm = nn.LayerNorm(16)
        self.strided = nn.Parameter(torch.randn(16, 12)[:, ::2])  # [16, 6] with gaps between rows
        self.to(dtype)

    def forward(self, x):
        h = self.norm(self.fc(self.conv(x).flatten(1)))
        return h @ self.strided


def _masked(seed: int, dtype=torch.float32) -> Zoo:
    torch.manual_seed(seed)
    model = Zoo(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    for module, leaf in ((model.conv, "weight"), (model.fc, "weight"), (model, "strided")):
        param = getattr(module, leaf)
        module.register_buffer(f"{leaf}_mask", torch.rand(param.shape, generator=gen) > 0.7)
    return model


def _reference_grads(model: Zoo, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of an unwrapped copy: what one process's all-reduce averages (itself)."""
    twin = _masked(0, model.fc.weight.dtype)
    twin.load_state_dict(model.state_dict())
    twin(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


def _wrapped(model: Zoo) -> tuple[DistributedDataParallel, MaskedAllReduce]:
    model._ddp_params_and_buffers_to_ignore = [n for n, _ in model.named_buffers() if n.endswith("_mask")]
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
    state = MaskedAllReduce(model, ddp.process_group)
    ddp.register_comm_hook(state, masked_allreduce_hook)
    return ddp, state


def _step(ddp: DistributedDataParallel, x: torch.Tensor) -> None:
    ddp.zero_grad(set_to_none=True)
    ddp(x).square().mean().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kept_entries_exact_pruned_entries_zero_in_every_layout(one_process, dtype):
    model = _masked(0, dtype)
    ddp, state = _wrapped(model)
    x = torch.randn(4, 3, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)
    for _ in range(3):  # DDP rebuilds its buckets after the first step: the index lists follow
        expected = _reference_grads(model, x)
        _step(ddp, x)
        masks = state.masks()
        assert set(masks) == {"conv.weight", "fc.weight", "strided"}
        for name, param in model.named_parameters():
            want = expected[name] * masks[name] if name in masks else expected[name]
            assert torch.equal(param.grad, want), name
            if name in masks:
                assert (param.grad[~masks[name]] == 0).all() and (expected[name][~masks[name]] != 0).any(), name
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(p.numel() for p in model.parameters())
    masked = sum(m.numel() for m in masks.values())
    assert state.sent == 3 * dtype.itemsize * (total - masked + kept)
    assert state.dense_bytes == 3 * dtype.itemsize * total


def test_dense_steps_and_unpruned_masks_send_everything(one_process):
    model = _masked(0)
    ddp, state = _wrapped(model)
    x = torch.randn(4, 3, 6, 6)
    expected = _reference_grads(model, x)
    state.dense = True
    _step(ddp, x)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, expected[name]), name  # pruned entries averaged too
    sent, dense = state.reset_counts()
    assert sent == dense > 0 and state.sent == state.dense_bytes == 0
    state.dense = False
    for mask in state.masks().values():
        mask.fill_(True)
    _step(ddp, x)
    sent, dense = state.reset_counts()
    assert sent == dense > 0  # nothing pruned: buckets go whole


def test_index_lists_are_rebuilt_only_when_a_mask_changes(one_process):
    model = _masked(0)
    ddp, state = _wrapped(model)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        _step(ddp, x)
    built = state.builds
    for _ in range(3):
        _step(ddp, x)
    assert state.builds == built, "rebuilt without a mask change"
    model.fc.weight_mask[0, :5] = False  # in place: the version counter moves
    _step(ddp, x)
    assert state.builds > built and (model.fc.weight.grad[0, :5] == 0).all()
    built = state.builds
    model.register_buffer("strided_mask", torch.zeros_like(model.strided_mask))  # replaced: identity moves
    _step(ddp, x)
    assert state.builds > built and (model.strided.grad == 0).all()


def test_no_host_sync_between_mask_changes(one_process, monkeypatch):
    model = _masked(0)
    ddp, state = _wrapped(model)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        _step(ddp, x)
    calls = []
    for name in ("item", "tolist", "nonzero", "__bool__", "cpu", "all", "any"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(3):
        _step(ddp, x)
    monkeypatch.undo()
    assert calls == []


def test_fingerprint_tells_masks_apart():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 13, generator=gen) > 0.5  # not a multiple of 8 entries
    assert torch.equal(mask_fingerprint(mask), mask_fingerprint(mask.clone()))
    flipped = mask.clone()
    flipped[3, 4] = ~flipped[3, 4]
    assert not torch.equal(mask_fingerprint(flipped), mask_fingerprint(mask))
    moved = mask.clone()  # same count, one kept entry moved
    on, off = mask.nonzero()[0], (~mask).nonzero()[0]
    moved[tuple(on)], moved[tuple(off)] = False, True
    prints = mask_fingerprint(moved), mask_fingerprint(mask)
    assert prints[0][0] == prints[1][0] and prints[0][1] != prints[1][1]


def test_bucket_layout_follows_ddp():
    conv = torch.empty(8, 3, 3, 3).to(memory_format=torch.channels_last)
    assert _memory_order(conv) == [0, 2, 3, 1]  # channels innermost
    assert _memory_order(torch.empty(6, 4).t()) == [1, 0]
    assert _memory_order(torch.empty(16, 12)[:, ::2]) == [0, 1]  # not dense: DDP lays it out contiguous
