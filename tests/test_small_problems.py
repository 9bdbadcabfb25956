"""Small problems and first use: the fast path's serial whole loop (difficp.fused.run_loop on
FusedSteps), the PyTorch path while the fast path is not compiled yet, ``difficp warmup``, and
an import of the fast path that leaves roma / torch._dynamo / scipy.spatial unloaded."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import difficp
from difficp import compile_cache, express, fused
from difficp.commands import warmup
from difficp.loop import LoopResult

from conftest import make_pair


def _batch(seeds: list[int], n: int) -> dict:
    """Pairs of ``n`` points (padded to the largest, with lengths) and normals, stacked."""
    pairs = [make_pair(seed, n=n - 7 * i, noise=0.003, overlap=0.8) for i, seed in enumerate(seeds)]
    size = max(p["source"].shape[0] for p in pairs)
    target_size = max(p["target"].shape[0] for p in pairs)

    def pad(key: str, rows: int) -> torch.Tensor:
        out = torch.zeros(len(pairs), rows, 3, dtype=torch.float64)
        for b, p in enumerate(pairs):
            out[b, : p[key].shape[0]] = p[key]
        return out

    return {
        "source": pad("source", size),
        "target": pad("target", target_size),
        "source_normals": pad("source_normals", size),
        "target_normals": pad("target_normals", target_size),
        "source_lengths": torch.tensor([p["source"].shape[0] for p in pairs]),
        "target_lengths": torch.tensor([p["target"].shape[0] for p in pairs]),
    }


def _icp(p: dict, **options) -> difficp.ICPResult:
    return difficp.icp(p["source"], p["target"], **{k: v for k, v in p.items() if k not in ("source", "target")}, search_backend="compiled", **options)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"max_distance": 0.1},
        {"max_distance": 0.1, "metric": "point_to_plane", "return_history": True},
        {
            "max_distance": 0.1,
            "metric": "symmetric",
            "robust_kernel": "cauchy",
            "kernel_scale": 0.02,
        },
        # two iterations at most: pairs stop unconverged; a tight radius loses pairs
        {"max_distance": 0.1, "max_iterations": 2, "return_history": True},
        {"max_distance": 0.004, "return_history": True},
    ],
)
def test_serial_whole_loop_matches_the_lock_step_iterations(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    p = _batch([0, 1, 2], n=300)
    runs = []
    # every problem serial (one thread), then none (the whole loop on the thread pool), then
    # the lock-step iterations of difficp.loop.run_loop (a progress callback asks for them)
    for serial_points, progress in ((10**9, None), (0, None), (10**9, lambda _: None)):
        monkeypatch.setattr(fused, "SERIAL_POINTS", serial_points)
        calls: list[LoopResult | None] = []
        original = fused.FusedSteps.run_loop

        def spy(self, *args, original=original, calls=calls):
            calls.append(result := original(self, *args))
            return result

        monkeypatch.setattr(fused.FusedSteps, "run_loop", spy)
        runs.append(_icp(p, progress=progress, **options))
        assert len(calls) == (progress is None) and all(c is not None for c in calls)
    serial, pooled, lock_step = runs
    for name in ("transform", "inlier_rmse"):
        torch.testing.assert_close(getattr(serial, name), getattr(pooled, name), atol=0, rtol=0)
    for name in ("fitness", "iterations", "converged"):
        assert torch.equal(getattr(serial, name), getattr(pooled, name))
    torch.testing.assert_close(serial.transform, lock_step.transform, atol=1e-13, rtol=0)
    assert torch.equal(serial.fitness, lock_step.fitness)
    torch.testing.assert_close(serial.inlier_rmse, lock_step.inlier_rmse, atol=1e-13, rtol=0)
    assert torch.equal(serial.iterations, lock_step.iterations)
    assert torch.equal(serial.converged, lock_step.converged)
    if lock_step.rmse_history is None:
        assert serial.rmse_history is None
    else:
        assert serial.rmse_history is not None
        assert serial.rmse_history.shape == lock_step.rmse_history.shape
        torch.testing.assert_close(serial.rmse_history, lock_step.rmse_history, atol=1e-13, rtol=0)


def test_a_very_large_problem_runs_the_interruptible_lock_step_iterations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = _batch([0, 1], n=300)
    results: list[LoopResult | None] = []
    original = fused.FusedSteps.run_loop

    def spy(self, *args):
        results.append(result := original(self, *args))
        return result

    monkeypatch.setattr(fused.FusedSteps, "run_loop", spy)
    whole = _icp(p, max_distance=0.1)
    B, N = p["source"].shape[:2]
    monkeypatch.setattr(fused, "WHOLE_LOOP_POINTS", B * N - 1)  # just below this batch
    lock_step = _icp(p, max_distance=0.1)
    assert results[0] is not None and results[1] is None
    torch.testing.assert_close(whole.transform, lock_step.transform, atol=1e-13, rtol=0)
    assert torch.equal(whole.iterations, lock_step.iterations)


def test_auto_runs_pytorch_while_the_fast_path_compiles_in_the_background(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(compile_cache, "lock_path", lambda: tmp_path / "compile.lock")
    p = make_pair(3, n=200)
    started: list[list[str]] = []

    class FakePopen:
        def __init__(self, command: list[str], **kwargs) -> None:
            started.append(command)
            assert kwargs["env"]["DIFFICP_COMPILE"] == "now"  # the child compiles, never spawns

    monkeypatch.setattr(fused, "compiled_ready", lambda *args, **kwargs: False)
    monkeypatch.setattr(compile_cache.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(compile_cache, "_background", None)
    monkeypatch.setattr(compile_cache, "_announced", set())
    monkeypatch.setenv("DIFFICP_COMPILE", "background")
    chosen: list[str] = []
    original = fused.FusedSteps.__init__

    def spy(self, *args) -> None:
        chosen.append("fused")
        original(self, *args)

    monkeypatch.setattr(fused.FusedSteps, "__init__", spy)
    express_icp = express.express_icp

    def express_spy(*args):
        result = express_icp(*args)
        if result is not None:
            chosen.append("express")  # the fast path of a single small pair
        return result

    monkeypatch.setattr(express, "express_icp", express_spy)
    with caplog.at_level(logging.WARNING, logger="difficp"):
        first = difficp.icp(p["source"], p["target"], max_distance=0.1)
        difficp.icp(p["source"], p["target"], max_distance=0.1)
    assert chosen == []  # the PyTorch path, twice
    assert len(started) == 1
    assert started[0][-3:] == ["difficp.commands.warmup", "--quiet", "--background"]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "background" in caplog.records[0].message
    # DIFFICP_COMPILE=now compiles here; search_backend="compiled" always runs the fast path
    monkeypatch.setenv("DIFFICP_COMPILE", "now")
    fast = difficp.icp(p["source"], p["target"], max_distance=0.1)
    monkeypatch.setenv("DIFFICP_COMPILE", "background")
    difficp.icp(p["source"], p["target"], max_distance=0.1, search_backend="compiled")
    assert chosen == ["express", "express"] and len(started) == 1
    torch.testing.assert_close(first.transform, fast.transform, atol=1e-9, rtol=0)
    monkeypatch.setenv("DIFFICP_COMPILE", "later")
    with pytest.raises(ValueError, match="DIFFICP_COMPILE"):
        difficp.icp(p["source"], p["target"], max_distance=0.1)


@contextlib.contextmanager
def _lock_held_elsewhere(path: Path) -> Iterator[None]:
    """Hold ``path`` with flock through another open file, as another process would."""
    fcntl = pytest.importorskip("fcntl")
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def test_one_compile_at_a_time_per_installation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a fresh install hit by many processes at once must not start a compile in each
    lock = tmp_path / "compile.lock"
    monkeypatch.setattr(compile_cache, "lock_path", lambda: lock)
    started: list[list[str]] = []
    monkeypatch.setattr(
        compile_cache.subprocess, "Popen", lambda command, **kwargs: started.append(command)
    )
    monkeypatch.setattr(compile_cache, "_background", None)
    monkeypatch.setenv("DIFFICP_COMPILE", "background")
    assert not compile_cache.compile_running()
    with _lock_held_elsewhere(lock):
        assert compile_cache.compile_running()
        assert compile_cache.compile_or_fall_back(False) is False
        assert started == []  # another process compiles: start nothing, run PyTorch
        # the background warmup a racing process started exits without compiling
        monkeypatch.setattr(warmup, "warm_up", lambda: pytest.fail("compiled twice"))
        assert warmup.main(["--quiet", "--background"]) == 0
        # DIFFICP_COMPILE=now waits for the other compile instead of compiling beside it
        monkeypatch.setenv("DIFFICP_COMPILE", "now")
        answer: list[bool] = []
        waiter = threading.Thread(
            target=lambda: answer.append(compile_cache.compile_or_fall_back(False))
        )
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive() and answer == []
    waiter.join(timeout=30)
    assert answer == [True]
    assert not compile_cache.compile_running()
    monkeypatch.setenv("DIFFICP_COMPILE", "background")
    assert compile_cache.compile_or_fall_back(False) is False
    assert len(started) == 1  # the lock is free: this process starts the one compile


def test_warmup_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(warmup, "warm_up", lambda: 1.5)
    assert warmup.main([]) == 0
    assert "compiled (1.5 s)" in capsys.readouterr().out
    assert warmup.main(["--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_the_fast_path_imports_no_roma_dynamo_or_scipy() -> None:
    # roma loads torch._dynamo (2-4 s of a first call); the fast path needs neither nor scipy
    code = (
        "import sys, difficp.registration, difficp.fused; "
        "print(sorted(m for m in ('roma', 'torch._dynamo', 'scipy.spatial') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kernels_cached_reads_the_disk_cache_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked on every call: a kernel found in numba's disk cache is not looked up again (the
    index read measured ~1 ms per small ICP call), one not found is."""
    reads: list[str] = []

    class Kernel:
        def __init__(self, name: str, cached: bool) -> None:
            self.signatures: list = []

            def load_index() -> dict:
                reads.append(name)
                return {"entry": 1} if cached else {}

            index = type("CacheFile", (), {"_load_index": staticmethod(load_index)})
            self._cache = type("Cache", (), {"_cache_file": index})

    monkeypatch.setattr(compile_cache, "_ready", set())
    cached, missing = Kernel("cached", True), Kernel("missing", False)
    assert compile_cache.kernels_cached([cached]) and compile_cache.kernels_cached([cached])
    assert not compile_cache.kernels_cached([cached, missing])
    assert not compile_cache.kernels_cached([missing])
    assert reads == ["cached", "missing", "missing"]
