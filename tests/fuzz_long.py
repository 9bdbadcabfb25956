"""Longer runs of ``test_fuzz.py``'s generators, outside the suite (not collected by pytest).

    python tests/fuzz_long.py rigid 300 40300       # the rigid generator beyond its 300 cases
    python tests/fuzz_long.py extended 300 30000    # every metric and option
    python tests/fuzz_long.py float32 0 1500        # rigid cases cast to float32

``rigid`` / ``extended``: the checks of the test (fast path vs reference, batched vs alone);
prints every case over the tolerance with the reference's own sensitivity (chaotic when it
exceeds the tolerance: exempt in the test) and the five largest differences. ``float32``: each
path on the float32 inputs against the float64 reference, relative to the scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_fuzz import (
    TOLERANCE,
    _case,
    _differences,
    _extended_case,
    _reference_backend,
    _scale,
    _sensitivity,
)

import difficp


def compare_paths(make_case, seeds: range) -> None:
    largest: list[tuple[float, int, str]] = []
    start = time.perf_counter()
    for seed in seeds:
        inputs, options, n, m = make_case(seed)
        errors = _differences(seed, inputs, options, n, m)
        worst = max(errors, key=lambda e: e[1])
        largest = sorted([*largest, (worst[1], seed, worst[0])], reverse=True)[:5]
        if worst[1] > TOLERANCE:
            probe = _sensitivity(seed, inputs, options)
            kind = "chaotic" if probe > TOLERANCE else "FAIL"
            print(f"{kind} case {seed}: {worst[0]} {worst[1]:.2e}, probe {probe:.2e}, {options}")
        if seed % 1000 == 0:
            print(f"at case {seed}, {time.perf_counter() - start:.0f} s", flush=True)
    print("largest:", ", ".join(f"{e:.2e} (case {s}, {w})" for e, s, w in largest))


def float32_against_float64(seeds: range) -> None:
    rows = []
    for seed in seeds:
        inputs, options, _, _ = _case(seed)
        single = {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()
        }
        backend = _reference_backend(seed)
        truth = difficp.icp(**inputs, search_backend=backend, **options).transform
        scale = _scale(inputs)
        errors = [
            float(
                (difficp.icp(**single, search_backend=b, **options).transform.double() - truth)
                .abs()
                .max()
            )
            / scale
            for b in ("compiled", backend)
        ]
        rows.append((seed, *errors, options["metric"]))
    for name, column in (("compiled", 1), ("PyTorch", 2)):
        values = [r[column] for r in rows]
        far = sorted(rows, key=lambda r: -r[column])[:5]
        print(
            f"{name} path in float32 vs float64 reference: median {statistics.median(values):.1e}"
            f", over 0.1 of the scale: {sum(v > 0.1 for v in values)} of {len(values)}; largest: "
            + ", ".join(f"{r[column]:.1e} (case {r[0]}, {r[3]})" for r in far)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("generator", choices=["rigid", "extended", "float32"])
    parser.add_argument("first", type=int)
    parser.add_argument("stop", type=int)
    args = parser.parse_args()
    seeds = range(args.first, args.stop)
    if args.generator == "float32":
        float32_against_float64(seeds)
    else:
        compare_paths(_case if args.generator == "rigid" else _extended_case, seeds)


if __name__ == "__main__":
    main()
