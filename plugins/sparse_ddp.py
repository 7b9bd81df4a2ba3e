"""SparseDDPStrategy: DDP that all-reduces only the gradients of kept weights.

At 90% sparsity plain DDP spends 90% of its gradient traffic on entries the masks zero right
after. This strategy registers ``lichtenberg.core.sparsity.masked_allreduce_hook``: per bucket
the entries whose ``<param>_mask`` is True are packed, averaged across ranks and written back
with zeros in the pruned slots; parameters without a mask (biases, norms, quantizer scales) go
whole. The result equals DDP's once the masks are applied, which every sparsity callback does
before the optimizer step (bit-identical with 2 ranks; tested against ``strategy="ddp"``).

**Dense steps (the protocol).** A step that reads the averaged gradients of pruned weights (a
RigL / GraNet / SRigL update growing by gradient, a gradient-scored pruning event, SR-STE's
dense latent weights, steps before gradients are masked) must all-reduce them whole. Before
each backward the strategy asks every callback, and the LightningModule, that defines

    def needs_dense_gradients(self, step: int) -> bool

with the optimizer step the gradients are for (``trainer.global_step``); if any answers True,
every bucket goes dense for that step. GradualPruning and DynamicSparseTraining answer it.
It must be cheap and decided from Python state (it runs every step).

Logged: ``sparse_ddp/bytes`` (what this rank all-reduced for the step), ``sparse_ddp/dense_bytes``
(what DDP would have) and their ratio, every ``log_every_n_steps`` through the Trainer's loggers,
and a summary line at the end of fit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.distributed.constants import default_pg_timeout

from ..core.sparsity import MaskedAllReduce, masked_allreduce_hook

__all__ = ["SparseDDPStrategy"]

_OWN_HOOK = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")


class SparseDDPStrategy(DDPStrategy):
    """DDP whose gradient all-reduce sends only the entries of kept (unmasked) weights.

    Args:
        start_method: how the processes start, as for DDPStrategy: "popen" (``strategy="ddp"``),
            "spawn" (``"ddp_spawn"``), "fork" or "forkserver".
        find_unused_parameters: passed to DistributedDataParallel.
        static_graph: passed to DistributedDataParallel.
        gradient_as_bucket_view: passed to DistributedDataParallel (saves a gradient copy).
        bucket_cap_mb: DDP's bucket size in MiB (None: DDP's default, 25).
        process_group_backend: "gloo", "nccl", ... (None: by device).
        timeout: timeout of the collectives.
        **kwargs: any other DDPStrategy or DistributedDataParallel argument, except a
            communication hook of your own (this strategy registers one).

    Example:
        >>> trainer = Trainer(accelerator="gpu", devices=8, strategy=SparseDDPStrategy(),
        ...                   callbacks=[DynamicSparseTraining(sparsity=0.9, method="rigl")])
    """

    def __init__(
        self,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: float | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        own = sorted(k for k in _OWN_HOOK if kwargs.get(k) is not None)
        if own:
            raise ValueError(f"SparseDDPStrategy registers its own communication hook; remove {', '.join(own)} "
                             "(or use DDPStrategy for a hook of your own).")
        if bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(start_method=start_method, process_group_backend=process_group_backend, timeout=timeout,
                         find_unused_parameters=find_unused_parameters, static_graph=static_graph,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self.comm: MaskedAllReduce | None = None
        self._askers: list[Any] = []
        self.totals = {"steps": 0, "dense_steps": 0, "bytes": 0, "dense_bytes": 0}

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the module; DDPStrategy registers no hook of its own here
        self._reset()
        self.comm = MaskedAllReduce(self.lightning_module, self.model.process_group)
        self.model.register_comm_hook(self.comm, masked_allreduce_hook)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.comm is None:
            return
        trainer = self.lightning_module.trainer
        self._askers = [c for c in [*trainer.callbacks, self.lightning_module]
                        if callable(getattr(c, "needs_dense_gradients", None))]
        masks = self.comm.masks()
        if not masks:
            rank_zero_warn("SparseDDPStrategy: the model has no `<param>_mask` buffers (attach GradualPruning or "
                           "DynamicSparseTraining), so every gradient is all-reduced whole, as with strategy='ddp'.")
        elif not self._askers:
            rank_zero_warn(f"SparseDDPStrategy: {len(masks)} weights carry masks but no callback masks their "
                           "gradients (none defines `needs_dense_gradients`): their pruned entries get zero "
                           "gradients here, where strategy='ddp' would average them.")

    def pre_backward(self, closure_loss: Any) -> None:
        super().pre_backward(closure_loss)
        if self.comm is not None:  # accumulation: the last micro-batch's answer is the one that syncs
            step = self.lightning_module.trainer.global_step
            self.comm.dense = any(asker.needs_dense_gradients(step) for asker in self._askers)

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.comm is not None:
            self._account(self.lightning_module.trainer)
        return out

    def _account(self, trainer: pl.Trainer) -> None:
        sent, dense = self.comm.reset_counts()
        if not dense:  # a second optimizer stepping on the same gradients: nothing new was sent
            return
        totals = self.totals
        totals["steps"] += 1
        totals["dense_steps"] += sent == dense
        totals["bytes"] += sent
        totals["dense_bytes"] += dense
        if trainer.is_global_zero and trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = {"sparse_ddp/bytes": float(sent), "sparse_ddp/dense_bytes": float(dense),
                       "sparse_ddp/ratio": sent / dense}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self) -> None:
        super().on_train_end()
        t = self.totals
        if t["steps"]:
            rank_zero_info(
                f"SparseDDPStrategy: {t['steps']} steps ({t['dense_steps']} dense), all-reduced "
                f"{_size(t['bytes'])} per rank of the {_size(t['dense_bytes'])} DDP would "
                f"({t['bytes'] / t['dense_bytes']:.3f}x); index lists built {self.comm.builds} times."
            )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


for _name, _start in (("sparse_ddp", "popen"), ("sparse_ddp_spawn", "spawn")):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, SparseDDPStrategy, description=f"SparseDDPStrategy, start_method={_start!r}",
                                  start_method=_start)
