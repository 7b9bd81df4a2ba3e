"""Shared benchmark plumbing: interleaved repetitions, robust summaries, results sections.

Protocol (ARCHITECTURE.md §6): variants are measured in the same process and run,
interleaved, and compared by median ratios rather than absolute times, because a 2-core
machine drifts (thermal, other tenants) far more over minutes than between adjacent runs.
Quality is reported as mean ± std over seeds.

Each benchmark replaces its own section of ``docs/results.md`` (between
``<!-- bench:NAME -->`` markers) so several benchmarks can share the file, and embeds its
raw numbers there too: ``benchmarks/out/`` is git-ignored.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch

__all__ = [
    "REPO_ROOT",
    "ForeignLoad",
    "FreezeGC",
    "command_line",
    "crash_record",
    "evaluate",
    "fit",
    "header",
    "interleaved",
    "machine",
    "main",
    "markdown_table",
    "mean_std",
    "median",
    "minor_faults",
    "pin_allocator",
    "pm",
    "publish",
    "pyplot",
    "quantiles",
    "quiet_lightning",
    "ratio_table",
    "read_section_data",
    "save_figure",
    "start",
    "timed",
    "trainer",
    "wait_for_quiet",
    "write_json",
    "write_section",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
_SMOKE = False  # set by main(--quick): a smoke run never waits for a quiet machine (it runs inside the tests)
# A smoke run (--quick) measures nothing: it only has to reach every code path. ``fit`` then trains at most
# SMOKE_TRAIN_BATCHES batches per epoch, and every ``trainer`` validates / tests at most SMOKE_EVAL_BATCHES
# (an explicit ``limit_*_batches`` argument wins). A full run is not limited.
SMOKE_TRAIN_BATCHES = 4
SMOKE_EVAL_BATCHES = 2


def interleaved(
    variants: Mapping[str, Callable[[], float]],
    repeats: int,
    *,
    max_foreign: float | None = None,
    max_retries: int = 3,
    log: list[dict[str, Any]] | None = None,
    extras: dict[str, list[Any]] | None = None,
) -> dict[str, list[float]]:
    """Call every variant ``repeats`` times in rotating order (ABC, BCA, CAB, ...).

    A variant returns its measurement, or ``(measurement, extra)``: the extras of kept rounds
    are appended to ``extras[name]``, aligned with the measurements.

    Rotating the start spreads slow drifts and "first after a switch" effects evenly
    over the variants instead of always charging them to the same one.

    With ``max_foreign`` (a share of the machine's CPU time, e.g. 0.1), a round during which
    other processes used more than that is thrown away and run again after the machine is
    quiet (at most ``max_retries`` times; then it is kept and flagged). On a shared 2-core box
    one test suite started by someone else slows a fit 10-20x, which no median absorbs when
    it spans several neighbouring fits. Every round's foreign load goes to ``log``. A ``--quick``
    smoke run (see ``main``) ignores ``max_foreign``: it measures nothing and must finish on a busy
    machine, where waiting for quiet could outlast the test's time limit.
    """
    if _SMOKE:
        max_foreign = None
    names = list(variants)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        for attempt in range(max_retries + 1):
            if max_foreign is not None:
                wait_for_quiet(max_foreign)
            values, extra, foreign = {}, {}, {}
            for name in order:
                probe = ForeignLoad()
                out = variants[name]()
                foreign[name] = probe.share()
                values[name], extra[name] = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            worst = max((f for f in foreign.values() if f is not None), default=None)
            disturbed = max_foreign is not None and worst is not None and worst > max_foreign
            keep = not disturbed or attempt == max_retries
            if log is not None:
                log.append({"round": r, "attempt": attempt, "kept": keep, "disturbed": disturbed, "foreign": foreign})
            if keep:
                break
        for name in names:
            results[name].append(float(values[name]))
            if extras is not None:
                extras.setdefault(name, []).append(extra[name])
    return results


class ForeignLoad:
    """Share of the machine's CPU time used by OTHER processes (and the hypervisor) since creation.

    Linux only (``/proc``); elsewhere ``share()`` returns None. Steal time counts as foreign.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal
        own = int(fields[11]) + int(fields[12])  # utime + stime of all our threads
        return time.monotonic(), busy, own

    def share(self) -> float | None:
        end = self._read()
        if end is None or self._start is None:
            return None
        (t0, b0, o0), (t1, b1, o1) = self._start, end
        capacity = (t1 - t0) * (os.cpu_count() or 1) * os.sysconf("SC_CLK_TCK")
        return max(0.0, ((b1 - b0) - (o1 - o0)) / capacity) if capacity > 0 else None


def wait_for_quiet(max_foreign: float, window_s: float = 1.0, timeout_s: float = 300.0) -> bool:
    """Block until other processes use at most ``max_foreign`` of the CPUs for ``window_s``; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = ForeignLoad()
        time.sleep(window_s)
        share = probe.share()
        if share is None or share <= max_foreign:
            return True
    return False


def pin_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for the rest of the process; False if not glibc.

    By default glibc adapts both thresholds as the process frees memory, so whether a step's
    multi-MiB temporaries (Adam's foreach intermediates, an ``avg_fn``'s products) are reused
    or handed back to the kernel and faulted in again (~12,000 minor faults, ~10 ms per step
    for a 6 M-parameter Adam step here) depends on what earlier fits in the same process
    happened to allocate. Fits then fall into a fast or a slow mode at random, which swamps a
    few-percent effect. Pinned thresholds keep freed memory in the heap for every variant alike.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(
            libc.mallopt(m_trim_threshold, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable, sink: list[float]) -> Callable:
    """``fn`` wrapped so that every call appends its seconds to ``sink``.

    For timing a callback's hook or an engine method in place, inside the fits being measured:
    Lightning and the engines look these up on the instance at call time, so assigning the
    wrapper there is enough.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and the warnings every tiny in-memory run triggers."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LeafSpec.*is deprecated.*"):
        warnings.filterwarnings("ignore", pattern)


