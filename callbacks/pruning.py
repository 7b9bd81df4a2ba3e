"""GradualPruning: magnitude / activation-aware / gradient pruning on a step-level schedule.

Masks are bool buffers beside the weights (``lichtenberg.core.sparsity.MaskEngine``): they
are in every checkpoint, identical on every rank (computed from synchronised weights, norms
and gradients), and excluded from DDP's per-step buffer broadcast. With ``make_permanent``
checkpoints hold plain weights instead (masks travel in this callback's state), so every
checkpoint of the run, ``last.ckpt`` included, loads into the plain module.

Under FSDP2 masks and rewind points are DTensor buffers saved by the distributed checkpoint
(with ``make_permanent`` too: its checkpoints keep the mask buffers, the module is plain at
the end of fit), and so are SR-STE's dense latent weights (``<leaf>_latent``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.checks import check_bool, check_choice, check_real
from ..core.distributed import local
from ..core.schedules import SparsitySchedule
from ..core.sparsity import (
    Allocation,
    InputNorms,
    SRSTE,
    check_sharded_nm,
    gradient_score,
    magnitude_score,
    parse_pattern,
    prune_masks,
    wanda_score,
)
from ..core.targets import Selection, Targets
from ._base import run_length
from ._sparsity import _Sparsity
from ._summary import format_table

__all__ = ["GradualPruning"]

_ALLOCATIONS = ("uniform", "global", "global_floor", "lamp", "erk")


class GradualPruning(_Sparsity):
    """Prune target weights to ``sparsity`` along a schedule (Zhu & Gupta's cubic by default).

    At every pruning event (optimizer-step based) new masks are computed from the scores,
    the budget is split across layers by ``allocation``, and optimizer state of newly pruned
    slots is zeroed. Between events the gradients of pruned weights are zeroed at the last
    point before each optimizer step, which keeps pruned weights at exactly zero under SGD,
    Adam and AdamW whatever the module does to its gradients; after the step of any other
    optimizer the weights are re-masked as well.

    Args:
        sparsity: final fraction of the target weights pruned, in (0, 1). For an N:M pattern
            it must equal 1 - N/M.
        schedule: when pruning happens (kind, start, end, every_n_steps, initial).
        score: "magnitude" |w|, "wanda" |w| * ||x|| (input norms collected on event steps
            only), or "gradient" |w * g|.
        allocation: how the budget is split across layers: "lamp" (default: global over
            scale-invariant LAMP scores, no layer collapses), "uniform" (Zhu & Gupta: every layer
            at the target), "global", "global_floor" (every layer keeps >= 1%) or "erk"; or an
            explicit {module-name glob: final sparsity} dict (unmatched layers get ``sparsity``).
            Not used by N:M patterns.
        pattern: "unstructured", or "N:M" (e.g. "2:4": N kept of every M consecutive inputs).
        targets: which weights (default: weight of every Linear, Conv1d/2d/3d and Hugging Face
            Conv1D).
        rewind: lottery-ticket rewinding of surviving weights to their initial values at
            each event (off by default).
        make_permanent: remove the mask buffers at the end of fit (a plain module remains), and
            write checkpoints without them.
        sr_ste: SR-STE decay lambda for an N:M pattern (0 = off; the paper uses 2e-4). When on,
            the N:M mask is recomputed from a dense latent weight after every optimizer step
            from the schedule's start (one optimizer only; one extra float copy of the weights).

    Example:
        >>> trainer = Trainer(max_epochs=20, callbacks=[GradualPruning(sparsity=0.9)])
    """

    _resume_free = ("make_permanent",)

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: SparsitySchedule | None = None,
        score: Literal["magnitude", "wanda", "gradient"] = "magnitude",
        allocation: Allocation | dict[str, float] = "lamp",
        pattern: str = "unstructured",
        targets: Targets | None = None,
        rewind: bool = False,
        make_permanent: bool = False,
        sr_ste: float = 0.0,
    ) -> None:
        self.sparsity = check_real("GradualPruning sparsity", sparsity, low=0.0, high=1.0, low_open=True, high_open=True,
                                   fix="it is the fraction of weights removed, e.g. 0.5 or 0.9")
        self.score = check_choice("GradualPruning score", score, ("magnitude", "wanda", "gradient"))
        if isinstance(allocation, dict):
            for glob, value in allocation.items():
                if not isinstance(glob, str):
                    raise ValueError(f"allocation key {glob!r} must be a glob over module names, e.g. 'encoder.*'.")
                check_real(f"allocation[{glob!r}]", value, low=0.0, high=1.0, high_open=True,
                           fix="per-layer sparsities must lie in [0, 1): fractions of weights removed")
        else:
            check_choice("GradualPruning allocation", allocation, _ALLOCATIONS, "or a {glob: sparsity} dict")
        if not isinstance(pattern, str):
            raise ValueError(f"pattern={pattern!r} must be 'unstructured' or 'N:M' such as '2:4'.")
        self.nm = parse_pattern(pattern)
        if self.nm is not None and abs(sparsity - (1 - self.nm[0] / self.nm[1])) > 1e-9:
            raise ValueError(
                f"pattern={pattern!r} prunes {1 - self.nm[0] / self.nm[1]:g} of the weights, but sparsity={sparsity}: "
                f"set sparsity={1 - self.nm[0] / self.nm[1]:g}."
            )
        if self.nm is not None and allocation != "lamp":
            raise ValueError(f"allocation={allocation!r} has no effect with pattern={pattern!r} (every group keeps "
                             f"{self.nm[0]} of {self.nm[1]}): leave allocation at its default.")
        self.sr_ste = check_real("GradualPruning sr_ste", sr_ste, low=0.0, fix="0 turns it off; the paper uses 2e-4")
        if self.sr_ste and (self.nm is None or score != "magnitude"):
            raise ValueError(
                f"sr_ste={sr_ste} needs a decay >= 0 (paper: 2e-4), an N:M pattern (e.g. pattern='2:4') and score='magnitude' "
                f"(got pattern={pattern!r}, score={score!r})."
            )
        if schedule is not None and not isinstance(schedule, SparsitySchedule):
            raise ValueError(f"schedule={schedule!r} must be a SparsitySchedule(kind=..., start=..., end=..., ...).")
        self.schedule = schedule or SparsitySchedule()
        self.allocation = allocation
        self.pattern = pattern
        self.rewind = check_bool("GradualPruning rewind", rewind)
        self.make_permanent = check_bool("GradualPruning make_permanent", make_permanent)
        self._norms: InputNorms | None = None
        self._srste: SRSTE | None = None
        self._load_hook: Any = None
        super().__init__(targets)

    def _reset(self) -> None:
        super()._reset()
        self._end = 0
        self._initial: dict[str, torch.Tensor] = {}
        self._events = 0
        self._layer_final: dict[str, float] | None = None
        self._srste_state: dict[str, torch.Tensor] = {}
        self._srste_started = False  # FSDP2: whether the `<leaf>_latent` buffers hold latent weights yet
        self._srste = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, pattern=self.pattern)

    # -- set-up --------------------------------------------------------------------------
    def _check(self, selection: Selection) -> None:
        if self.nm is not None:
            for name, param in selection.params.items():
                check_sharded_nm(name, param, selection.kinds[name], self.nm[1])  # groups may not straddle shards
        self._layer_final = self._per_layer_targets(selection.params)

    def _init_masks(self, trainer: pl.Trainer) -> None:
        if self.rewind:
            self._initial = {n: p.detach().clone() for n, p in self.engine.params.items()}
            if self._sharded:  # DTensor shards: DCP restores them, callback state would hold rank 0's
                self._weight_buffers("rewind", self._initial)
        if self.sr_ste and self._sharded:  # SR-STE's latent weights, likewise (filled at its first step)
            self._weight_buffers("latent", {n: p.detach().clone() for n, p in self.engine.params.items()})

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super()._bind(trainer, pl_module, stage)
        if self.make_permanent and not self._sharded:  # checkpoints of this run hold no masks: a resume takes them from our state
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._keep_masks_missing_from)

    def _keep_masks_missing_from(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in self.engine.buffer_names if self.engine is not None and self.engine.params else ():
            if prefix + key not in state_dict:
                state_dict[prefix + key] = module.get_buffer(key)

    def _per_layer_targets(self, params: dict[str, torch.nn.Parameter]) -> dict[str, float] | None:
        """Final sparsity per layer for an explicit allocation dict (first matching glob wins)."""
        if not isinstance(self.allocation, dict):
            return None
        owners = {n: n.rpartition(".")[0] for n in params}
        unused = [g for g in self.allocation if not any(fnmatch.fnmatchcase(o, g) for o in owners.values())]
        if unused:
            raise ValueError(f"allocation globs {unused} match no pruned module; targets are {sorted(owners.values())}.")
        return {
            n: next((v for g, v in self.allocation.items() if fnmatch.fnmatchcase(owner, g)), self.sparsity)
            for n, owner in owners.items()
        }

    def _resolve(self, trainer: pl.Trainer) -> None:
        self._start, self._end = self.schedule.resolve(run_length(trainer), squeeze=bool(trainer.fast_dev_run))
        rank_zero_info(f"GradualPruning: events at optimizer steps {self._start}..{self._end} every {self.schedule.every_n_steps}.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dense_latent = bool(self.sr_ste)  # SR-STE re-masks after the step itself
        super().on_fit_start(trainer, pl_module)
        if self._sharded and self.rewind:  # the device move or a restore replaced the buffers
            self._initial = self._read_buffers("rewind")
        if self.sr_ste:
            if len(trainer.optimizers) != 1:
                raise ValueError(f"sr_ste needs exactly one optimizer, got {len(trainer.optimizers)}: use sr_ste=0.")
            assert self.nm is not None and self.engine is not None
            latent = self._read_buffers("latent") if self._sharded else None
            self._srste = SRSTE(self.engine, *self.nm, decay=self.sr_ste, latent=latent)
            self._srste.load_state_dict(self._srste_state)
            self._srste.started |= self._srste_started
            self._hooks.append(trainer.optimizers[0].register_step_post_hook(lambda *_: self._srste.after_step_()))

    # -- training ------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return self._srste is None and self.schedule.is_event(step, self._start, self._end)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.score == "wanda" and self._norms is None and self._due(trainer.global_step):
            self._norms = InputNorms(self._modules).__enter__()

    def _last_point(self, trainer: pl.Trainer, names: list[str]) -> None:
        if self._srste is None:
            return super()._last_point(trainer, names)
        if trainer.global_step >= self._start:  # N:M from a dense latent weight, every step
            self._srste.before_step_()

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        engine = self.engine
        assert engine is not None
        params = engine.params
        if self.score == "wanda" and self._norms is not None:
            self._norms.__exit__()
            norms = {n: trainer.strategy.reduce(v, reduce_op="sum") for n, v in self._norms.norms().items()}
            self._norms = None
            scores = {n: wanda_score(engine.rows(n, p), norms[n], getattr(self._modules[n], "groups", 1))
                      if n in norms else magnitude_score(engine.rows(n, p)) for n, p in params.items()}
        elif self.score == "gradient":
            scores = {n: engine.rows(n, gradient_score(p)) for n, p in params.items()}
        else:
            scores = {n: engine.rows(n, magnitude_score(p)) for n, p in params.items()}
        masks = {n: engine.rows(n, m) for n, m in engine.masks.items()}  # [out, in, ...]: N:M runs along inputs
        target = self.schedule.value(step, self.sparsity, self._start, self._end)
        if self._layer_final is not None:  # explicit per-layer targets follow the schedule's progress
            progress = self.schedule.value(step, 1.0, self._start, self._end)
            layer_targets = {n: progress * final for n, final in self._layer_final.items()}
            new = prune_masks(scores, masks, layer_targets, nm=self.nm)
        else:
            new = prune_masks(scores, masks, target, self.allocation, self.nm)
        changed = engine.set_masks_({n: engine.from_rows(n, m) for n, m in new.items()}, trainer.optimizers)
        if self.rewind and self._initial:
            for name, param in params.items():  # shard-local (the rewind point is laid out like the weight)
                local(param.detach()).copy_(local(self._initial[name]) * local(engine.masks[name]))
        self._events += 1
        self._log_density(pl_module, "pruning")
        pl_module.log("pruning/target", target, on_step=True, on_epoch=False)
        pl_module.log("pruning/changed", float(sum(changed.values())), on_step=True, on_epoch=False)

    # -- end of fit ------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.engine
        assert engine is not None
        per_layer, total = engine.sparsity_report()
        rows = [(" = ".join(engine.names(n)), f"{tuple(engine.params[n].shape)}  sparsity {s:.4f}")
                for n, s in per_layer.items()]
        rows += [("global sparsity", f"{total:.4f} (target {self.sparsity})"), ("pruning events", str(self._events))]
        if self.make_permanent:
            ignore = set(engine.buffer_names)
            nonzeros = engine.squash_()
            self._drop_buffers("rewind")
            self._drop_buffers("latent")
            pl_module._ddp_params_and_buffers_to_ignore = [
                n for n in getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []) if n not in ignore
            ]
            rows.append(("made permanent", f"{sum(nonzeros.values())} non-zeros left, mask buffers removed"))
        rank_zero_info(format_table("GradualPruning summary", rows))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._norms is not None:  # a run that stopped between a Wanda event's forward and its update
            self._norms.__exit__()
            self._norms = None
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # the masks are in our state instead (under FSDP2 they stay in the sharded checkpoint)
        if self.make_permanent and self.engine is not None and not self._sharded:
            for key in self.engine.buffer_names:
                checkpoint["state_dict"].pop(key, None)

    def _state(self) -> dict[str, Any]:
        # Masks travel as model buffers (as our state with make_permanent); only the rewind
        # point, the event count and SR-STE's latent weights live here.
        latent = self._srste.state_dict() if self._srste is not None else self._srste_state
        initial = {} if self._sharded else dict(self._initial)  # FSDP2: in `<leaf>_rewind` buffers
        state = {"events": self._events, "initial": initial, "sr_ste_latent": latent}
        if self._sharded:  # the latent weights are in `<leaf>_latent` buffers: say whether they are live
            state["sr_ste_latent"] = {}
            state["sr_ste_started"] = self._srste.started if self._srste is not None else self._srste_started
        if self.make_permanent and self.engine is not None and not self._sharded:
            state["masks"] = {n: m.clone() for n, m in self.engine.masks.items()}
        return state

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self._events = int(state_dict["events"])
        if not self._sharded:
            self._initial = dict(state_dict["initial"])
        self._srste_state = dict(state_dict.get("sr_ste_latent", {}))
        self._srste_started = bool(state_dict.get("sr_ste_started", False))
        if self._srste is not None:  # ModelParallelStrategy restores after on_fit_start built it
            self._srste.load_state_dict(self._srste_state)
            self._srste.started |= self._srste_started
        if state_dict.get("masks") and self.engine is not None:
            for name, mask in state_dict["masks"].items():
                self.engine.masks[name].copy_(mask)
