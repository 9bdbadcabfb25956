"""The benchmark scripts that only a GPU machine runs in earnest, run here at toy sizes on the
CPU: a GPU session is short, and a script that fails there wastes it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from difficp.datadir import find_data_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_dry_run_measures_every_part() -> None:
    data = find_data_dir()
    if data is None or not (data / "modelnet10").is_dir():
        pytest.skip("needs the data folder's modelnet10 (DIFFICP_DATA)")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "CUDA tests:" in out and "FAILED" not in out
    for case in ("difficp, no gradient", "difficp nearest, unroll", "difficp soft top-16, unroll",
                 "difficp soft top-16, implicit", "naive dense soft ICP (PyTorch)"):  # fmt: skip
        assert out.count(f"| {case} |") == 2, case  # both problem sizes
    assert "2 x 1500 points" in out and "2 x 1024 points" in out
    assert "| batch of 4 x 1024, 30 iterations, no gradient |" in out
    assert "| blocked k-NN, k=16, 2000 x 2000 |" in out
    assert "skipped: time budget spent" not in out and "out of memory" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_gpu_benchmark_without_cuda_says_so_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout


def _gpu_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_reports_out_of_memory_and_the_spent_budget() -> None:
    gpu = _gpu_module()
    calls = {"fits": 0, "too big": 0}

    def fits() -> None:
        calls["fits"] += 1

    def too_big() -> None:
        calls["too big"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory")

    runs = {"fits": fits, "too big": too_big}
    measured = gpu.measure(runs, 3, "cpu", gpu.Clock(60.0))
    assert isinstance(measured["fits"][0], float) and calls["fits"] == 4  # warm-up + 3
    assert measured["too big"][0] == "out of memory" and calls["too big"] == 1  # not retried
    spent = gpu.measure(runs, 3, "cpu", gpu.Clock(0.0))
    assert spent["fits"][0] == spent["too big"][0] == "skipped: time budget spent"
    assert calls["fits"] == 4  # nothing started once the budget was spent


@pytest.mark.slow
def test_evaluation_benchmark_agrees_with_open3d() -> None:
    """``benchmarks/evaluation.py`` runs (one repeat) and its rows say that difficp and Open3D
    agree: the README's table must come from a script that still works."""
    pytest.importorskip("open3d")
    data = find_data_dir()
    if data is None or not (data / "scans" / "open3d_3dmatch_pair").is_dir():
        pytest.skip("needs the data folder's scans and modelnet10 (DIFFICP_DATA)")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "evaluation.py"), "--repeats", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 3dmatch") or
            line.startswith("| modelnet")]  # fmt: skip
    assert len(rows) == 2, done.stdout
    for row in rows:
        difference = float(row.strip("|").split("|")[-1])
        assert difference < 1e-9, row
