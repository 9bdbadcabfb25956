"""Time of the first ``difficp.icp`` in a fresh environment: a new process with an empty numba
cache (``NUMBA_CACHE_DIR`` a new temporary directory), as after ``pip install``.

Rows: the first call with the default ``DIFFICP_COMPILE=background`` (the PyTorch path while a
background process compiles; the script waits for that process before going on), then the first
call of a new process once that cache is written, then (``--compile``) the first call with
``DIFFICP_COMPILE=now`` in another empty cache (compiling in the calling process). Each row is the
wall time of the whole child process, imports included, and of the call alone.

    python benchmarks/first_use.py [--points 100] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, time
start = time.perf_counter()
import torch, difficp
from difficp import compile_cache, fused  # noqa: F401  (imported by the call anyway)
imported = time.perf_counter()
g = torch.Generator().manual_seed(0)
source = torch.rand({points}, 3, generator=g, dtype=torch.float64)
difficp.icp(source, source + 0.01, max_distance=0.1)
done = time.perf_counter()
background = compile_cache._background
print(json.dumps({{"import_s": imported - start, "call_s": done - imported,
                  "pid": None if background is None else background.pid}}))
"""


def child(points: int, cache: str, mode: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "DIFFICP_COMPILE": mode}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(points=points)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def wait_for(pid: int | None) -> float:
    """Seconds until process ``pid`` (the background compile) has exited."""
    start = time.perf_counter()
    while pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="also DIFFICP_COMPILE=now")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.points} points\n")
    print("| first call | process s | import s | call s |")
    print("|---|---:|---:|---:|")

    def row(name: str, r: dict) -> None:
        print(f"| {name} | {r['process_s']:.1f} | {r['import_s']:.1f} | {r['call_s']:.2f} |")

    with tempfile.TemporaryDirectory() as cache:
        first = child(args.points, cache, "background")
        row("fresh cache (PyTorch path, compiling in the background)", first)
        waited = wait_for(first["pid"])
        print(f"| (background compile finished {waited:.0f} s after the call) | | | |")
        row("next process, cache written", child(args.points, cache, "background"))
    if args.compile:
        with tempfile.TemporaryDirectory() as cache:
            row("fresh cache, DIFFICP_COMPILE=now (compiles in the call)", child(args.points, cache, "now"))  # fmt: skip


if __name__ == "__main__":
    main()
