"""Would a C++ core make the KD-tree search faster? The same cold nearest-neighbour search (the
split-plane descent of :mod:`difficp.kdtree`) written in C++ and in numba, on the same forest
arrays, against the library's own ``kdtree.nearest``.

A question for the speed goals (issue 12), not part of difficp: it needs a C++ compiler (``g++``;
the script says so and exits 0 without one), builds a throwaway shared library in a temporary
folder and calls it through ctypes. Queries: 64 ModelNet10 pairs of 1024 points, as given
(misaligned) and moved by their true transforms (aligned); one thread; medians of interleaved
repeats.

    DIFFICP_DATA=../shared/data python benchmarks/search_cpp.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import modelnet_batch

from difficp.datadir import require_data_dir
from difficp.kdtree import STACK_DEPTH, KDForest, build_forest, nearest

SOURCE = r"""
#include <cstdint>
extern "C" void nearest_rows(const double* Q, int64_t B, int64_t N, const double* points,
    const int64_t* point_offset, const int64_t* node_offset, const int64_t* node_start,
    const int64_t* node_end, const int64_t* node_child, const int64_t* node_axis,
    const double* node_split, double radius2, int64_t* out) {
  int64_t stack[96];
  double stack_d2[96];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = node_offset[b], pb = point_offset[b];
    for (int64_t i = 0; i < N; ++i) {
      const double* q = Q + 3 * (b * N + i);
      double d1 = radius2;
      int64_t i1 = -1;
      int top = 1;
      stack[0] = nb;
      stack_d2[0] = 0.0;
      while (top > 0) {
        --top;
        const double node_d2 = stack_d2[top];
        if (!(node_d2 < d1)) continue;
        int64_t node = stack[top];
        for (;;) {
          const int64_t first = node_child[node];
          if (first < 0) {
            for (int64_t j = pb + node_start[node]; j < pb + node_end[node]; ++j) {
              const double dx = points[3 * j] - q[0], dy = points[3 * j + 1] - q[1],
                           dz = points[3 * j + 2] - q[2];
              const double d = dx * dx + dy * dy + dz * dz;
              if (d < d1) { d1 = d; i1 = j; }
            }
            break;
          }
          const double offset = q[node_axis[node]] - node_split[node];
          int64_t near = nb + first, far = near + 1;
          if (offset >= 0.0) { const int64_t t = near; near = far; far = t; }
          const double far_d2 = offset * offset > node_d2 ? offset * offset : node_d2;
          if (far_d2 < d1) { stack[top] = far; stack_d2[top] = far_d2; ++top; }
          node = near;
        }
      }
      out[b * N + i] = i1;
    }
  }
}
"""


@njit(cache=False, error_model="numpy")
def numba_rows(queries: np.ndarray, f: KDForest, radius2: float, out: np.ndarray) -> None:
    """The C++ function above, line for line, in numba."""
    B, N = queries.shape[0], queries.shape[1]
    stack = np.empty(STACK_DEPTH, np.int64)
    stack_d2 = np.empty(STACK_DEPTH)
    q = np.empty(3)
    for b in range(B):
        nb, pb = f.node_offset[b], f.point_offset[b]
        for i in range(N):
            q[0], q[1], q[2] = queries[b, i, 0], queries[b, i, 1], queries[b, i, 2]
            d1, i1 = radius2, -1
            stack[0], stack_d2[0] = nb, 0.0
            top = 1
            while top > 0:
                top -= 1
                node_d2 = stack_d2[top]
                if not node_d2 < d1:
                    continue
                node = stack[top]
                while True:
                    first = f.node_child[node]
                    if first < 0:
                        for j in range(pb + f.node_start[node], pb + f.node_end[node]):
                            dx = f.points[j, 0] - q[0]
                            dy = f.points[j, 1] - q[1]
                            dz = f.points[j, 2] - q[2]
                            d = dx * dx + dy * dy + dz * dz
                            if d < d1:
                                d1, i1 = d, j
                        break
                    offset = q[f.node_axis[node]] - f.node_split[node]
                    near = nb + first
                    far = near + 1
                    if offset >= 0.0:
                        near, far = far, near
                    far_d2 = max(offset * offset, node_d2)
                    if far_d2 < d1:
                        stack[top], stack_d2[top] = far, far_d2
                        top += 1
                    node = near
            out[b, i] = i1


def compile_library(folder: Path) -> ctypes.CDLL:
    source = folder / "nearest.cpp"
    source.write_text(SOURCE)
    library = folder / "libnearest.so"
    command = ["g++", "-O3", "-march=native", "-shared", "-fPIC", str(source), "-o", str(library)]
    subprocess.run(command, check=True)
    lib = ctypes.CDLL(str(library))
    pointer = ctypes.c_void_p
    lib.nearest_rows.argtypes = (
        [pointer, ctypes.c_int64, ctypes.c_int64]
        + [pointer] * 8
        + [
            ctypes.c_double,
            pointer,
        ]
    )
    return lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--max-distance", type=float, default=0.2)
    args = parser.parse_args()
    if shutil.which("g++") is None:
        print("benchmarks/search_cpp.py: no g++ here; skipped")
        return 0
    numba.set_num_threads(1)
    batch = 64
    source, target, truth = modelnet_batch(require_data_dir(), batch)
    misaligned = np.ascontiguousarray(source.double().numpy())
    T = truth.double().numpy()
    aligned = np.ascontiguousarray(
        np.einsum("bij,bnj->bni", T[:, :3, :3], misaligned) + T[:, None, :3, 3]
    )
    f = build_forest(target.double().numpy(), np.full(batch, target.shape[1]))
    radius2 = args.max_distance**2
    with tempfile.TemporaryDirectory() as folder:
        lib = compile_library(Path(folder))
        print(f"g++ -O3 -march=native vs numba {numba.__version__}, one thread, {batch} x 1024")
        print(
            "| queries | C++ ms | numba (same code) ms | difficp.kdtree.nearest ms | C++ / numba |"
        )
        print("|---|---|---|---|---|")
        for name, queries in (("misaligned", misaligned), ("aligned", aligned)):
            out_cpp = np.empty(queries.shape[:2], np.int64)
            out_numba = np.empty_like(out_cpp)

            def run_cpp(q: np.ndarray = queries, out: np.ndarray = out_cpp) -> None:
                arrays = (f.points, f.point_offset, f.node_offset, f.node_start, f.node_end,
                          f.node_child, f.node_axis, f.node_split)  # fmt: skip
                lib.nearest_rows(q.ctypes.data, q.shape[0], q.shape[1],
                                 *(a.ctypes.data for a in arrays), radius2, out.ctypes.data)  # fmt: skip

            runs: dict[str, Callable[[], object]] = {
                "cpp": run_cpp,
                "numba": lambda q=queries, out=out_numba: numba_rows(q, f, radius2, out),
                "library": lambda q=queries: nearest(f, q, max_distance=args.max_distance),
            }
            times: dict[str, list[float]] = {key: [] for key in runs}
            for round_ in range(args.repeats + 1):
                for key, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if round_:
                        times[key].append(time.perf_counter() - start)
            assert (out_cpp == out_numba).all(), "the two twins disagree"
            ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}
            print(f"| {name} | {ms['cpp']:.1f} | {ms['numba']:.1f} | {ms['library']:.1f} | "
                  f"{ms['cpp'] / ms['numba']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