def trainer(accelerator: str = "cpu", **kwargs: Any) -> lightning.Trainer:
    """A one-device ``lightning.Trainer`` without logger, checkpoints, progress bar or model summary.

    In a smoke run (``--quick``) validation and test stop after ``SMOKE_EVAL_BATCHES`` batches unless
    ``kwargs`` set ``limit_val_batches`` / ``limit_test_batches``.

    Args:
        accelerator: "cpu" (the default) or "cuda".
        **kwargs: further ``Trainer`` arguments (``max_steps``, ``callbacks``, ...).
    """
    if _SMOKE:
        kwargs = {"limit_val_batches": SMOKE_EVAL_BATCHES, "limit_test_batches": SMOKE_EVAL_BATCHES, **kwargs}
    return lightning.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def evaluate(model: lightning.LightningModule, dm: lightning.LightningDataModule) -> dict[str, float]:
    """Test accuracy and loss of what ``model`` holds, on ``dm``'s test split.

    A fresh trainer without callbacks runs the test, so it sees the module as training left it
    (averaged weights, masks, fake-quant layers), not what a callback would swap in.
    """
    (out,) = trainer().test(model, datamodule=dm, verbose=False)
    return {"acc": float(out["test_acc"]), "loss": float(out["test_loss"])}


def fit(
    model: lightning.LightningModule, dm: lightning.LightningDataModule, callbacks: list, **kwargs: Any
) -> tuple[lightning.Trainer, float]:
    """Train ``model`` on ``dm`` without validation; returns the trainer and the seconds ``Trainer.fit`` took.

    In a smoke run (``--quick``) an epoch is at most ``SMOKE_TRAIN_BATCHES`` batches unless ``kwargs`` set
    ``limit_train_batches``: the same callbacks, epochs and events, on fewer steps.

    Args:
        model: the module to train.
        dm: its data.
        callbacks: the trainer's callbacks.
        **kwargs: the length of the run (``max_epochs`` or ``max_steps``) and any further ``Trainer`` argument.
    """
    if _SMOKE:
        kwargs = {"limit_train_batches": SMOKE_TRAIN_BATCHES, **kwargs}
    fitter = trainer(limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)
    t0 = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    return fitter, time.perf_counter() - t0


class FreezeGC(lightning.pytorch.callbacks.Callback):
    """For a smoke run's spawned ranks (``ddp_spawn``): at set-up, what ``start`` does in the main process
    (``gc.freeze()``, the collector back on), so a rank's exit skips collecting torch and Lightning (seconds
    per rank). Changes no result."""

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        gc.freeze()
        gc.enable()


