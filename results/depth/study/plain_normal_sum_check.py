"""Side check of the depth study: its +ICP evaluation with the symmetric metric as difficp had it
before commit 352420e (normal sum n_p + n_q, no orientation of n_p), on the PyTorch reference
path. Re-scores the start network and the finished arms of the given seeds from their final
training checkpoints; writes their +ICP errors (m) to a JSON file.

    PYTHONPATH=src python results/depth/study/plain_normal_sum_check.py 0,1,2 \
        results/depth/study/plain_normal_sum.json
"""

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

import difficp
from difficp._atomic import load_checkpoint
from difficp.metrics import Symmetric
from difficp_experiments.depth.evaluate import network_errors
from difficp_experiments.depth.train import copy_model, load_final

torch.set_num_threads(1)
out = Path("results/depth/study")
nets, scene, _ = load_final(Path("results/depth/pose_cnn.pt"))
data = load_checkpoint(out / "cache/test_seed1_n500_icp64.pt")["data"]
# The reference path (the compiled twin holds the oriented sum) with the old, plain normal sum.
difficp.icp = functools.partial(difficp.icp, search_backend="kdtree")
Symmetric._normal_sum = staticmethod(lambda n_p, corr: n_p + corr.normals)
seeds = [int(s) for s in sys.argv[1].split(",")]
todo = [("start", None)] + [
    (f"seed{s}/{a}", (s, a)) for s in seeds for a in ("pose", "icp", "both")
]
result = {}
for name, key in todo:
    net = nets["nn"]
    if key is not None:
        net = copy_model(nets["nn"])
        state = load_checkpoint(out / f"seed{key[0]}" / "checkpoints" / f"{key[1]}.pt")
        net.load_state_dict(state["model"])
    e = network_errors(net, data, scene, progress=False)["icp"].numpy()
    result[name] = [round(float(x), 7) for x in e]
    print(name, (e < 0.03).mean(), (e < 0.3).mean(), np.median(e), flush=True)
Path(sys.argv[2]).write_text(json.dumps(result))
