"""Which parameters a technique touches: layer kinds plus fully-qualified-name globs.

Every decision is reported: what was selected, under which names (tied aliases), why
everything else was left out, and, as warnings, matmul-like weights of layer types no
technique knows (see ``layers.py``) and aliases that a selection drags along.

One tensor, one identity: a parameter reachable under several names (a tied embedding and
output head) is selected once, under the first name a rule sees; ``Selection.aliases`` lists
its other names, so masks, averages and quantizers can be found under every one of them.

Example:
    >>> sel = select_targets(model, Targets(types=["Linear"], exclude=["head"]))
    >>> sel.params        # {"net.0.weight": Parameter, ...}
    >>> print(sel.report())
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict

from torch import nn

from .checks import check_str_list
from .layers import KINDS, LayerKind, layer_kind

__all__ = ["Selection", "Targets", "select_targets"]


def _default_types() -> list[str]:
    return ["Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"]


@dataclasses.dataclass
class Targets:
    """A parameter is targeted when its module's layer kind is in ``types``, its module name
    matches one of ``include`` (all when empty) and none of ``exclude``.

    Args:
        types: layer kinds (``lichtenberg.core.layers.KINDS``): "Linear", "Conv1d", "Conv2d",
            "Conv3d", "Conv1D" (Hugging Face GPT-2), "Embedding". Subclasses count as their base.
        include: fnmatch globs over module names ("encoder.*", "*.fc1"); empty means all.
        exclude: globs over module names to leave out.
        param: the parameter name on each module.
    """

    types: list[str] = dataclasses.field(default_factory=_default_types)
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    param: str = "weight"

    def __post_init__(self) -> None:
        self.types = check_str_list("targets types", self.types, "e.g. ['Linear', 'Conv2d']")
        unknown = [t for t in self.types if t not in KINDS]
        if unknown or not self.types:
            raise ValueError(f"targets types={self.types!r}: {unknown or 'empty'}; known layer kinds are "
                             f"{', '.join(KINDS)} (register others with lichtenberg.core.layers.register_layer_kind).")
        self.include = check_str_list("targets include", self.include, "globs over module names")
        self.exclude = check_str_list("targets exclude", self.exclude, "globs over module names")
        if not isinstance(self.param, str) or not self.param:
            raise ValueError(f"targets param={self.param!r} must be a parameter name such as 'weight'.")


@dataclasses.dataclass
class Selection:
    """The outcome of :func:`select_targets`.

    Args:
        params: selected parameters by the first name a rule saw (one entry per tensor).
        modules: the module owning each selected parameter under that name.
        kinds: the layer kind of each selected parameter.
        aliases: other names of each selected tensor, with the module holding it there.
        skipped: names left out and why (the targets said so).
        unknown: matmul-like weights of layer types not in the kinds table (left out).
    """

    params: dict[str, nn.Parameter]
    modules: dict[str, nn.Module]
    kinds: dict[str, LayerKind]
    aliases: dict[str, dict[str, nn.Module]]
    skipped: dict[str, str]
    unknown: dict[str, str]

    def names(self, name: str) -> list[str]:
        """Every name of the selected tensor ``name``, its own first."""
        return [name, *self.aliases.get(name, {})]

    def report(self) -> str:
        shown = [" = ".join(self.names(n)) for n in self.params]
        lines = [f"{len(self.params)} parameters selected: {', '.join(shown) or '-'}"]
        lines += [f"  not selected: {name} ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def warnings(self, types: list[str]) -> list[str]:
        """What changes the user's model beyond the targets, or leaves a weight dense unasked."""
        out = [f"{name} ({cls}) is a weight of a layer type lichtenberg does not know, left as it is; register "
               "its kind with lichtenberg.core.layers.register_layer_kind to include it" for name, cls in self.unknown.items()]
        for name, others in self.aliases.items():
            dragged = [a for a, m in others.items() if (layer_kind(m) is None or layer_kind(m)[0].name not in types)]
            if dragged:
                out.append(f"{name} is the same tensor as {', '.join(dragged)} (tied weights): what is done to it "
                           "applies there too")
        return out


def _matmul_like(leaf: str, param: nn.Parameter) -> bool:
    return param.dim() >= 2 and param.is_floating_point() and (leaf == "weight" or leaf.endswith("_weight"))


def select_targets(model: nn.Module, targets: Targets) -> Selection:
    """Resolve ``targets`` on ``model``; raises ValueError for globs or types that select nothing."""
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)].append(name)
    sel = Selection({}, {}, {}, {}, {}, {})
    selected: dict[int, str] = {}
    used_globs: set[str] = set()
    for name, module in model.named_modules():
        found = layer_kind(module)
        own = list(module.named_parameters(recurse=False))
        if found is None or not name or found[0].name not in targets.types:
            for leaf, param in own:
                full = f"{name}.{leaf}" if name else leaf
                if found is None and _matmul_like(leaf, param) and id(param) not in selected:
                    sel.unknown[full] = type(module).__name__
                elif id(param) not in selected:
                    sel.skipped[full] = f"module type {type(module).__name__} not targeted"
            continue
        included = [g for g in targets.include if fnmatch.fnmatchcase(name, g)]
        excluded = [g for g in targets.exclude if fnmatch.fnmatchcase(name, g)]
        used_globs.update(included + excluded)
        full = f"{name}.{targets.param}"
        if targets.include and not included:
            sel.skipped[full] = "no include glob matches"
            continue
        if excluded:
            sel.skipped[full] = f"excluded by {excluded[0]!r}"
            continue
        param = getattr(module, targets.param, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(
                f"{full} is selected but {type(module).__name__} has no parameter '{targets.param}'; "
                "exclude the module or pick another `param`."
            )
        if id(param) in selected:
            continue  # an alias of a tensor already selected: recorded below
        selected[id(param)] = full
        sel.params[full], sel.modules[full], sel.kinds[full] = param, module, found[0]
    for pid, full in selected.items():
        others = [n for n in names_of[pid] if n != full]
        sel.aliases[full] = {n: model.get_submodule(n.rpartition(".")[0]) for n in others}
        for n in others:
            sel.skipped.pop(n, None)
            sel.unknown.pop(n, None)
    sel.aliases = {n: a for n, a in sel.aliases.items() if a}
    unused = [g for g in targets.include + targets.exclude if g not in used_globs]
    if unused:
        raise ValueError(f"target globs {unused} match no module of type {targets.types}; check the module names.")
    if not sel.params:
        raise ValueError(f"no parameter matches targets {targets}; widen `types` or `include`.")
    return sel