def crash_record(exc: BaseException) -> dict[str, str]:
    """A run that raised, as a result: the first line of the error and the end of its traceback.

    Call it inside the ``except`` block (the traceback is the one being handled). A peer that
    crashes is a result to report in the table, not a reason to stop the benchmark.
    """
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "trace": traceback.format_exc()[-2000:]}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quantiles(values: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; with fewer than 4 values, (min, max)."""
    if len(values) < 4:
        return float(min(values)), float(max(values))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (by default a share shown in %); "—" if empty."""
    if not values:
        return "—"
    m, sd = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def ratio_table(results: Mapping[str, Sequence[float]], baseline: str) -> list[dict[str, Any]]:
    """One row per variant: median, IQR, and the ratio of medians vs ``baseline``.

    Also the spread of the ratio: the per-repetition ratios (repetition i of the variant over
    repetition i of the baseline, which ran next to each other) give its min and max.
    """
    base = results[baseline]
    base_med = median(base)
    rows = []
    for name, vals in results.items():
        pairs = [v / b for v, b in zip(vals, base)]
        q1, q3 = quantiles(vals)
        rows.append(
            {
                "variant": name,
                "median": median(vals),
                "q1": q1,
                "q3": q3,
                "ratio": median(vals) / base_med,
                "ratio_min": min(pairs),
                "ratio_max": max(pairs),
                "n": len(vals),
            }
        )
    return rows


def markdown_table(header_row: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header_row) + " |", "|" + "|".join("---" for _ in header_row) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


def command_line() -> str:
    """The command that is running, as it could be retyped from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        head = ["python", os.path.relpath(sys.argv[0], REPO_ROOT)]
    return shlex.join(head + sys.argv[1:])


def header(runtime_s: float | None = None) -> str:
    """One line naming machine, versions, date and command: enough to reproduce or distrust a table."""
    m = machine()
    parts = [
        f"{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads)",
        f"Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}",
        _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    ]
    if runtime_s is not None:
        parts.append(f"runtime {runtime_s:.0f} s")
    return f"_Measured on {'; '.join(parts)}. Command: `{command_line()}`_"


def _section_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)


def data_path(name: str, path: str | Path = "docs/results.md") -> Path:
    """Where the raw numbers of section ``NAME`` live: ``benchmarks/results/NAME.json`` for the
    repository's docs/results.md (committed), ``<stem>-data/NAME.json`` beside any other file."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if path == REPO_ROOT / "docs" / "results.md":
        return REPO_ROOT / "benchmarks" / "results" / f"{name}.json"
    return path.parent / f"{path.stem}-data" / f"{name}.json"


def write_section(name: str, markdown: str, path: str | Path = "docs/results.md", data: Any = None) -> Path:
    """Replace (or append) the ``NAME`` section of ``path``, leaving every other section as it is.

    With ``data``, the raw numbers go to a committed JSON file (``data_path``) and the section
    ends with a link to it: results.md keeps tables, plots and prose.
    """
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    body = markdown.strip()
    if data is not None:
        raw = data_path(name, path)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(_rounded(data), indent=1, default=_json_default) + "\n")
        link = os.path.relpath(raw, path.parent)
        body += f"\n\nRaw data: [{raw.relative_to(REPO_ROOT) if raw.is_relative_to(REPO_ROOT) else raw.name}]({link})"
    block = f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else _RESULTS_INTRO
    pattern = _section_pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_section_data(name: str, path: str | Path = "docs/results.md") -> Any:
    """The raw numbers ``write_section`` stored for the ``NAME`` section (rounded), or None.

    For a benchmark that re-runs part of its table and keeps the rest of the published one.
    """
    raw = data_path(name, path)
    return json.loads(raw.read_text()) if raw.exists() else None


_RESULTS_INTRO = "# Results — written by the scripts in benchmarks/; do not edit sections by hand\n"


def write_json(name: str, data: Any) -> Path:
    """Write ``benchmarks/out/NAME.json`` (git-ignored scratch; published data goes to ``data_path``)."""
    out = REPO_ROOT / "benchmarks" / "out" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=_json_default))
    return out


