"""The express lane of single small pairs (:mod:`difficp.express`): it gives the general path's
result bit for bit, takes the calls it should, and leaves every other call (bad input, warnings,
gradients, batches) to the general path, which then behaves as it always did."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import difficp
from difficp import express

from conftest import make_pair, random_pose

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Options the compiled path supports, mixed by the property test below.
METRICS = [
    {"metric": "point_to_point"},
    {"metric": "point_to_point", "solver": "linear"},
    {"metric": "point_to_plane"},
    {"metric": "symmetric"},
]
EXTRAS = [
    {},
    {"weight_distance": True},
    {"robust_kernel": "huber", "kernel_scale": 0.02},
    {"rejection": "soft", "rejection_temperature": 0.01},
    {"max_normal_angle": 40.0},
    {"weight_normal": True},
    {"translation_tolerance": 1e-4, "rotation_tolerance": 0.01},
    {"criteria_scale": "relative", "relative_rmse": 1e-7},
    {"return_history": True, "max_iterations": 3},
]


@pytest.fixture
def lane(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each :func:`difficp.icp` call took the express lane (True) or was handed on."""
    taken: list[bool] = []
    original = express.express_icp

    def spy(*args: object) -> difficp.ICPResult | None:
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(express, "express_icp", spy)
    return taken


def _general(monkeypatch: pytest.MonkeyPatch, *args: object, **kwargs: object) -> difficp.ICPResult:
    """:func:`difficp.icp` with the express lane closed: the general path."""
    with monkeypatch.context() as m:
        m.setattr(express, "express_icp", lambda *a: None)
        return difficp.icp(*args, **kwargs)  # type: ignore[arg-type]


def _assert_identical(a: difficp.ICPResult, b: difficp.ICPResult) -> None:
    for name in ("transform", "fitness", "inlier_rmse", "iterations", "converged"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), (name, x, y)
    if b.rmse_history is None:
        assert a.rmse_history is None
    else:
        assert a.rmse_history is not None
        assert a.rmse_history.dtype == b.rmse_history.dtype
        assert torch.equal(a.rmse_history, b.rmse_history)


# How the clouds come: one pair, batches of one ((1, N, 3): kept in the result), batches of
# several pairs (each its own target, or one target for all).
LAYOUTS = [
    "pair",
    "source batch of one",
    "target batch of one",
    "both batches of one",
    "batch",
    "batch, one target",
]


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 400),
    dtypes=st.sampled_from(
        [(torch.float64,) * 2, (torch.float32,) * 2, (torch.float32, torch.float64)]
    ),
    metric=st.sampled_from(METRICS),
    extra=st.sampled_from(EXTRAS),
    max_distance=st.sampled_from([None, 0.05, 0.3]),
    with_init=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    batch=st.integers(2, 4),
)
def test_the_lane_gives_the_general_paths_result_bit_for_bit(
    seed: int,
    n: int,
    dtypes: tuple[torch.dtype, torch.dtype],
    metric: dict,
    extra: dict,
    max_distance: float | None,
    with_init: bool,
    layout: str,
    batch: int,
) -> None:
    if extra.get("weight_distance") and max_distance is None:
        max_distance = 0.3  # the compiled path needs it with weight_distance
    B = batch if layout.startswith("batch") else 1
    pairs = [make_pair(seed + b, n=n, angle=8, translation=0.08, noise=0.002) for b in range(B)]
    source_dtype, target_dtype = dtypes
    options = {**metric, **extra, "max_distance": max_distance}
    config = difficp.ICPConfig(**options)
    inits = [random_pose(torch.Generator().manual_seed(seed + b), 3, 0.02) for b in range(B)]

    def stacked(key: str, one: bool = False) -> torch.Tensor:
        return torch.stack([p[key] for p in pairs[: 1 if one else B]])

    # normals where the options read them, and on odd seeds also where they do not (unused)
    arguments: dict = {
        "source": stacked("source").to(source_dtype),
        "target": stacked("target", layout == "batch, one target").to(target_dtype),
        "init": torch.stack(inits) if with_init else None,
        "source_normals": None,
        "target_normals": None,
    }
    if config.needs_source_normals or seed % 2:
        arguments["source_normals"] = stacked("source_normals")
    if config.needs_target_normals or seed % 2:
        # the general path wants a batched target's normals for every pair
        arguments["target_normals"] = stacked("target_normals", layout == "batch, one target")
        if layout == "batch, one target":
            arguments["target_normals"] = arguments["target_normals"].expand(B, -1, -1)
    # a single pair given without its batch dimension (its normals too; the init either way)
    unbatched = {"pair": ("source", "target"), "source batch of one": ("target",)}
    unbatched["target batch of one"] = ("source",)
    for side in unbatched.get(layout, ()):
        for key in (side, f"{side}_normals"):
            if arguments[key] is not None:
                arguments[key] = arguments[key][0]
    if with_init and B == 1 and seed % 2:
        arguments["init"] = arguments["init"][0]
    with pytest.MonkeyPatch.context() as m:
        taken: list[bool] = []
        original = express.express_icp

        def spy(*args: object) -> difficp.ICPResult | None:
            taken.append((result := original(*args)) is not None)
            return result

        m.setattr(express, "express_icp", spy)
        fast = difficp.icp(**arguments, config=config)
        m.setattr(express, "express_icp", lambda *a: None)
        general = difficp.icp(**arguments, config=config)
    assert taken == [True]
    _assert_identical(fast, general)
    assert fast.transform.dtype == torch.promote_types(source_dtype, target_dtype)
    single = layout in ("pair", "target batch of one")
    assert fast.transform.shape == ((4, 4) if single else (B, 4, 4))


