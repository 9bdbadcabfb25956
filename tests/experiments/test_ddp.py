"""DCP training under ``torchrun`` with 2 CPU processes (gloo): identical weights on both ranks,
files written by rank 0 only, and a resumed run that ends where an uninterrupted one does.
Needs no data: the shapes are written here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist

import difficp

WORKER = Path(__file__).with_name("_ddp_worker.py")
SRC = Path(difficp.__file__).resolve().parents[1]
# What a rank's C++ runtime prints when it is killed by std::terminate outside any exception.
TEARDOWN_ABORT = "terminate called without an active exception"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """16 random anisotropic shapes of 48 points in the standard ModelNet40 h5 layout."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 48, 3)) * np.array([0.6, 0.35, 0.2])
    x /= np.linalg.norm(x, axis=-1).max(axis=1)[:, None, None]
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    with h5py.File(folder / "ply_data_train0.h5", "w") as f:
        f.create_dataset("data", data=x.astype(np.float32))
        f.create_dataset("label", data=(np.arange(16) % 4).reshape(-1, 1).astype(np.int64))
    return tmp_path


def test_two_processes_train_identical_weights_and_resume(data_root: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        # a rank killed by a signal prints where its Python threads were
        "PYTHONFAULTHANDLER": "1",
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # torchrun sets its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    cmd += ["--nproc_per_node", "2", str(WORKER), str(data_root), str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        # Once in CI (never in 67 runs on the development machine, also under load) a rank
        # aborted in gloo's C++ teardown after training; the runs start afresh: try once more,
        # and leave the abort's traces in the report.
        warnings.warn(f"a rank aborted; retrying once:\n{proc.stderr[-4000:]}", stacklevel=1)
        shutil.rmtree(work)
        work.mkdir()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # 16 shapes, 4 for validation: 12 for training, a global batch of 2 ranks x 2 = 3 steps
    # per epoch, so 4 steps cross an epoch boundary and the interrupted run stops mid-epoch.
    a0, a1 = ((work / f"a_rank{r}.txt").read_text() for r in (0, 1))
    b0, b1 = ((work / f"b_rank{r}.txt").read_text() for r in (0, 1))
    assert a0 == a1  # both ranks end with identical weights and BatchNorm statistics
    assert b0 == b1 == a0  # stopped after 2 steps and resumed: as if never interrupted

    # Only rank 0 wrote files, and the log knows both ranks took part.
    assert sorted(p.name for p in (work / "a").iterdir()) == [
        "best.pt",
        "log.jsonl",
        "model.pt",
        "state.pt",
        "state.pt.prev",
    ]
    records = [json.loads(line) for line in (work / "a" / "log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[0]["world_size"] == 2
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    vals = [r for r in records if r["kind"] == "val"]
    assert vals and all(r["val_pairs"] == 4 and np.isfinite(r["val_rmse_r"]) for r in vals)
    resumed = [json.loads(line) for line in (work / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in resumed if r["kind"] == "start"] == [0, 2]
