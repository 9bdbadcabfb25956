"""Bad input fails early with a ValueError naming the argument; lost pairs never produce NaN."""

from __future__ import annotations

import pytest
import torch

import difficp

from conftest import make_pair


@pytest.fixture
def clouds() -> tuple[torch.Tensor, torch.Tensor]:
    p = make_pair(60, n=100, resample=False)
    return p["source"], p["target"]


def test_nan_source(clouds) -> None:
    s, t = clouds
    s = s.clone()
    s[3, 1] = float("nan")
    with pytest.raises(ValueError, match="source contains NaN"):
        difficp.icp(s, t)


def test_inf_target(clouds) -> None:
    s, t = clouds
    t = t.clone()
    t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="target contains NaN or inf"):
        difficp.icp(s, t)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 3)])
def test_empty_cloud(clouds, shape) -> None:
    with pytest.raises(ValueError, match="source is empty"):
        difficp.icp(torch.zeros(shape, dtype=torch.float64), clouds[1])


def test_zero_length_in_batch(clouds) -> None:
    s, t = clouds
    with pytest.raises(ValueError, match="source_lengths"):
        difficp.icp(
            s[None].repeat(2, 1, 1), t[None].repeat(2, 1, 1), source_lengths=torch.tensor([100, 0])
        )


@pytest.mark.parametrize("shape", [(100, 2), (100,), (1, 2, 100, 3)])
def test_wrong_point_shape(clouds, shape) -> None:
    with pytest.raises(ValueError, match=r"source must have shape \(N, 3\)"):
        difficp.icp(torch.zeros(shape, dtype=torch.float64), clouds[1])


def test_mismatched_batches(clouds) -> None:
    s, t = clouds
    with pytest.raises(ValueError, match="target has batch size 3 but source has 2"):
        difficp.icp(s[None].repeat(2, 1, 1), t[None].repeat(3, 1, 1))


def test_integer_points_rejected(clouds) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        difficp.icp(torch.zeros(10, 3, dtype=torch.long), clouds[1])


def test_non_rigid_init(clouds) -> None:
    init = torch.eye(4, dtype=torch.float64)
    init[0, 0] = 2.0
    with pytest.raises(ValueError, match="init must be a rigid transform"):
        difficp.icp(*clouds, init=init)


def test_reflection_init(clouds) -> None:
    init = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="init must be a rigid transform"):
        difficp.icp(*clouds, init=init)


@pytest.mark.parametrize(
    ("metric", "missing"), [("point_to_plane", "target_normals"), ("symmetric", "source_normals")]
)
def test_missing_normals(clouds, metric, missing) -> None:
    with pytest.raises(ValueError, match=f"{missing} are required.*estimate_normals"):
        difficp.icp(*clouds, metric=metric)


