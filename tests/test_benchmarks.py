"""Benchmarks stay runnable: each one's --quick smoke run (prints, leaves docs untouched)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["overhead", "ema_overhead", "averaging_quality", "pruning_overhead",
                                  "pruning_quality", "dst_overhead", "dst_quality", "qat_overhead", "qat_quality",
                                  "real_models", "sharded", "sparse_ddp", "merging", "export_size"])
def test_benchmark_quick_run(name):
    before = (ROOT / "docs" / "results.md").read_text()
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[{name}] quick run, docs untouched" in result.stdout
    assert "|---" in result.stdout  # it rendered its tables
    assert (ROOT / "docs" / "results.md").read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reweighting_quality", "data_pruning", "reweighting_overhead"])
def test_reweighting_benchmark_quick_run(name):
    test_benchmark_quick_run(name)


def test_quick_runs_never_wait_for_a_quiet_machine(monkeypatch):
    # On a busy machine (the test suite itself, or a second job) waiting for quiet could outlast
    # the 600 s limit above: a --quick run ignores the foreign-load guard.
    from benchmarks import harness

    def never(*args, **kwargs):
        raise AssertionError("a --quick run waited for a quiet machine")

    monkeypatch.setattr(harness, "wait_for_quiet", never)
    monkeypatch.setattr(harness, "publish", lambda *args, **kwargs: None)
    monkeypatch.setattr(harness, "quiet_lightning", lambda: None)  # leave this process's logging alone
    monkeypatch.setattr(harness, "_SMOKE", False, raising=False)
    threads = torch.get_num_threads()
    calls = []

    def run(quick):
        calls.append(harness.interleaved({"a": lambda: 1.0, "b": lambda: 2.0}, 2, max_foreign=0.0))
        return {}

    try:
        harness.main("smoke", run, lambda r: "", lambda r, p: None, "", ["--quick"], quick="nothing", threads=threads)
        assert calls == [{"a": [1.0, 1.0], "b": [2.0, 2.0]}]
        assert torch.get_num_threads() == 1  # a smoke run measures nothing: one thread, robust on a busy machine
        with pytest.raises(AssertionError, match="waited"):  # without --quick the guard is on
            harness.main("smoke", run, lambda r: "", lambda r, p: None, "", [], quick="nothing", threads=threads)
    finally:
        torch.set_num_threads(threads)  # leave this process as it was


def test_a_partial_overhead_run_keeps_the_rest_of_the_published_table(tmp_path):
    # --model / --variants re-run part of the table (a GPU run must fit a 10-minute command): the
    # rows not re-run come back from the data the section embeds; re-run rows replace theirs.
    from benchmarks import harness, overhead

    path = tmp_path / "results.md"
    old = {"models": {"mlp": {"name": "MLP", "rows": {"plain": {"median": 0.01, "date": "old"},
                                                      "EMA": {"ratio": 1.5, "date": "old"}}},
                      "lm": {"name": "LM", "rows": {"plain": {"median": 0.1, "date": "old"}}}}}
    harness.write_section("overhead", "## old", path=path, data=old)
    assert harness.read_section_data("overhead", path) == old
    text = path.read_text()  # the numbers live in a linked file, not in the markdown
    assert "Raw data: [" in text and "(results-data/overhead.json)" in text and '"median"' not in text
    new = {"settings": {"repeats": 2}, "models": {"mlp": {"name": "MLP", "rows": {"plain": {"median": 0.02, "date": "new"},
                                                                                  "SWA": {"ratio": 1.1, "date": "new"}}}}}
    out = overhead.merged("overhead", new, path)
    assert out["settings"] == {"repeats": 2}
    assert out["models"]["lm"] == old["models"]["lm"]
    assert out["models"]["mlp"]["rows"] == {"plain": {"median": 0.02, "date": "new"}, "EMA": {"ratio": 1.5, "date": "old"},
                                            "SWA": {"ratio": 1.1, "date": "new"}}
    assert overhead.merged("absent", new, path)["models"] == new["models"]
