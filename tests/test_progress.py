"""Progress of long runs: the ``progress`` callback of :func:`difficp.icp` /
:func:`difficp.multiscale_icp`, and the lines ``difficp register`` prints on stderr with it."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import difficp
from difficp.cli import main
from difficp.commands.register import ProgressPrinter
from difficp.io import write_point_cloud
from difficp.loop import Progress
from difficp.sampling import multiscale_icp

from conftest import make_pair


@pytest.mark.parametrize("backend", ["kdtree", "compiled"])
def test_icp_reports_every_iteration(backend: str) -> None:
    p = make_pair(0, n=400, angle=10, translation=0.1, noise=0.002)
    seen: list[Progress] = []
    result = difficp.icp(
        p["source"], p["target"], max_distance=0.2, return_history=True,
        search_backend=backend, progress=seen.append,
    )  # fmt: skip
    # Once before any step, then once per iteration, with the loop's own numbers.
    assert [s.iteration for s in seen] == list(range(int(result.iterations) + 1))
    assert all(s.max_iterations == 30 and s.stages == 1 for s in seen)
    assert result.rmse_history is not None
    rmse = torch.stack([s.inlier_rmse[0] for s in seen])
    torch.testing.assert_close(rmse, result.rmse_history.to(rmse.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[-1].fitness[0].double(), result.fitness.double())
    assert bool(result.converged) and seen[-1].active == 0  # converged: no pair left active


def test_multiscale_reports_its_stages() -> None:
    p = make_pair(1, n=600, angle=10, translation=0.1, noise=0.002)
    seen: list[Progress] = []
    multiscale_icp(p["source"], p["target"], [(0.1, 0.3, 5), (None, 0.1, 5)], progress=seen.append)
    stages = [(s.stage, s.stages) for s in seen]
    assert stages[0] == (0, 2) and stages[-1] == (1, 2)
    assert sorted(set(stages)) == [(0, 2), (1, 2)]
    assert next(s.iteration for s in seen if s.stage == 1) == 0  # each stage starts at 0


def _progress(i: int, stage: int = 0, stages: int = 1) -> Progress:
    one = torch.ones(1, dtype=torch.float64)
    return Progress(i, 30, 0.5 * one, 0.01 * one, 1, stage, stages)


def test_printer_overwrites_one_line_on_a_terminal_and_appends_elsewhere() -> None:
    tty, log = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (log, False)):
        printer = ProgressPrinter(stream, tty=is_tty)
        printer.start(100, 200)
        printer(_progress(0, 0, 2))
        printer(_progress(12, 1, 2))
        printer.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and "100 source / 200 target points" in lines[0]
    assert "stage 1/2 iteration 0/30 fitness 0.500000 inlier_rmse 0.01" in lines[1]
    assert "stage 2/2 iteration 12/30" in lines[2]
    # On a terminal: the start line, then one line rewritten in place and ended once.
    text = tty.getvalue()
    assert text.count("\n") == 2 and text.endswith("\n")
    assert text.split("\n")[1].count("\r") == 2 and "iteration 12/30" in text.split("\r")[-1]


@pytest.fixture
def files(tmp_path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, size=(1500, 2))
    target = np.c_[xy, 0.3 * np.sin(2 * xy[:, 0]) * np.cos(3 * xy[:, 1])]
    angle = math.radians(8)
    R = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    src, tgt = str(tmp_path / "s.xyz"), str(tmp_path / "t.xyz")
    write_point_cloud(src, (target - np.array([0.05, -0.03, 0.02])) @ R)
    write_point_cloud(tgt, target)
    return src, tgt


def test_register_progress_goes_to_stderr_only_when_asked(files, capsys) -> None:
    src, tgt = files
    base = ["register", src, tgt, "--max-distance", "0.2", "--threads", "1"]
    assert main([*base, "--progress"]) == 0
    out, err = capsys.readouterr()
    iterations = int(next(ln.split(":")[1] for ln in out.splitlines() if ln.startswith("iter")))
    lines = [ln for ln in err.splitlines() if "iteration" in ln]
    assert [ln.split("iteration ")[1].split("/")[0] for ln in lines] == [
        str(i) for i in range(iterations + 1)
    ]
    assert "ICP on 1500 source / 1500 target points" in err
    assert "difficp register:" not in out  # the report on stdout stays parseable
    # Not a terminal (captured) and no --progress: silent, and --no-progress silences a tty.
    assert main(base) == 0
    assert "iteration " not in capsys.readouterr().err
    assert main([*base, "--no-progress"]) == 0
    assert "iteration " not in capsys.readouterr().err


def test_register_progress_of_multiscale_names_the_stage(files, capsys) -> None:
    src, tgt = files
    scales = "0.2:0.5:5,none:0.1:5"
    assert main(["register", src, tgt, "--scales", scales, "--progress", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "stage 1/2 iteration 0/5" in err and "stage 2/2 iteration 0/5" in err