def test_svd_needs_point_to_point() -> None:
    with pytest.raises(ValueError, match="solver='svd' only solves metric='point_to_point'"):
        difficp.ICPConfig(metric="point_to_plane", solver="svd")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("max_distance", -1.0),
        ("max_normal_angle", 200.0),
        ("soft_k", 0),
        ("max_iterations", 0),
        ("metric", "point_to_line"),
        ("correspondence", "closest"),
    ],
)
def test_bad_config_values(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        difficp.ICPConfig(**{field: value})


def test_bad_intrinsics() -> None:
    depth = torch.ones(8, 8, dtype=torch.float64)
    points = torch.rand(20, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="intrinsics must be a"):
        difficp.icp(points, depth, correspondence="projective", intrinsics=torch.eye(2))
    K = torch.tensor([[-5.0, 0, 4], [0, 5, 4], [0, 0, 1]], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive focal lengths"):
        difficp.icp(points, depth, correspondence="projective", intrinsics=K)
    with pytest.raises(ValueError, match="needs intrinsics"):
        difficp.icp(points, depth, correspondence="projective")


def test_pair_losing_all_correspondences_keeps_last_transform(clouds) -> None:
    s, t = clouds
    far = t + 100.0  # nothing within max_distance
    src = torch.stack([s, s])
    tgt = torch.stack([t, far])
    result = difficp.icp(src, tgt, max_distance=0.1)
    assert bool(result.converged[0]) and not bool(result.converged[1])
    assert torch.equal(result.transform[1], torch.eye(4, dtype=torch.float64))
    assert torch.isfinite(result.transform).all()
    assert float(result.fitness[1]) == 0.0 and float(result.inlier_rmse[1]) == 0.0


def test_lost_pair_gradients_are_finite(clouds) -> None:
    s, t = clouds
    src = torch.stack([s, s]).requires_grad_(True)
    tgt = torch.stack([t, t + 100.0])
    result = difficp.icp(src, tgt, correspondence="soft", temperature=1e-3, max_distance=0.2)
    result.transform.sum().backward()
    assert torch.isfinite(src.grad).all()
    assert src.grad[0].abs().sum() > 0 and src.grad[1].abs().sum() == 0


@pytest.mark.parametrize("metric", ["point_to_plane", "symmetric", "point_to_point"])
def test_pair_with_a_few_collinear_correspondences_does_not_crash(clouds, metric) -> None:
    # Pair 1 keeps only three correspondences, all on a line: its normal equations are singular.
    s, t = clouds
    line = torch.zeros(100, 3, dtype=torch.float64)
    line[:, 0] = torch.linspace(0, 1, 100, dtype=torch.float64)
    far_line = line + 100.0
    far_line[:3] = line[:3] + 1e-3
    normals = torch.zeros(2, 100, 3, dtype=torch.float64)
    normals[..., 2] = 1.0
    src = torch.stack([s, line]).float()
    tgt = torch.stack([t, far_line]).float()
    result = difficp.icp(
        src,
        tgt,
        source_normals=normals.float(),
        target_normals=normals.float(),
        metric=metric,
        max_distance=0.05,
    )
    assert torch.isfinite(result.transform).all()


# --------------------------------------------------------------------------------------------
# Types and values of options, dtypes, normals, init
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("search_backend", ["auto", "kdtree", "brute_force"])
def test_half_precision_is_computed_in_float32_and_returned_as_given(dtype, search_backend):
    p = make_pair(2, n=300, angle=5.0, translation=0.05, resample=False)
    s, t = p["source"].to(dtype), p["target"].to(dtype)
    result = difficp.icp(s, t, search_backend=search_backend)
    assert result.transform.dtype == dtype and result.fitness.dtype == dtype
    reference = difficp.icp(s.float(), t.float(), search_backend=search_backend)
    torch.testing.assert_close(result.transform, reference.transform.to(dtype))
    assert torch.equal(result.iterations, reference.iterations)


def test_half_precision_gradient_reaches_the_input():
    p = make_pair(3, n=100, angle=3.0, resample=False)
    s = p["source"].half().requires_grad_(True)
    difficp.icp(s, p["target"].half(), correspondence="soft").transform.sum().backward()
    assert s.grad is not None and s.grad.dtype == torch.float16
    assert torch.isfinite(s.grad).all()


def test_config_must_be_an_icp_config(clouds) -> None:
    with pytest.raises(TypeError, match=r"config must be a difficp.ICPConfig, got dict.*\*\*"):
        difficp.icp(*clouds, config={"max_distance": 0.1})
    with pytest.raises(TypeError, match=r"config must be a difficp\.ICPConfig"):
        difficp.ICP({"max_distance": 0.1})


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("max_distance", "0.1", TypeError, r"max_distance must be a number.*float\('0.1'\)"),
        ("max_distance", True, TypeError, "max_distance must be a number, got the bool"),
        ("max_normal_angle", torch.tensor([10.0, 20.0]), ValueError,
         r"max_normal_angle must be a scalar.*shape \(2,\)"),
        ("max_iterations", True, TypeError, "max_iterations must be an int, got the bool True"),
        ("max_iterations", 2.0, TypeError, "max_iterations must be an int, got float 2.0"),
        ("soft_k", True, TypeError, "soft_k must be an int, got the bool True"),
        ("lm_steps", False, TypeError, "lm_steps must be an int"),
        ("temperature", 1e-300, ValueError, "temperature must be .*got 1e-300$"),
        ("temperature", torch.tensor(0.0), ValueError, "temperature must be .*got 0$"),
        ("kernel_scale", -0.1, ValueError, "kernel_scale must be a finite positive .*got -0.1$"),
        ("max_distance", torch.tensor(-0.1), ValueError, "max_distance must be .*got -0.1$"),
        ("lm_damping", float("inf"), ValueError, "lm_damping must be a finite positive.*inf"),
        ("lm_damping", 0.0, ValueError, "lm_damping must be a finite positive"),
        ("relative_rmse", "0", TypeError, "relative_rmse must be a number"),
    ],
)  # fmt: skip
def test_bad_option_types_and_values_name_the_option(field, value, error, match) -> None:
    with pytest.raises(error, match=f"ICPConfig.{match}"):
        difficp.ICPConfig(**{field: value})


