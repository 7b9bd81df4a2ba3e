"""Run scenario functions in two processes (gloo) and collect what each rank saved.

Lightning's ModelParallelStrategy always launches its ranks by re-running ``sys.argv``, which
under pytest would re-run the test session. We start both ranks ourselves, as torchrun would
(Lightning then treats the processes as created externally), and run many scenarios per
launch: a launch costs seconds of imports, a tiny fit under a second.

A scenario is a module-level function ``name(out: Path) -> None`` in a module under
``tests.sharded``; both ranks call it and it writes ``out / f"rank{r}.pt"``. A scenario that
raises saves ``{"error": traceback}`` instead (see ``result``); a rank left waiting in a
collective by the other's failure is killed at the timeout.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

__all__ = ["launch", "launch_all", "result"]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, names: list[str], out: Path, world: int = 2, timeout: float = 600) -> dict[str, list]:
    """Run the scenarios ``names`` of ``tests.sharded.<module>`` (or of a dotted module path,
    e.g. a benchmark) on ``world`` ranks; returns
    ``{name: [rank0_result, rank1_result, ...]}`` or raises with both ranks' output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "NODE_RANK": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    logs = [out / f"log{r}.txt" for r in range(world)]
    procs = []
    for rank in range(world):
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.sharded.launch", module, str(out), *names],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            ))
    deadline = time.monotonic() + timeout
    try:  # a rank that fails leaves the others waiting in a collective: stop them at once
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n" + logs[r].read_text()[-6000:] for r, c in enumerate(codes))
        raise AssertionError(f"sharded scenarios failed:\n{tails}")
    return {n: [torch.load(out / n.replace(":", "-") / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for n in names}


def launch_all(modules: dict[str, list[str]], out: Path) -> dict[str, dict[str, list]]:
    """``launch`` for scenarios of several modules at once (one process start for all):
    ``{module: [names]}`` -> ``{module: {name: per-rank results}}``."""
    flat = [f"{m}:{n}" for m, names in modules.items() for n in names]
    got = launch("-", flat, out) if flat else {}
    return {m: {n: got[f"{m}:{n}"] for n in names} for m, names in modules.items()}


def result(results: dict[str, list], name: str) -> list:
    """The per-rank results of scenario ``name``; fails the test with its traceback if it raised."""
    errors = [r["error"] for r in results[name] if isinstance(r, dict) and "error" in r]
    if errors:
        raise AssertionError(f"scenario {name} raised:\n{errors[0]}")
    return results[name]


def _main(module: str, out: str, *names: str) -> None:
    for name in names:  # "name" (in ``module``) or "other_module:name"
        where, _, scenario = name.rpartition(":")
        where = where or module
        scenarios = importlib.import_module(where if "." in where else f"tests.sharded.{where}")
        path = Path(out) / name.replace(":", "-")
        path.mkdir(parents=True, exist_ok=True)
        try:
            getattr(scenarios, scenario)(path)
        except Exception:  # both ranks usually fail alike (a ValueError at setup): go on to the next
            traceback.print_exc()
            torch.save({"error": traceback.format_exc()}, path / f"rank{os.environ['RANK']}.pt")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo groups (it can hang)


if __name__ == "__main__":
    _main(*sys.argv[1:])
