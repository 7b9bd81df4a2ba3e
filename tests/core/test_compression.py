"""Compact exports (``lichtenberg.core.compression``): exact round trips, sizes by formula, ties, bad input."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from torch import nn

from lichtenberg.core import decompress_state_dict, load_checkpoint, plain_state_dict
from lichtenberg.core.compression import FORMAT_VERSION, compress_state_dict, save_compressed
from lichtenberg.core.layers import as_rows, layer_kind
from lichtenberg.core.quantization import WeightQuantizer, dequantize, export_int, prepare_, quant_modules
from lichtenberg.core.sparsity import nm_mask, topk_mask


class Net(nn.Module):
    """Linear (odd fan-in: odd element counts), Conv2d and a tied embedding / output head."""

    def __init__(self, tied: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(24, 16)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4 + 16, 13)
        self.out = nn.Linear(13, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 24, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.to(dtype)

    def forward(self, img: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.conv(img).flatten(1), self.emb(idx)], 1)  # [B, 144]
        return self.head(self.norm(self.out(torch.relu(self.fc(h)))))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 4, 4, generator=g).to(dtype), torch.randint(0, 24, (3,), generator=g)


def _file_payload(path) -> int:
    """File size minus the safetensors header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@torch.no_grad()
def _prune(model: nn.Module, sparsity: float | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zero every matmul weight but the embedding (unstructured top-k or N:M); returns the masks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight is not model.emb.weight:
            scores = torch.rand(module.weight.shape, generator=g)
            if isinstance(sparsity, str) and scores[0].numel() % 4 == 0:  # the 1-channel conv has fan-in 9
                mask = nm_mask(as_rows(scores, layer_kind(module)[0]), 2, 4)
            else:
                mask = topk_mask(scores, round(scores.numel() * (1 - (0.5 if isinstance(sparsity, str) else sparsity))))
            module.weight.mul_(mask)
            masks[name] = mask
    return masks


@torch.no_grad()
def _quantize(model: nn.Module, bits, method: str, granularity: str = "channel", masks=None) -> dict:
    """Prepare weight-only fake quantization (inputs stay float), start it, and export the integers."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))}

    def make(m, kind):
        rows = as_rows(m.weight, kind).shape
        fits = granularity != "group" or rows.numel() // rows[0] % 4 == 0  # groups of 4 inputs where they divide
        wq = WeightQuantizer(rows, bits, method, granularity if fits else "channel", group_size=4)
        wq.enabled = True
        return wq

    prepare_(modules, make, lambda m: None)
    for name, mask in (masks or {}).items():
        model.get_submodule(name).register_buffer("weight_mask", mask)
    model.eval()(*_inputs(next(model.parameters()).dtype))  # initialises LSQ scales
    return export_int(model)


def test_bits_pack_and_unpack_for_every_width_and_odd_counts():
    from lichtenberg.core.compression import _pack, _unpack

    for bits in range(1, 9):
        for n in (0, 1, 5, 13, 64):
            codes = torch.randint(0, 2**bits, (n,))
            packed = _pack(codes, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
            assert torch.equal(_unpack(packed, bits, n), codes.int())
    # little-endian bit order: element 0 in the lowest bits (compressed-tensors' order)
    assert _pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert _pack(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, "2:4"])
def test_sparse_round_trip_is_bit_exact_and_sized_by_the_formula(tmp_path, sparsity, dtype):
    model = Net(dtype=dtype)
    _prune(model, sparsity)
    state = plain_state_dict(model.state_dict())  # what export sees: clones, so no storage ties
    path = tmp_path / "m.safetensors"
    size = save_compressed(path, state, ties=[("emb.weight", "head.weight")])
    out = decompress_state_dict(path)
    assert list(out) == list(state)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    assert out["head.weight"] is out["emb.weight"]
    tensors, metadata = compress_state_dict(state, ties=[("emb.weight", "head.weight")])
    layout = json.loads(metadata["lichtenberg.layout"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    predicted = 0
    for key, value in state.items():
        n, nnz = value.numel(), int((value != 0).sum())
        if layout[key]["format"] == "bitmask":  # d*b + 1/8 bytes per element
            assert value.dim() >= 2 and key.endswith("weight") and key != "emb.weight"
            assert tensors[f"{key}.bitmask"].numel() == math.ceil(n / 8)
            assert tensors[f"{key}.compressed"].numel() == nnz
            predicted += math.ceil(n / 8) + nnz * itemsize + 8 * value.dim()
        elif layout[key]["format"] == "dense":
            predicted += n * value.element_size()
    assert _file_payload(path) == predicted <= size
    dense = sum(v.numel() * v.element_size() for k, v in state.items() if k != "head.weight")
    assert predicted < dense * (0.4 if sparsity == 0.9 else 0.8)  # the embedding stays dense
    # the plain module, without lichtenberg, loads it strictly and computes the same outputs
    plain = Net(dtype=dtype)
    plain.load_state_dict(out, strict=True)
    model.eval(), plain.eval()
    assert torch.equal(plain(*_inputs(dtype)), model(*_inputs(dtype)))


def test_only_tensors_that_shrink_are_compressed():
    def zeros(k):  # a 16x16 float32 weight with k zeros: bitmask 32 B + (256 - k) * 4 B + shape 16 B vs 1024 B
        return torch.randn(16, 16).abs().add_(0.1).view(-1).index_fill_(0, torch.arange(k), 0.0).view(16, 16)

    state = {"a": zeros(13), "b": zeros(12), "bias": torch.zeros(16), "n": torch.tensor(3)}
    layout = json.loads(compress_state_dict(state)[1]["lichtenberg.layout"])
    assert [layout[k]["format"] for k in state] == ["bitmask", "dense", "dense", "dense"]  # 1-D stays plain
    layout = json.loads(compress_state_dict(state, sparse=["bias"])[1]["lichtenberg.layout"])
    assert [layout[k]["format"] for k in state] == ["dense", "dense", "bitmask", "dense"]
    assert all(r["format"] == "dense" for r in json.loads(compress_state_dict(state, sparse=False)[1]["lichtenberg.layout"]).values())


# (bits, method, granularity): every weight method, odd widths, group scales
QUANT = [(8, "minmax", "channel"), (4, "lsq", "channel"), (3, "minmax", "group"), (2, "lsq", "tensor"),
         ("ternary", "ternary", "channel"), ("binary", "binary", "channel"), (4, "stat", "channel")]


@pytest.mark.parametrize("bits,method,granularity", QUANT)
def test_quantized_weights_pack_to_their_bits_and_dequantize_exactly(tmp_path, bits, method, granularity):
    torch.manual_seed(0)
    model = Net()
    ints = _quantize(model, bits, method, granularity)
    state = plain_state_dict(model.state_dict())  # quantizer state dropped, latent weights
    path = tmp_path / "q.safetensors"
    save_compressed(path, state, ints, ties=[("emb.weight", "head.weight")])
    out = decompress_state_dict(path)
    tensors, metadata = compress_state_dict(state, ints, ties=[("emb.weight", "head.weight")])
    layout = json.loads(metadata["lichtenberg.layout"])
    width = {"ternary": 2, "binary": 1}.get(bits, bits)
    for name, entry in ints.items():
        key = f"{name}.weight"
        assert torch.equal(out[key], dequantize(entry))  # exactly the integers times the scales
        if name == "head":
            assert layout[key] == {"format": "alias", "of": "emb.weight", "dtype": "float32"}
            continue
        n, nnz = entry["weight"].numel(), int((entry["weight"] != 0).sum())
        masked = math.ceil(n / 8) + math.ceil(nnz * width / 8) < math.ceil(n * width / 8)  # QAT's own zeros (2-bit)
        assert layout[key]["format"] == ("packed_bitmask" if masked else "packed") and layout[key]["bits"] == width
        assert tensors[f"{key}_packed"].numel() == math.ceil((nnz if masked else n) * width / 8)
        assert tensors[f"{key}_scale"].numel() == entry["scale"].numel()
    assert out["head.weight"] is out["emb.weight"]
    for key in state:
        if not any(key == f"{n}.weight" for n in ints):
            assert torch.equal(out[key], state[key]), key
    plain = Net()
    plain.load_state_dict(out, strict=True)
    expected = model(*_inputs())  # the fake-quant model in eval, weight quantization only
    if method == "ternary":  # its forward is w + (q - w), within an ulp of q
        torch.testing.assert_close(plain.eval()(*_inputs()), expected, rtol=1e-6, atol=1e-6)
    else:
        for name, module in quant_modules(model).items():
            assert torch.equal(out[f"{name}.weight"], module.quantized_weight())
        assert torch.equal(plain.eval()(*_inputs()), expected)


# a bitmask pays where density < 1 - 1/bits; binary has no zero level, so pruned binary weights always need one
@pytest.mark.parametrize("bits,method,sparsity,expected", [(4, "lsq", 0.9, "packed_bitmask"), (8, "minmax", 0.5, "packed_bitmask"),
                                                           ("binary", "binary", 0.1, "packed_bitmask"), (8, "minmax", 0.05, "packed")])
def test_pruning_and_qat_together_store_a_bitmask_and_the_kept_integers(tmp_path, bits, method, sparsity, expected):
    torch.manual_seed(0)
    model = Net(tied=False)
    masks = _prune(model, sparsity)
    ints = _quantize(model, bits, method, masks=masks)
    state = plain_state_dict(model.state_dict())
    tensors, metadata = compress_state_dict(state, ints)
    layout = json.loads(metadata["lichtenberg.layout"])
    path = tmp_path / "pq.safetensors"
    save_compressed(path, state, ints)
    out = decompress_state_dict(path)
    width = {"binary": 1}.get(bits, bits)
    for name in masks:
        key, q = f"{name}.weight", ints[name]["weight"]
        assert layout[key]["format"] == expected
        assert torch.equal(out[key], dequantize(ints[name]))
        assert torch.equal(out[key] == 0, ~masks[name]) or bits != "binary"  # binary has no zero level: zeros = pruned
        nnz, n = int((q != 0).sum()), q.numel()
        if expected == "packed_bitmask":
            assert tensors[f"{key}_bitmask"].numel() == math.ceil(n / 8)
            assert tensors[f"{key}_packed"].numel() == math.ceil(nnz * width / 8)
    plain = Net(tied=False)
    plain.load_state_dict(out, strict=True)
    assert torch.equal(plain.eval()(*_inputs()), model(*_inputs()))


def test_tied_weights_are_stored_once_and_come_back_as_one_tensor(tmp_path):
    model = Net()
    _prune(model, 0.5)
    state = model.state_dict()  # the module's own state dict: the tie is one storage
    tensors, metadata = compress_state_dict(state)
    assert "head.weight" not in tensors and "emb.weight" in tensors
    path = tmp_path / "t.safetensors"
    save_compressed(path, state)
    out = decompress_state_dict(path)
    assert out["head.weight"] is out["emb.weight"] and torch.equal(out["head.weight"], model.head.weight)
    plain = Net()
    plain.load_state_dict(out, strict=True)
    assert plain.head.weight is plain.emb.weight
    assert "head.weight" not in compress_state_dict(plain_state_dict(state))[0]  # plain_state_dict keeps the tie
    copies = {k: v.clone() for k, v in state.items()}  # clones: without ties= they are stored twice, still exact
    assert "head.weight" in compress_state_dict(copies)[0]
    with pytest.raises(ValueError, match="'out.weight' differs from 'fc.weight'|not one tensor"):
        compress_state_dict(copies, ties=[("fc.weight", "out.weight")])
    with pytest.raises(ValueError, match="not keys of the state dict"):
        compress_state_dict(copies, ties=[("emb.weight", "lm_head.weight")])


def test_a_sparse_qat_models_own_state_dict_is_made_plain_and_keeps_its_tie(tmp_path):
    torch.manual_seed(0)
    model = Net()
    masks = _prune(model, 0.5)
    ints = _quantize(model, 4, "lsq", masks=masks)
    raw = model.state_dict()  # quantizer state and weight_mask buffers included; emb/head one storage
    assert any("_quantizer." in k for k in raw) and any(k.endswith("_mask") for k in raw)
    save_compressed(tmp_path / "raw.safetensors", raw, ints)
    out = decompress_state_dict(tmp_path / "raw.safetensors")
    assert list(out) == list(plain_state_dict(raw)) and out["head.weight"] is out["emb.weight"]
    for name, entry in ints.items():
        assert torch.equal(out[f"{name}.weight"], dequantize(entry))
    Net().load_state_dict(out, strict=True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_directory_compresses_like_a_file(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = Net(tied=False)
    masks = _prune(model, 0.9)
    state = {**model.state_dict(), **{f"{n}.weight_mask": m for n, m in masks.items()}}
    dcp.save({"state_dict": state}, storage_writer=dcp.FileSystemWriter(tmp_path / "ckpt"), no_dist=True)
    plain = plain_state_dict(load_checkpoint(tmp_path / "ckpt"))
    save_compressed(tmp_path / "s.safetensors", plain)
    out = decompress_state_dict(tmp_path / "s.safetensors")
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items()) and set(out) == set(model.state_dict())


def test_zero_points_and_metadata_make_the_file_self_describing(tmp_path):
    q = torch.randint(0, 16, (6, 5), dtype=torch.int8)
    entry = {"weight": q - 8, "scale": torch.rand(6, 1, 1) + 0.1, "zero_point": torch.randint(-2, 2, (6, 1, 1)).float(),
             "bits": 4, "method": "minmax", "granularity": "channel", "group_size": 128, "out_axis": 0}
    save_compressed(tmp_path / "z.safetensors", {"fc.weight": torch.zeros(6, 5, dtype=torch.float16)}, {"fc": entry})
    out = decompress_state_dict(tmp_path / "z.safetensors")["fc.weight"]
    assert out.dtype == torch.float16
    assert torch.equal(out, ((entry["weight"].float() - entry["zero_point"][:, :, 0]) * entry["scale"][:, :, 0]).half())
    from safetensors import safe_open

    with safe_open(tmp_path / "z.safetensors", "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"fc.weight_packed", "fc.weight_scale", "fc.weight_shape", "fc.weight_zero_point"}
    assert meta["lichtenberg.format_version"] == str(FORMAT_VERSION) and meta["format"] == "pt"
    assert json.loads(meta["lichtenberg.layout"])["fc.weight"]["bits"] == 4


def test_bad_inputs_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    state = {"fc.weight": torch.randn(4, 4), "fc.bias": torch.zeros(4)}
    entry = {"weight": torch.randint(-8, 8, (4, 4), dtype=torch.int8), "scale": torch.ones(4, 1, 1), "bits": 4,
             "method": "lsq", "granularity": "channel", "group_size": 128}
    with pytest.raises(ValueError, match="not whole tensors"):
        compress_state_dict({**state, "step": 3})
    with pytest.raises(ValueError, match="'conv.weight' is not in the state dict"):
        compress_state_dict(state, {"conv": entry})
    with pytest.raises(ValueError, match=r"fc.weight: integers \[9\] are off the 4-bit"):
        compress_state_dict(state, {"fc": {**entry, "weight": torch.full((4, 4), 9, dtype=torch.int8)}})
    with pytest.raises(ValueError, match="lacks \\['scale'\\]"):
        compress_state_dict(state, {"fc": {k: v for k, v in entry.items() if k != "scale"}})
    with pytest.raises(ValueError, match="does not stand for"):
        compress_state_dict(state, {"fc": {**entry, "weight": entry["weight"][:2]}})
    with pytest.raises(ValueError, match="already takes"):
        compress_state_dict({**state, "fc.weight_packed": torch.ones(1)}, {"fc": entry})
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a lichtenberg compressed file"):
        decompress_state_dict(tmp_path / "plain.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "new.safetensors",
              {"lichtenberg.format_version": "99", "lichtenberg.layout": "{}"})
    with pytest.raises(ValueError, match="upgrade lichtenberg"):
        decompress_state_dict(tmp_path / "new.safetensors")