def test_numpy_and_tensor_integers_are_accepted_as_ints() -> None:
    np = pytest.importorskip("numpy")
    config = difficp.ICPConfig(max_iterations=np.int64(7), soft_k=np.int32(4),
                               lm_steps=torch.tensor(2))  # fmt: skip
    assert (config.max_iterations, config.soft_k, config.lm_steps) == (7, 4, 2)
    assert all(type(v) is int for v in (config.max_iterations, config.soft_k, config.lm_steps))


def test_repeated_keyword_options_reuse_one_validated_config_without_skipping_checks(clouds):
    from difficp.config import resolve_config

    base = difficp.ICPConfig(max_distance=0.5)
    first = resolve_config(base, {"max_iterations": 3, "metric": "point_to_point"})
    again = resolve_config(base, {"metric": "point_to_point", "max_iterations": 3})
    assert again is first and (first.max_iterations, first.max_distance) == (3, 0.5)
    # equal but not the same option: 1 == True == 1.0, yet the bool and the float are refused
    assert resolve_config(None, {"max_iterations": 1}).max_iterations == 1
    with pytest.raises(TypeError, match="got the bool True"):
        difficp.icp(*clouds, max_iterations=True)
    with pytest.raises(TypeError, match=r"got float 1\.0"):
        difficp.icp(*clouds, max_iterations=1.0)
    # another config with other values: its own options, never the cached config's
    assert (
        resolve_config(difficp.ICPConfig(max_distance=0.25), {"max_iterations": 3}).max_distance
        == 0.25
    )
    # tensor options (learnable) are not cached: each call sees the tensor it was given
    t1, t2 = torch.tensor(0.1), torch.tensor(0.2)
    assert resolve_config(None, {"temperature": t1}).temperature is t1
    assert resolve_config(None, {"temperature": t2}).temperature is t2
    # a config holding a learnable option is validated again on every call with overrides
    learnt = difficp.ICPConfig(temperature=torch.nn.Parameter(torch.tensor(0.1)))
    assert resolve_config(learnt, {"max_iterations": 3}).max_iterations == 3
    with torch.no_grad():
        learnt.temperature.fill_(-1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        resolve_config(learnt, {"max_iterations": 3})


def test_bool_lengths_refused(clouds) -> None:
    s, t = clouds
    with pytest.raises(ValueError, match=r"source_lengths must be an int tensor.*bool"):
        difficp.icp(s[None], t[None], source_lengths=torch.tensor([True]))


@pytest.mark.parametrize(
    ("metric", "which"), [("point_to_plane", "target_normals"), ("symmetric", "source_normals")]
)
def test_zero_normals_refused(clouds, metric, which) -> None:
    s, t = clouds
    normals = {"source_normals": torch.nn.functional.normalize(s, dim=1),
               "target_normals": torch.nn.functional.normalize(t, dim=1)}  # fmt: skip
    normals[which] = normals[which].clone()
    normals[which][[4, 9]] = 0.0
    with pytest.raises(ValueError, match=f"{which} has 2 zero normals.*estimate_normals"):
        difficp.icp(s, t, metric=metric, **normals)


def test_zero_normals_of_padding_are_fine(clouds) -> None:
    s, t = clouds
    n = torch.nn.functional.normalize(t, dim=1).clone()
    n[90:] = 0.0  # padding, beyond target_lengths
    result = difficp.icp(s[None], t[None], target_normals=n[None], metric="point_to_plane",
                         target_lengths=torch.tensor([90]))  # fmt: skip
    assert torch.isfinite(result.transform).all()


@pytest.mark.parametrize("search_backend", ["auto", "kdtree"])
@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane", "symmetric"])
def test_soft_normal_rejection_of_every_pair_loses_the_pair(clouds, metric, search_backend):
    # Opposite normals, every correspondence rejected by a wide margin: the sigmoid weights are
    # ~1e-81, not 0, and used to pass as a full set (a step, then converged=True).
    s, t = clouds
    up = torch.zeros_like(s)
    up[:, 2] = 1.0
    result = difficp.icp(
        s,
        t + 0.01,
        metric=metric,
        source_normals=up,
        target_normals=-up,
        max_normal_angle=30.0,
        rejection="soft",
        search_backend=search_backend,
    )
    assert not bool(result.converged) and int(result.iterations) == 0
    assert torch.equal(result.transform, torch.eye(4, dtype=torch.float64))


def test_slightly_sheared_init_is_projected_with_a_warning(clouds) -> None:
    s, t = clouds
    init = torch.eye(4, dtype=torch.float64)
    init[0, 1] = 9e-5
    with pytest.warns(UserWarning, match=r"init is not exactly rigid: .*9e-05 from orthonormal"):
        result = difficp.icp(s, t, init=init)
    R = result.transform[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_far_from_rigid_init_names_both_numbers(clouds) -> None:
    init = torch.eye(4, dtype=torch.float64)
    init[0, 1] = 0.05
    with pytest.raises(ValueError, match=r"init must be a rigid.*0.05 from orthonormal.*"
                                         r"tolerance 0.01"):  # fmt: skip
        difficp.icp(*clouds, init=init)


def test_float32_rounding_of_init_passes_silently(clouds) -> None:
    import warnings

    from difficp.geometry import make_transform, random_rotation

    R = random_rotation(max_angle_deg=30.0, generator=torch.Generator().manual_seed(0))
    init = make_transform(R, torch.zeros(3)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difficp.icp(clouds[0].float(), clouds[1].float(), init=init)


def test_float32_network_rotation_a_few_eps_off_passes_silently(clouds) -> None:
    """A float32 rotation as a network's SVD head makes it (1.3e-6 = 11 eps off orthonormal
    was seen from DCP) is rounding, not a user error: no warning, on either lane."""
    import warnings

    from difficp.geometry import make_transform, random_rotation

    R = random_rotation(max_angle_deg=30.0, generator=torch.Generator().manual_seed(1))
    init = make_transform(R * (1 + 4e-6), torch.zeros(3)).float()  # |R^T R - I| ~ 8e-6
    off = float((init[:3, :3].double().T @ init[:3, :3].double() - torch.eye(3)).abs().max())
    assert 5e-6 < off < 1.2e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for source, target in ((clouds[0], clouds[1]), (clouds[0][:100], clouds[1][:100])):
            difficp.icp(source.float(), target.float(), init=init)
    sheared = init.clone()
    sheared[0, 1] += 3e-5  # beyond rounding: projected, with a warning
    with pytest.warns(UserWarning, match="init is not exactly rigid"):
        difficp.icp(clouds[0].float(), clouds[1].float(), init=sheared)


def test_misspelt_option_suggests_the_right_name() -> None:
    source = torch.rand(10, 3)
    with pytest.raises(TypeError, match=r"'max_dist' \(did you mean 'max_distance'\?\)"):
        difficp.icp(source, source, max_dist=0.1)
    with pytest.raises(TypeError, match="unknown ICP option 'wobble';"):
        difficp.ICPConfig().replace(wobble=1)
