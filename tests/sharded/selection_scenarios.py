"""Scenarios for test_selection.py: every selection rule on DTensor shards (2 ranks, gloo, uneven
rows, a layer with fewer rows than ranks) against the whole-tensor rule on the same numbers.

Every scenario saves ``{case: (gathered sharded result, whole-tensor result)}``; the test asserts
exact equality. Inputs come in three flavours: random (tie-free), tied (rounded to one decimal,
a third of them zero, as pruned slots are) and NaN (tied, with NaN sprinkled in).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from lichtenberg.core.distributed import full
from lichtenberg.core.layers import KINDS, as_rows
from lichtenberg.core.sparsity import (
    allocate,
    check_sharded_nm,
    drop_and_grow,
    fanin_masks,
    growth_scores,
    lamp_scores,
    nm_mask,
    prune_masks,
    random_masks,
    random_scores,
    srigl_update,
    topk_mask,
    wanda_score,
)
from tests.sharded.common import save

SHAPES = {"a": (15, 8), "b": (7, 5), "c": (3, 4), "d": (1, 6), "e": (5, 2, 3)}
FLAVOURS = ("random", "tied", "nan")
_MESH: list[DeviceMesh] = []


def mesh() -> DeviceMesh:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if not _MESH:
        _MESH.append(DeviceMesh("cpu", [0, 1]))
    return _MESH[0]


def shard(t: torch.Tensor):
    return distribute_tensor(t, mesh(), [Shard(0)])


def tensors(flavour: str, seed: int = 0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if flavour != "random":
            t = (t * 10).round() / 10
            t[torch.rand(shape, generator=g) < 0.33] = 0.0
        if flavour == "nan":
            t[torch.rand(shape, generator=g) < 0.15] = float("nan")
        out[name] = t
    return out


def masks_for(seed: int, density: float = 0.7, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) < density for n, s in shapes.items()}


def pair(sharded, whole):
    if isinstance(sharded, dict):
        return {n: (full(sharded[n]), whole[n]) for n in whole}
    return full(sharded), whole


def topk(out: Path) -> None:
    res = {}
    for flavour in FLAVOURS:
        for name, t in tensors(flavour).items():
            n = t.numel()
            for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                res[f"{flavour}/{name}/k={k}"] = pair(topk_mask(shard(t), k), topk_mask(t, k))
    save(out, res)


def allocation(out: Path) -> None:
    res = {}
    for flavour in FLAVOURS:
        scores = {n: t.abs() for n, t in tensors(flavour, 1).items()}
        sh = {n: shard(s) for n, s in scores.items()}
        for method in ("uniform", "global", "global_floor", "erk"):
            for sparsity in (0.3, 0.9, 0.99):
                res[f"{flavour}/{method}/{sparsity}"] = (allocate(sh, sparsity, method, floor=0.2),
                                                         allocate(scores, sparsity, method, floor=0.2))
    weights = tensors("random", 2)
    for sparsity in (0.2, 0.5, 0.8, 0.95, 0.99):
        res[f"lamp/{sparsity}"] = (allocate({n: shard(w) for n, w in weights.items()}, sparsity, "lamp"),
                                   allocate(weights, sparsity, "lamp"))
    res["lamp_scores"] = pair(lamp_scores(shard(weights["a"])), lamp_scores(weights["a"]))
    save(out, res)


def pruning(out: Path) -> None:
    res = {}
    for flavour in FLAVOURS:
        for allocation in ("uniform", "global", "global_floor", "erk", "lamp"):
            if allocation == "lamp" and flavour != "random":
                continue  # LAMP is exact on tie-free magnitudes (see lamp_counts)
            scores = {n: t.abs() for n, t in tensors(flavour, 3).items()}
            # Random masks (dead slots: ties at the bottom, revived where a target is lower than a
            # layer's sparsity), then dense ones: a gradual schedule, whose masks must only shrink.
            for start in ("random", "dense"):
                masks = masks_for(4) if start == "random" else {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
                sh_masks = {n: shard(m) for n, m in masks.items()}
                for sparsity in (0.4, 0.6, 0.8, 0.95):  # each event prunes the last one's masks
                    whole = prune_masks(scores, masks, sparsity, allocation, floor=0.1)
                    sh = prune_masks({n: shard(s) for n, s in scores.items()}, sh_masks, sparsity, allocation, floor=0.1)
                    res[f"{flavour}/{allocation}/{start}/{sparsity}"] = pair(sh, whole)
                    if start == "dense" and flavour != "nan":  # (a NaN live score ranks below a dead slot)
                        res[f"{flavour}/{allocation}/{sparsity}/monotone"] = (
                            all(bool((full(sh[n]) <= full(sh_masks[n])).all()) for n in sh), True)
                    masks, sh_masks = whole, sh
        scores = {n: t.abs() for n, t in tensors(flavour, 5).items()}
        masks = masks_for(6)
        explicit = {"a": 0.5, "b": 0.9, "c": 0.25, "d": 0.6, "e": 0.0}
        res[f"{flavour}/explicit"] = pair(
            prune_masks({n: shard(s) for n, s in scores.items()}, {n: shard(m) for n, m in masks.items()}, explicit),
            prune_masks(scores, masks, explicit))
    save(out, res)


def nm(out: Path) -> None:
    res = {}
    shapes = {"a": (15, 8), "c": (3, 4), "d": (1, 8), "conv": (5, 2, 2, 2)}
    for flavour in FLAVOURS:
        scores = tensors(flavour, 7, shapes)
        masks = masks_for(8, 0.8, shapes)
        for name, s in scores.items():
            res[f"{flavour}/{name}/2:4"] = pair(nm_mask(shard(s), 2, 4), nm_mask(s, 2, 4))
        res[f"{flavour}/prune"] = pair(
            prune_masks({n: shard(s.abs()) for n, s in scores.items()}, {n: shard(m) for n, m in masks.items()}, 0.5,
                        nm=(1, 4)),
            prune_masks({n: s.abs() for n, s in scores.items()}, masks, 0.5, nm=(1, 4)))
        # Hugging Face Conv1D: weight [in, out] sharded along its inputs; rows view [out, in] is Shard(1).
        w = tensors(flavour, 9, {"w": (8, 6)})["w"]
        check_sharded_nm("h.0.attn.c_attn.weight", shard(w), KINDS["Conv1D"], 4)  # blocks of 4 inputs: fine
        rows = as_rows(shard(w), KINDS["Conv1D"])
        res[f"{flavour}/conv1d/2:4"] = pair(nm_mask(rows, 2, 4), nm_mask(as_rows(w, KINDS["Conv1D"]), 2, 4))
    try:
        check_sharded_nm("h.0.mlp.c_fc.weight", shard(torch.randn(12, 5)), KINDS["Conv1D"], 4)
        message = ""
    except ValueError as err:
        message = str(err)
    res["conv1d_error"] = message
    save(out, res)


def dst(out: Path) -> None:
    res = {}
    for flavour in FLAVOURS:
        weights, grads, masks = tensors(flavour, 10), tensors(flavour, 11), masks_for(12, 0.4)
        sh_w, sh_m = {n: shard(w) for n, w in weights.items()}, {n: shard(m) for n, m in masks.items()}
        ns = {n: max(1, int(m.sum()) // 3) for n, m in masks.items()}
        for name in weights:  # RigL, one layer at a time
            res[f"{flavour}/rigl/{name}"] = pair(
                drop_and_grow(sh_w[name], sh_m[name], ns[name], growth_scores(shard(grads[name]))),
                drop_and_grow(weights[name], masks[name], ns[name], growth_scores(grads[name])))
        res[f"{flavour}/rigl/all"] = pair(
            drop_and_grow(sh_w, sh_m, ns, {n: growth_scores(shard(g)) for n, g in grads.items()}),
            {n: drop_and_grow(weights[n], masks[n], ns[n], growth_scores(grads[n])) for n in weights})
        g1, g2 = torch.Generator().manual_seed(13), torch.Generator().manual_seed(13)
        res[f"{flavour}/set"] = pair(
            {n: drop_and_grow(sh_w[n], sh_m[n], ns[n], random_scores(sh_w[n], g1)) for n in weights},
            {n: drop_and_grow(weights[n], masks[n], ns[n], torch.rand(weights[n].shape, generator=g2)) for n in weights})
        # SRigL: fan-in masks, then updates (some neurons ablated with gamma 0.9), Shard(0) rows.
        shapes = {n: torch.Size(s) for n, s in SHAPES.items()}
        fan = fanin_masks(shapes, {n: 0.5 for n in shapes}, torch.Generator().manual_seed(14))
        for gamma in (0.3, 0.9):
            for name in weights:
                alive = torch.ones(SHAPES[name][0], dtype=torch.bool)
                alive[0] = name != "a"  # an ablated neuron from an earlier update
                sm, sa = srigl_update(sh_w[name], shard(grads[name]), shard(fan[name]), alive.clone(), 0.3, gamma)
                wm, wa = srigl_update(weights[name], grads[name], fan[name], alive.clone(), 0.3, gamma)
                res[f"{flavour}/srigl/{gamma}/{name}"] = (full(sm), wm)
                res[f"{flavour}/srigl/{gamma}/{name}/alive"] = (sa, wa)
        # SRigL on a Conv1D rows view: rows split along their inputs.
        kind = KINDS["Conv1D"]
        w, g = tensors(flavour, 15, {"w": (9, 6)})["w"], tensors(flavour, 16, {"w": (9, 6)})["w"]
        m = fanin_masks({"w": torch.Size([6, 9])}, {"w": 0.5}, torch.Generator().manual_seed(17))["w"]
        sm, sa = srigl_update(as_rows(shard(w), kind), as_rows(shard(g), kind), as_rows(shard(m.t().contiguous()), kind),
                              torch.ones(6, dtype=torch.bool), 0.3, 0.3)
        wm, wa = srigl_update(as_rows(w, kind), as_rows(g, kind), m, torch.ones(6, dtype=torch.bool), 0.3, 0.3)
        res[f"{flavour}/srigl/conv1d"] = (full(sm), wm)
        res[f"{flavour}/srigl/conv1d/alive"] = (sa, wa)
    shapes = {n: torch.Size(s) for n, s in SHAPES.items()}
    like = {n: shard(torch.zeros(s)) for n, s in shapes.items()}
    dens = {"a": 0.3, "b": 0.5, "c": 0.9, "d": 0.5, "e": 0.2}
    for draw in (random_masks, fanin_masks):
        res[draw.__name__] = pair(draw(shapes, dens, torch.Generator().manual_seed(18), like=like),
                                  draw(shapes, dens, torch.Generator().manual_seed(18)))
    rows = as_rows(shard(torch.zeros(8, 6)), KINDS["Conv1D"])
    res["random_masks/conv1d"] = pair(
        random_masks({"w": rows.shape}, {"w": 0.4}, torch.Generator().manual_seed(19), like={"w": rows}),
        random_masks({"w": rows.shape}, {"w": 0.4}, torch.Generator().manual_seed(19)))
    save(out, res)


def wanda(out: Path) -> None:
    res = {}
    g = torch.Generator().manual_seed(20)
    w, norms = torch.randn(15, 8, generator=g), torch.rand(8, generator=g)
    res["linear"] = pair(wanda_score(shard(w), norms), wanda_score(w, norms))
    conv, cnorms = torch.randn(6, 2, 3, generator=g), torch.rand(6, generator=g)
    res["grouped"] = pair(wanda_score(shard(conv), cnorms, groups=3), wanda_score(conv, cnorms, groups=3))
    h = torch.randn(9, 5, generator=g)  # Conv1D [in, out]
    hn = torch.rand(9, generator=g)
    res["conv1d"] = pair(wanda_score(as_rows(shard(h), KINDS["Conv1D"]), hn), wanda_score(as_rows(h, KINDS["Conv1D"]), hn))
    save(out, res)
