"""Which parameters a technique touches: module types plus fully-qualified-name globs.

Every decision is reported: what was selected, and why everything else was left out.

Example:
    >>> sel = select_targets(model, Targets(types=["Linear"], exclude=["head"]))
    >>> sel.params        # {"net.0.weight": Parameter, ...}
    >>> print(sel.report())
"""

from __future__ import annotations

import dataclasses
import fnmatch

from torch import nn

__all__ = ["Selection", "Targets", "select_targets"]


@dataclasses.dataclass
class Targets:
    """A parameter is targeted when its module's type is in ``types`` (class names), its
    module name matches one of ``include`` (all when empty) and none of ``exclude``.

    Args:
        types: module class names, e.g. ["Linear", "Conv2d"].
        include: fnmatch globs over module names ("encoder.*", "*.fc1"); empty means all.
        exclude: globs over module names to leave out.
        param: the parameter name on each module.
    """

    types: list[str] = dataclasses.field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d"])
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    param: str = "weight"


@dataclasses.dataclass
class Selection:
    """The outcome of :func:`select_targets`: selected parameters and the reasons for the rest."""

    params: dict[str, nn.Parameter]
    modules: dict[str, nn.Module]
    skipped: dict[str, str]

    def report(self) -> str:
        lines = [f"{len(self.params)} parameters selected: {', '.join(self.params) or '-'}"]
        for name, why in self.skipped.items():
            lines.append(f"  not selected: {name} ({why})")
        return "\n".join(lines)


def select_targets(model: nn.Module, targets: Targets, allow_tied: bool = False) -> Selection:
    """Resolve ``targets`` on ``model``; raises ValueError for globs or types that select nothing.

    A parameter shared by several selected modules (tied weights) is selected once, unless
    ``allow_tied`` (then every module holding it is selected, under its own name)."""
    params: dict[str, nn.Parameter] = {}
    modules: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    used_globs: set[str] = set()
    for name, module in model.named_modules():
        # A fake-quant layer still counts as the layer it replaced (QuantLinear is a "Linear").
        kind = getattr(type(module), "target_name", type(module).__name__)
        if not name or kind not in targets.types:
            for pname, _ in module.named_parameters(recurse=False):
                skipped[f"{name}.{pname}" if name else pname] = f"module type {type(module).__name__} not targeted"
            continue
        included = [g for g in targets.include if fnmatch.fnmatchcase(name, g)]
        excluded = [g for g in targets.exclude if fnmatch.fnmatchcase(name, g)]
        used_globs.update(included + excluded)
        full = f"{name}.{targets.param}"
        if targets.include and not included:
            skipped[full] = "no include glob matches"
            continue
        if excluded:
            skipped[full] = f"excluded by {excluded[0]!r}"
            continue
        param = getattr(module, targets.param, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(
                f"{full} is selected but {type(module).__name__} has no parameter '{targets.param}'; "
                "exclude the module or pick another `param`."
            )
        if not allow_tied and any(p is param for p in params.values()):
            skipped[full] = "tied to an already selected parameter"
            continue
        params[full] = param
        modules[full] = module
    unused = [g for g in targets.include + targets.exclude if g not in used_globs]
    if unused:
        raise ValueError(f"target globs {unused} match no module of type {targets.types}; check the module names.")
    if not params:
        raise ValueError(f"no parameter matches targets {targets}; widen `types` or `include`.")
    return Selection(params, modules, skipped)
