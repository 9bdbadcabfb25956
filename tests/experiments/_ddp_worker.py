"""Run by ``torchrun`` from ``test_ddp.py``: tiny DCP-v2 trainings on every rank.

Usage: ``_ddp_worker.py DATA_DIR WORK``. In one process group (joined here, so the three runs
share it): run ``WORK/a`` trains 4 steps straight; run ``WORK/b`` trains 2 steps, stops, and is
resumed from its saved state to 4 steps. Each rank writes the digest of its final weights and
buffers to ``WORK/a_rank<R>.txt`` and ``WORK/b_rank<R>.txt``.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from difficp_experiments.modelnet.train_dcp import TrainConfig, run_training


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    data_dir, work = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = TrainConfig(
        data_dir=data_dir,
        out=str(work / "a"),
        dataset="modelnet40",
        init_weights=None,
        epochs=2,
        max_steps=4,
        batch_size=2,
        num_points=32,
        emb_dims=16,
        k=4,
        n_heads=2,
        ff_dims=16,
        val_fraction=0.25,
        val_pairs=4,
        val_every=2,
        log_every=1,
        lr=1e-3,
    )
    (work / f"a_rank{rank}.txt").write_text(digest(run_training(cfg)))
    cfg_b = replace(cfg, out=str(work / "b"), max_steps=2)
    run_training(cfg_b)
    resumed = run_training(replace(cfg_b, max_steps=4), resume=True)
    (work / f"b_rank{rank}.txt").write_text(digest(resumed))
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