def _rounded(data: Any, digits: int = 5) -> Any:
    """Floats cut to ``digits`` significant digits: the embedded copy stays short, not lossy in practice."""
    if isinstance(data, float):
        return float(f"{data:.{digits}g}")
    if isinstance(data, dict):
        return {k: _rounded(v, digits) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_rounded(v, digits) for v in data]
    return data


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def publish(name: str, results: dict, runtime_s: float, render, plot, alt: str, quick: bool) -> None:
    """Print a benchmark's markdown; unless ``quick``, also write its plot, JSON and docs section.

    Args:
        name: the section / file name (``docs/results.md`` marker, ``docs/img/NAME.png``).
        results: the measurements; machine facts and the runtime are added here.
        runtime_s: wall time of the measurements.
        render: ``render(results) -> markdown`` (a title line, then the body).
        plot: ``plot(results, path)`` writes the PNG.
        alt: alt text of the plot.
        quick: smoke run: print only, leave docs untouched.
    """
    results["machine"], results["runtime_s"] = machine(), runtime_s
    markdown = render(results)
    if quick:
        print(markdown)
        print(f"[{name}] quick run, docs untouched; {write_json(name + '-quick', results)}")
        return
    img = REPO_ROOT / "docs" / "img" / f"{name}.png"
    plot(results, img)
    markdown = f"{markdown}\n\n![{alt}](img/{img.name})"
    markdown = markdown.replace("\n\n", "\n\n" + header(runtime_s) + "\n\n", 1)  # under the title
    print(markdown)
    write_json(name, results)
    print(f"[{name}] wrote {write_section(name, markdown, data=results)} in {runtime_s:.0f} s")


def main(
    name: str,
    run: Callable[..., dict],
    render: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
    alt: str,
    argv: Sequence[str] | None = None,
    *,
    quick: str,
    threads: int,
    seeds: int | None = None,
    quick_seeds: Callable[[int], int] | None = None,
    seeds_help: str | None = None,
) -> None:
    """A benchmark's command line: parse ``--quick`` (and ``--seeds``), run, time and ``publish``.

    The description is the first paragraph of the docstring of the module that defines ``run``
    (``__main__`` included).

    Args:
        name: the benchmark's name, as for ``publish``.
        run: ``run(quick)``, or ``run(seeds, quick)`` where the benchmark takes ``--seeds``.
        render: as for ``publish``.
        plot: as for ``publish``.
        alt: as for ``publish``.
        argv: the arguments; None reads ``sys.argv``.
        quick: what ``--quick`` shrinks, for its help ("smoke run: QUICK, docs untouched").
        threads: torch threads for the run.
        seeds: the default of ``--seeds N`` (seeds 0..N-1); None: the benchmark has no ``--seeds``.
        quick_seeds: how many seeds a ``--quick`` run uses, given ``--seeds`` (default: as many).
        seeds_help: the help of ``--seeds``, where the default one does not say enough.
    """
    doc = sys.modules[run.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if seeds is not None:
        parser.add_argument("--seeds", type=int, default=seeds, help=seeds_help or f"seeds 0..N-1 (default {seeds})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}, docs untouched")
    args = parser.parse_args(argv)
    start(args.quick, threads)
    t0 = time.perf_counter()
    if seeds is None:
        results = run(args.quick)
    else:
        n = quick_seeds(args.seeds) if args.quick and quick_seeds is not None else args.seeds
        results = run(n, args.quick)
    publish(name, results, time.perf_counter() - t0, render, plot, alt, args.quick)
    if args.quick and run.__module__ != "__main__":
        gc.unfreeze()  # start's gc.freeze, undone for a caller that lives on (a test calling main)


def start(quick: bool, threads: int) -> None:
    """What every benchmark does before measuring: note a smoke run, set the torch threads, quiet Lightning.

    A smoke run uses one thread whatever ``threads`` says: it measures nothing, and on a 2-core
    machine that another job keeps busy, two OpenMP threads wait for each other at every barrier
    (a 13 ms step of ``overhead``'s MLP took 550 ms with two threads, 27 ms with one).

    A smoke run also freezes the objects that exist by now (``gc.freeze``: torch, Lightning and the
    benchmark's modules, ~400,000 objects): a collection then skips them, so ``overhead``'s
    ``gc.collect()`` before each fit takes microseconds instead of ~0.4 s, and the interpreter's exit
    skips its final collection of them (~1 s on a quiet 2-core machine, 5-7 s on a busy one). ``main``
    unfreezes them when a caller that lives on (a test) called it. The collector, which the package
    turns off for a smoke run's imports (``benchmarks/__init__.py``), is back on from here.
    """
    global _SMOKE
    _SMOKE = quick
    torch.set_num_threads(1 if quick else threads)
    quiet_lightning()
    if quick:
        gc.freeze()
        gc.enable()


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