def test_numpy_arrays_take_the_lane_too(lane: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_pair(1, n=300, angle=5, translation=0.05)
    s, t = p["source"].numpy(), p["target"].numpy()
    result = difficp.icp(s, t, max_distance=0.2)
    assert lane == [True]
    _assert_identical(result, _general(monkeypatch, p["source"], p["target"], max_distance=0.2))
    # a non-contiguous view is read as it is (the lane copies it into contiguous memory)
    strided = np.asfortranarray(s)
    _assert_identical(difficp.icp(strided, t, max_distance=0.2), result)
    # read-only memory is copied (the kernels are compiled for writable arrays)
    frozen_source, frozen_target = s.copy(), t.copy()
    frozen_source.flags.writeable = frozen_target.flags.writeable = False
    _assert_identical(difficp.icp(frozen_source, frozen_target, max_distance=0.2), result)
    assert lane == [True, True, True]


def test_the_result_registers_the_pair(lane: list[bool]) -> None:
    p = make_pair(2, n=500, angle=10, translation=0.1, resample=False)
    result = difficp.icp(p["source"], p["target"], max_distance=0.5, max_iterations=60)
    assert lane == [True]
    torch.testing.assert_close(result.transform, p["transform"], atol=1e-6, rtol=0)
    assert bool(result.converged) and float(result.fitness) == 1.0


def test_a_learnt_threshold_is_read_at_every_call(lane: list[bool]) -> None:
    # a tensor option may change in place between calls with the same config: no stale cache
    p = make_pair(3, n=300, angle=5, translation=0.05, noise=0.003)
    threshold = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    module = difficp.ICP(max_distance=threshold)
    with torch.no_grad():
        wide = module(p["source"], p["target"])
        threshold.fill_(0.004)
        tight = module(p["source"], p["target"])
    assert lane == [True, True]
    assert float(tight.fitness) < float(wide.fitness)


@pytest.mark.parametrize(
    "case",
    [
        "source_requires_grad",
        "threshold_requires_grad",
        "large_batch",
        "lengths",
        "float16",
        "implicit",
        "soft",
        "gicp",
        "progress",
        "large",
    ],
)
def test_other_calls_take_the_general_path(
    case: str, lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_pair(4, n=5000 if case == "large" else 200, angle=5, translation=0.05)
    source, target = p["source"], p["target"]
    options: dict = {"max_distance": 0.2}
    if case == "source_requires_grad":
        source = source.clone().requires_grad_(True)
    elif case == "threshold_requires_grad":
        # soft rejection: the result depends on the threshold smoothly
        options["max_distance"] = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        options.update(rejection="soft", rejection_temperature=0.01)
    elif case == "large_batch":
        # more source points in all than the calling thread takes (difficp.fused.SERIAL_POINTS)
        source, target = torch.stack([source] * 25), target[None]
    elif case == "lengths":
        source, target = source[None], target[None]
        options["source_lengths"] = torch.tensor([150])
    elif case == "float16":
        source, target = source.half(), target.half()
    elif case == "implicit":
        options["differentiation"] = "implicit"
    elif case == "soft":
        options.update(correspondence="soft", temperature=0.01)
    elif case == "gicp":
        options["metric"] = "gicp"
    elif case == "progress":
        options["progress"] = lambda _: None
    result = difficp.icp(source, target, **options)
    assert not any(lane)
    assert result.transform.shape[-2:] == (4, 4)
    if case == "source_requires_grad":
        result.transform.sum().backward()
        assert source.grad is not None and torch.isfinite(source.grad).all()
    if case == "threshold_requires_grad":
        assert result.transform.requires_grad


def test_no_gradient_mode_takes_the_lane_with_inputs_that_require_grad(lane: list[bool]) -> None:
    p = make_pair(5, n=200, angle=5, translation=0.05)
    source = p["source"].clone().requires_grad_(True)
    result = difficp.icp(source, p["target"], max_distance=0.2, differentiation="none")
    assert lane == [True]
    assert not result.transform.requires_grad


def test_bad_input_gets_the_general_paths_errors(lane: list[bool]) -> None:
    p = make_pair(6, n=100, angle=5, translation=0.05)
    nan_source = p["source"].clone()
    nan_source[3, 1] = float("nan")
    with pytest.raises(ValueError, match="source contains NaN"):
        difficp.icp(nan_source, p["target"], max_distance=0.2)
    huge = p["target"] * 1e30
    with pytest.raises(ValueError, match="overflow"):
        difficp.icp(p["source"].float(), huge.float(), max_distance=0.2)
    zero_normals = p["target_normals"].clone()
    zero_normals[7] = 0.0
    with pytest.raises(ValueError, match="zero normals"):
        difficp.icp(p["source"], p["target"], target_normals=zero_normals, metric="point_to_plane")
    with pytest.raises(ValueError, match="target_normals are required"):
        difficp.icp(p["source"], p["target"], metric="point_to_plane")
    nan_normals = p["target_normals"].clone()
    nan_normals[0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_normals contains NaN"):
        # normals the options do not read are checked all the same
        difficp.icp(p["source"], p["target"], target_normals=nan_normals)
    with pytest.raises(ValueError, match="source_normals must have the shape of its points"):
        # a batch of one needs its normals batched too
        difficp.icp(
            p["source"][None],
            p["target"],
            source_normals=p["source_normals"],
            target_normals=p["target_normals"],
            metric="symmetric",
        )
    sheared = torch.eye(4, dtype=torch.float64)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="init must be a rigid transform"):
        difficp.icp(p["source"], p["target"], init=sheared)
    assert not any(lane)


def test_warnings_come_from_the_general_path(lane: list[bool]) -> None:
    p = make_pair(7, n=100, angle=5, translation=0.05)
    almost = torch.eye(4, dtype=torch.float64)
    almost[0, 1] = 1e-3  # a rotation a little off SO(3): projected, with a warning
    with pytest.warns(UserWarning, match="init is not exactly rigid"):
        difficp.icp(p["source"], p["target"], init=almost, max_distance=0.2)
    tiny = p["source"] * 1e-5  # an absolute RMSE criterion coarse for so small a cloud
    with pytest.warns(UserWarning, match="is coarse for a source cloud"):
        difficp.icp(tiny, tiny, relative_rmse=1e-6)
    assert lane == [False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difficp.icp(p["source"], p["target"], max_distance=0.2)
    assert lane == [False, False, True]


def test_calls_the_lane_never_takes_do_not_load_numba() -> None:
    # soft correspondences run in PyTorch: asking whether the lane takes them must not import
    # numba (~70 MB), as the general path does not
    import subprocess
    import sys

    code = (
        "import sys, torch, difficp\n"
        "s = torch.rand(100, 3)\n"
        "difficp.icp(s, s + 0.01, correspondence='soft', temperature=0.01, max_iterations=2)\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
