"""Benchmarks stay runnable: each one's --quick smoke run (prints, leaves docs untouched)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ema_overhead", "averaging_quality", "pruning_overhead", "pruning_quality",
                                  "dst_overhead", "dst_quality", "qat_overhead", "qat_quality", "real_models"])
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
