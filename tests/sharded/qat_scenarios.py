"""QuantizationAwareTraining under FSDP2 (2 ranks, gloo): the same runs under DDP and FSDP2,
what the weight quantizers saw in forward, crash-resume through DCP, and integer exports."""

from __future__ import annotations

from typing import Any

import torch

from lichtenberg.callbacks import QuantizationAwareTraining
from lichtenberg.core.distributed import local
from lichtenberg.core.quantization import export_int, quant_modules, to_int8_cpu_, unprepare_
from tests.sharded.common import ShardedTinyModel, crash_resume, fit, save, snapshot

CONFIGS = {
    # per-channel LSQ on an uneven out dim (15 rows: shards of 8 and 7), LSQ inputs
    "lsq": {"weight_bits": 4, "activation_bits": 8, "weight_method": "lsq", "activation_method": "lsq",
            "start_step": 0.1},
    # per-tensor min-max weights, PACT clipping levels; gradient clipping and a foreach optimizer
    "minmax_pact": {"weight_bits": 4, "activation_bits": 6, "weight_method": "minmax", "activation_method": "pact",
                    "granularity": "tensor", "start_step": 3},
    # OFQ's statistic scale with oscillation tracking and freezing (whole-size tracking buffers)
    "stat_freeze": {"weight_bits": 3, "activation_bits": None, "weight_method": "stat", "start_step": 2,
                    "freeze_step": 0.5},
}
EXTRA = {"minmax_pact": {"gradient_clip_val": 0.5}}


class ForeachModel(ShardedTinyModel):
    """SGD with foreach kernels: they refuse lists mixing DTensors and plain tensors."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, foreach=True)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


class SeenShapes(QuantizationAwareTraining):
    """Records the type and shape of every tensor a weight quantizer quantized in training."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen: dict[str, set] = {}
        self.dtypes: set[str] = set()
        for name, module in quant_modules(pl_module).items():
            def record(quantizer, args, name=name):
                if quantizer.enabled and torch.is_grad_enabled():  # training forwards, not folds
                    self.seen.setdefault(name, set()).add((type(args[0]).__name__, tuple(args[0].shape)))
                    self.dtypes.add(str(args[0].dtype))
            module.weight_quantizer.register_forward_pre_hook(record)


class MixedPrecisionModel(ShardedTinyModel):
    """Shards with FSDP2's bf16 MixedPrecisionPolicy: weights reach forward in bf16, scales stay fp32."""

    def configure_model(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Linear layers compute in bf16 and hand float32 on (BatchNorm keeps float32 buffers).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[3]):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self.net, mesh=mesh)


def _model_cls(config: str) -> type:
    return ForeachModel if config == "minmax_pact" else ShardedTinyModel


def _locals(model) -> dict[str, torch.Tensor]:
    """Every quantizer tensor as this rank holds it (a replicated DTensor's local copy)."""
    return {k: local(v).detach().cpu().clone() for k, v in model.state_dict().items() if "quantizer" in k}


def _run(config: str, kind: str) -> dict[str, Any]:
    cb = SeenShapes(**CONFIGS[config])
    trainer, model = fit(kind, [cb], model_cls=_model_cls(config), **EXTRA.get(config, {}))
    classes = {n: type(m).__name__ for n, m in quant_modules(model).items()}
    replicated = {n: (type(p).__name__, str(getattr(p, "placements", None))) for n, p in model.named_parameters()
                  if "quantizer" in n}
    ints = export_int(model)  # a collective under FSDP2: every rank calls it
    try:
        to_int8_cpu_(model) if kind == "fsdp2" else None
        refused = None
    except ValueError as err:
        refused = str(err)
    out = {"model": snapshot(model), "locals": _locals(model), "step": trainer.global_step, "seen": cb.seen,
           "classes": classes, "replicated": replicated, "enabled": cb._enabled, "frozen": cb.statistics(),
           "ints": ints, "int8_refused": refused}
    unprepare_(model, fold=True)
    out["unprepared"] = {n: type(model.get_submodule(n)).__name__ for n in classes}
    out["folded"] = snapshot(model)
    return out


def _equality(config: str, out) -> None:
    save(out, {kind: _run(config, kind) for kind in ("ddp", "fsdp2")})


def lsq(out) -> None:
    _equality("lsq", out)


def minmax_pact(out) -> None:
    _equality("minmax_pact", out)


def stat_freeze(out) -> None:
    _equality("stat_freeze", out)


def resume(out) -> None:
    """Crash at epoch 2, resume from the DCP checkpoint of epoch 1: bit-exact, scales included."""
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", lambda: [QuantizationAwareTraining(**CONFIGS["lsq"])], out)
    save(out, {"ref": snapshot(ref), "resumed": snapshot(resumed), "ref_state": ref_cbs[0].state_dict(),
               "resumed_state": cbs[0].state_dict(), "ref_locals": _locals(ref), "resumed_locals": _locals(resumed)})


def mixed_precision(out) -> None:
    """LSQ weights and inputs under a bf16 MixedPrecisionPolicy: trains, scales agree across ranks."""
    cb = SeenShapes(**CONFIGS["lsq"])
    trainer, model = fit("fsdp2", [cb], model_cls=MixedPrecisionModel)
    save(out, {"step": trainer.global_step, "seen": cb.seen, "dtypes": cb.dtypes, "locals": _locals(model), "model": snapshot(model)})
