"""One 2-process launch per test session for every selected test in tests/sharded/.

Starting both ranks costs ~11 s of imports; each test module declares what it needs with
``scenarios(items) -> (scenario_module, [names])`` (``items``: the session's selected tests
of that module); its tests take ``results``, that module's ``{scenario: per-rank results}``.
"""

from __future__ import annotations

import pytest

from tests.sharded.launch import launch_all


@pytest.fixture(scope="session")
def sharded_results(request, tmp_path_factory):
    wanted: dict[str, list[str]] = {}
    modules = {item.module for item in request.session.items if item.module.__name__.startswith("tests.sharded.")}
    for module in sorted(modules, key=lambda m: m.__name__):
        spec = getattr(module, "scenarios", None)
        if spec is not None:
            items = [i for i in request.session.items if i.module is module]
            name, names = spec(items)
            wanted.setdefault(name, []).extend(n for n in names if n not in wanted.get(name, []))
    return launch_all(wanted, tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def results(request, sharded_results):
    name, _ = request.module.scenarios([])
    return sharded_results[name]
