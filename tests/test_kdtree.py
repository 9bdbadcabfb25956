"""The compiled KD-forest (difficp.kdtree) against scipy's cKDTree, on random clouds.

Ties (duplicate or equidistant points) may legitimately pick a different index than scipy, so
the checks are on distances, with indices compared only where the nearest point is unique.
"""

from __future__ import annotations

from fractions import Fraction

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from scipy.spatial import cKDTree

from difficp import kdtree
from difficp.kdtree import build_forest, enclosing_node, nearest

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("uniform", "grid", "duplicates", "planar", "tiny_scale", "large_scale")


def _cloud(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """``n`` points of one of several awkward distributions (all but uniform have ties)."""
    if kind == "uniform":
        return rng.random((n, 3))
    if kind == "grid":  # integer coordinates: many duplicates, ties and points on split planes
        return rng.integers(0, 3, size=(n, 3)).astype(np.float64)
    if kind == "duplicates":  # a few distinct points, each repeated
        distinct = rng.random((max(1, n // 5), 3))
        return distinct[rng.integers(0, len(distinct), size=n)]
    if kind == "planar":  # a flat box side (all z equal)
        return np.concatenate([rng.random((n, 2)), np.full((n, 1), 0.5)], axis=1)
    if kind == "tiny_scale":
        return 1e-3 * rng.random((n, 3)) - 5.0
    return 1e3 * rng.random((n, 3)) + 1e4


@st.composite
def scenes(draw: st.DrawFn) -> dict:
    """A padded batch of clouds (some possibly empty or tiny), queries and a search radius."""
    B = draw(st.integers(1, 4))
    M = draw(st.one_of(st.integers(1, 9), st.integers(10, 300)))
    counts = draw(
        st.lists(
            st.one_of(st.integers(0, min(M, 9)), st.just(M), st.integers(0, M)),
            min_size=B,
            max_size=B,
        ).filter(any)  # a forest of only empty trees: see test_nearest_in_only_empty_trees
    )
    N = draw(st.integers(1, 40))
    query_counts = draw(st.one_of(st.none(), st.lists(st.integers(0, N), min_size=B, max_size=B)))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Padding rows come from the same distribution, so a leak into the search would be seen.
    clouds = np.stack([_cloud(rng, kind, M) for _ in range(B)])
    queries = np.stack([_cloud(rng, kind, N) for _ in range(B)])
    queries += rng.normal(size=queries.shape) * 0.05 * _scale(clouds)
    # Some queries sit exactly on a point of their cloud (distance 0).
    on_point = rng.random((B, N)) < 0.2
    pick = rng.integers(0, M, size=(B, N))
    queries[on_point] = clouds[np.arange(B)[:, None].repeat(N, 1), pick][on_point]
    finite = draw(st.booleans())
    max_distance = draw(st.floats(1e-3, 1.5)) * _scale(clouds) if finite else None
    return {
        "clouds": clouds,
        "counts": np.array(counts, dtype=np.int64),
        "queries": queries,
        "query_counts": None if query_counts is None else np.array(query_counts, dtype=np.int64),
        "max_distance": max_distance,
    }


def _scale(points: np.ndarray) -> float:
    return float(np.ptp(points.reshape(-1, 3), axis=0).max()) or 1.0


@given(scenes())
@SETTINGS
def test_nearest_equals_ckdtree(scene: dict) -> None:
    clouds, counts, queries = scene["clouds"], scene["counts"], scene["queries"]
    B, N, _ = queries.shape
    qc = scene["query_counts"]
    md = scene["max_distance"]
    forest = build_forest(clouds, counts)
    index, distance = nearest(forest, queries, qc, md)
    assert index.shape == (B, N) and index.dtype == np.int64
    assert distance.shape == (B, N)
    bound = np.inf if md is None else md
    for b in range(B):
        n_q = N if qc is None else int(qc[b])
        # Padding queries and queries into an empty tree: no partner.
        assert (index[b, n_q:] == -1).all() and np.isposinf(distance[b, n_q:]).all()
        cloud = clouds[b, : counts[b]]
        if counts[b] == 0:
            assert (index[b] == -1).all() and np.isposinf(distance[b]).all()
            continue
        q = queries[b, :n_q]
        k = min(2, len(cloud))
        ref_d, ref_i = cKDTree(cloud).query(q, k=k)
        ref_d, ref_i = ref_d.reshape(n_q, k), ref_i.reshape(n_q, k)
        nearest_d = ref_d[:, 0]
        found = index[b, :n_q] >= 0
        # Which queries have a partner within max_distance (undecidable within rounding of it).
        clear = np.abs(nearest_d - bound) > 1e-9 * max(bound if np.isfinite(bound) else 0, 1e-300)
        np.testing.assert_array_equal(found[clear], (nearest_d < bound)[clear])
        assert np.isposinf(distance[b, :n_q][~found]).all()
        got = index[b, :n_q][found]
        assert ((got >= 0) & (got < counts[b])).all()
        # The reported distance is the distance to the reported point, and is the nearest one.
        recomputed = np.linalg.norm(cloud[got] - q[found], axis=1)
        np.testing.assert_allclose(distance[b, :n_q][found], recomputed, rtol=1e-12, atol=0)
        np.testing.assert_allclose(distance[b, :n_q][found], nearest_d[found], rtol=1e-12, atol=0)
        if k == 2:  # a unique nearest point must be the same point
            unique = found & (ref_d[:, 1] > ref_d[:, 0] * (1 + 1e-9) + 1e-300)
            np.testing.assert_array_equal(index[b, :n_q][unique], ref_i[unique, 0])


def test_nearest_in_empty_trees_next_to_full_ones() -> None:
    rng = np.random.default_rng(2)
    clouds = rng.random((3, 20, 3))
    forest = build_forest(clouds, np.array([0, 20, 0]))
    index, distance = nearest(forest, rng.random((3, 7, 3)), max_distance=10.0)
    assert (index[[0, 2]] == -1).all() and np.isposinf(distance[[0, 2]]).all()
    assert (index[1] >= 0).all() and np.isfinite(distance[1]).all()


def test_nearest_in_only_empty_trees() -> None:
    forest = build_forest(np.zeros((2, 4, 3)), np.array([0, 0]))
    index, distance = nearest(forest, np.zeros((2, 5, 3)))
    assert (index == -1).all() and np.isposinf(distance).all()


def test_nearest_on_larger_clouds_equals_ckdtree() -> None:
    # Deeper trees than the property test builds (thousands of points, ~10 levels).
    rng = np.random.default_rng(0)
    clouds = rng.normal(size=(2, 3000, 3))
    counts = np.array([3000, 1700])
    queries = rng.normal(size=(2, 2000, 3)) * 1.2
    forest = build_forest(clouds, counts)
    for md in (None, 0.1):
        index, distance = nearest(forest, queries, max_distance=md)
        for b in range(2):
            d, i = cKDTree(clouds[b, : counts[b]]).query(
                queries[b], distance_upper_bound=np.inf if md is None else md
            )
            found = np.isfinite(d)
            assert found.sum() > 0
            np.testing.assert_array_equal(index[b] >= 0, found)
            np.testing.assert_array_equal(index[b][found], i[found])
            np.testing.assert_allclose(distance[b][found], d[found], rtol=1e-12, atol=0)


def test_one_large_cloud_built_in_parallel_is_the_serial_tree() -> None:
    # One cloud from PARALLEL_BUILD_POINTS up is built on the thread pool by code of its own:
    # the same tree as the serial build, its nodes numbered differently.
    rng = np.random.default_rng(3)
    n = kdtree.PARALLEL_BUILD_POINTS + 1000
    cloud = rng.normal(size=(1, n, 3))
    parallel = build_forest(cloud, np.array([n]))
    serial = build_forest(cloud, np.array([n]), parallel=False)
    np.testing.assert_array_equal(parallel.order, serial.order)
    np.testing.assert_array_equal(parallel.points, cloud[0, parallel.order])
    for f in (parallel, serial):
        leaf = f.point_leaf
        np.testing.assert_array_equal(f.node_start[leaf], serial.node_start[serial.point_leaf])
        np.testing.assert_array_equal(f.node_end[leaf], serial.node_end[serial.point_leaf])
        assert (f.node_child[leaf] == -1).all()
    queries = rng.normal(size=(1, 500, 3))
    index, _ = nearest(parallel, queries)
    np.testing.assert_array_equal(index[0], cKDTree(cloud[0]).query(queries[0])[1])


@pytest.mark.parametrize("leaf_size", [2, 3, kdtree.LEAF_SIZE, 16, 64])
def test_forest_layout_is_a_permutation_of_each_cloud(leaf_size: int) -> None:
    rng = np.random.default_rng(1)
    clouds = rng.random((3, 50, 3))
    counts = np.array([50, 0, 13])
    f = build_forest(clouds, counts, leaf_size=leaf_size)
    np.testing.assert_array_equal(f.point_offset, [0, 50, 50, 63])
    for b in range(3):
        p0, p1 = f.point_offset[b], f.point_offset[b + 1]
        assert sorted(f.order[p0:p1]) == list(range(counts[b]))
        np.testing.assert_array_equal(f.points[p0:p1], clouds[b, f.order[p0:p1]])
        if counts[b]:
            root = f.node_offset[b]
            assert f.node_start[root] == 0 and f.node_end[root] == counts[b]
            assert f.node_parent[root] == -1
            # Every point lies in its leaf's range, and leaves hold at most leaf_size points
            # (and at least half as many, unless the whole cloud is smaller).
            leaves = f.node_offset[b] + f.point_leaf[p0:p1]
            local = np.arange(p1 - p0)
            assert ((f.node_start[leaves] <= local) & (local < f.node_end[leaves])).all()
            assert (f.node_child[leaves] == -1).all()
            sizes = f.node_end[leaves] - f.node_start[leaves]
            assert (sizes <= leaf_size).all()
            assert (sizes >= min(leaf_size // 2, counts[b])).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_split_separates_its_children(kind: str) -> None:
    # The descent prunes a child by its distance to the parent's split plane, which is a bound
    # only if the first child's points lie on or below the split and the second's on or above
    # (grid and duplicate clouds put many points exactly on a split).
    rng = np.random.default_rng(7)
    clouds = np.stack([_cloud(rng, kind, 300) for _ in range(2)])
    counts = np.array([300, 37])
    f = build_forest(clouds, counts, leaf_size=4)
    inner = 0
    for b in range(2):
        p0, n0 = f.point_offset[b], f.node_offset[b]
        n1 = f.node_offset[b + 1] if b + 1 < 2 else f.node_child.shape[0]
        for node in range(n0, n1):
            first = f.node_child[node]
            if first < 0 or f.node_end[node] == 0:
                continue
            inner += 1
            axis, split = f.node_axis[node], f.node_split[node]
            a, c = n0 + first, n0 + first + 1
            low_side = f.points[p0 + f.node_start[a] : p0 + f.node_end[a], axis]
            high_side = f.points[p0 + f.node_start[c] : p0 + f.node_end[c], axis]
            assert low_side.size and high_side.size
            assert (low_side <= split).all() and (high_side >= split).all()
            # the children's cells meet at the split
            assert f.cell_high[a, axis] == split == f.cell_low[c, axis]
    assert inner > 50


@pytest.mark.parametrize("leaf_size", [2, 5, 16, 40])
def test_every_search_answers_the_same_on_any_leaf_size(leaf_size: int) -> None:
    # The leaf size changes only the speed: nearest (cold), k nearest and the PCA normals on a
    # tree of other leaves equal those of the default tree (and cKDTree's neighbours).
    rng = np.random.default_rng(4)
    clouds = rng.normal(size=(2, 700, 3))
    counts = np.array([700, 333])
    queries = rng.normal(size=(2, 300, 3))
    default = build_forest(clouds, counts)
    other = build_forest(clouds, counts, leaf_size=leaf_size)
    for md in (None, 0.3):
        np.testing.assert_array_equal(
            nearest(other, queries, max_distance=md)[0],
            nearest(default, queries, max_distance=md)[0],
        )
    rows, d2 = kdtree.knearest(other, queries, k=7)
    for b in range(2):
        d, i = cKDTree(clouds[b, : counts[b]]).query(queries[b], k=7)
        np.testing.assert_array_equal(rows[b], i)
        np.testing.assert_allclose(np.sqrt(d2[b]), d, rtol=1e-12)
    viewpoint = np.zeros((2, 3))
    np.testing.assert_array_equal(
        kdtree.pca_normals(other, 30, viewpoint, 700),
        kdtree.pca_normals(default, 30, viewpoint, 700),
    )


@pytest.mark.parametrize("leaf_size", [0, 1, kdtree.MAX_LEAF_SIZE + 1])
def test_build_forest_rejects_a_leaf_size_it_cannot_build(leaf_size: int) -> None:
    with pytest.raises(ValueError, match="leaf_size must lie in"):
        build_forest(np.zeros((1, 5, 3)), np.array([5]), leaf_size=leaf_size)


# ---------------------------------------------------------------------------------------------
# enclosing_node: where the warm-started search of the fused ICP kernel may start
# ---------------------------------------------------------------------------------------------


def _strictly_contains(low: np.ndarray, high: np.ndarray, x: np.ndarray, r: float) -> bool:
    return bool(((low < x - r) & (x + r < high)).all())


def _within(point: np.ndarray, centre: np.ndarray, radius: float) -> bool:
    """``|point - centre| <= radius`` in exact (rational) arithmetic."""
    d2 = sum(
        (Fraction(float(p)) - Fraction(float(c))) ** 2 for p, c in zip(point, centre, strict=True)
    )
    return d2 <= Fraction(float(radius)) ** 2


@st.composite
def balls(draw: st.DrawFn) -> dict:
    """A forest, a ball about a point near tree point ``k``, and the leaf of ``k``'s
    ``rank``-th nearest tree point (rank 0: ``k`` itself), as in the fused ICP kernel: the
    leaf of the last partner and the ball through it."""
    B = draw(st.integers(1, 3))
    M = draw(st.one_of(st.integers(1, 9), st.integers(10, 400)))
    counts = draw(st.lists(st.integers(1, M), min_size=B, max_size=B))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clouds = np.stack([_cloud(rng, kind, M) for _ in range(B)])
    b = draw(st.integers(0, B - 1))
    scale = _scale(clouds)
    offset = draw(st.sampled_from([0.0, 1e-6, 0.01, 0.1, 1.0]))
    return {
        "clouds": clouds,
        "counts": np.array(counts, dtype=np.int64),
        "b": b,
        "k": draw(st.integers(0, counts[b] - 1)),
        "rank": draw(st.integers(0, min(4, counts[b] - 1))),
        "offset": rng.normal(size=3) * offset * scale,
        "radius_kind": draw(st.sampled_from(["to_point", "to_point", "random", "zero"])),
        "radius": draw(st.floats(0.0, 0.5)) * scale,
    }


@given(balls())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_enclosing_node_holds_every_point_of_the_ball(case: dict) -> None:
    f = build_forest(case["clouds"], case["counts"])
    b = case["b"]
    p0, p1 = f.point_offset[b], f.point_offset[b + 1]
    n0 = f.node_offset[b]
    points = f.points[p0:p1]
    x = points[case["k"]] + case["offset"]
    j = np.argsort(np.linalg.norm(points - points[case["k"]], axis=1), kind="stable")[case["rank"]]
    if case["radius_kind"] == "to_point":
        r = float(np.sqrt(((points[j] - x) ** 2).sum()))
    else:
        r = 0.0 if case["radius_kind"] == "zero" else case["radius"]
    leaf = n0 + f.point_leaf[p0 + j]
    low, high = f.cell_low, f.cell_high
    node = enclosing_node(x[0], x[1], x[2], r, leaf, f, b)

    # The answer is on the leaf's path to the root ...
    path = [leaf]
    while f.node_parent[path[-1]] >= 0:
        path.append(n0 + f.node_parent[path[-1]])
    assert node in path
    # ... the lowest node on it that strictly contains the ball (or the root) ...
    below = path[: path.index(node)]
    assert not any(_strictly_contains(low[n], high[n], x, r) for n in below)
    assert node == path[-1] or _strictly_contains(low[node], high[node], x, r)
    # ... and holds every tree point inside the (closed) ball.
    d = np.linalg.norm(points - x, axis=1)
    candidates = np.nonzero(d <= r * (1 + 1e-9) + 1e-300)[0]
    inside = [i for i in candidates if _within(points[i], x, r)]
    for i in inside:
        assert f.node_start[node] <= i < f.node_end[node], (i, node)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clouds", "counts"),
    [
        (np.zeros((5, 3)), np.array([5])),  # no batch axis
        (np.zeros((2, 5, 2)), np.array([5, 5])),  # 2-D points
        (np.zeros((2, 5, 4)), np.array([5, 5])),  # 4-D points
        (np.zeros((2, 5, 3)), np.array([5])),  # counts of another batch
        (np.zeros((2, 5, 3)), np.array([[5, 5]])),  # counts not 1-D
    ],
    ids=["no-batch", "2d-points", "4d-points", "counts-batch", "counts-2d"],
)
def test_build_forest_rejects_bad_shapes(clouds: np.ndarray, counts: np.ndarray) -> None:
    with pytest.raises(ValueError, match="clouds must be"):
        build_forest(clouds, counts)


def test_nearest_rejects_batch_mismatch_and_missing_axes() -> None:
    forest = build_forest(np.random.default_rng(0).random((2, 10, 3)), np.array([10, 4]))
    with pytest.raises(ValueError, match="batch"):
        nearest(forest, np.zeros((3, 5, 3)))
    with pytest.raises(ValueError, match="batch"):
        nearest(forest, np.zeros((1, 5, 3)))
    with pytest.raises(ValueError):
        nearest(forest, np.zeros((2, 5)))


def test_nearest_rejects_queries_that_are_not_3d() -> None:
    forest = build_forest(np.random.default_rng(0).random((2, 10, 3)), np.array([10, 4]))
    with pytest.raises(ValueError):
        nearest(forest, np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        nearest(forest, np.zeros((2, 5, 2)))


@pytest.mark.parametrize("counts", [[5, -1], [5, 9]])
def test_build_forest_rejects_counts_outside_the_cloud(counts: list[int]) -> None:
    # Unchecked, a negative count corrupted the heap and a count past M read out of bounds.
    with pytest.raises(ValueError, match="counts must lie in"):
        build_forest(np.random.default_rng(0).random((2, 5, 3)), np.array(counts))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"query_counts": np.array([5])}, "query_counts"),
        ({"query_counts": np.array([5, 6])}, "query_counts"),
        ({"query_counts": np.array([-1, 2])}, "query_counts"),
        ({"max_distance": -1.0}, "max_distance"),
        ({"max_distance": 0.0}, "max_distance"),
    ],
)
def test_nearest_rejects_bad_counts_and_radius(kwargs: dict, match: str) -> None:
    forest = build_forest(np.random.default_rng(0).random((2, 10, 3)), np.array([10, 4]))
    with pytest.raises(ValueError, match=match):
        nearest(forest, np.zeros((2, 5, 3)), **kwargs)


# knearest: the differentiable path's search, asked again as the queries move (warm start)


def _assert_k_nearest(
    index: np.ndarray, d2: np.ndarray, cloud: np.ndarray, q: np.ndarray, k: int, bound: float
) -> None:
    """``index`` / ``d2`` ``(n, k)`` are the ``k`` nearest points of ``cloud`` to ``q`` within
    ``bound``, closest first: distances equal cKDTree's, each to the point it names."""
    n = len(q)
    want = np.full((n, k), np.inf)
    if len(cloud) and n:
        ref_d, _ = cKDTree(cloud).query(q, k=min(k, len(cloud)))
        want[:, : min(k, len(cloud))] = ref_d.reshape(n, -1)
    want[want >= bound] = np.inf
    found = index >= 0
    # Whether the k-th point is inside the radius is undecidable within rounding of it.
    near_edge = np.zeros(want.shape, dtype=bool)
    if np.isfinite(bound):
        near_edge = np.abs(want - bound) <= 1e-9 * bound
    np.testing.assert_array_equal(found[~near_edge], np.isfinite(want)[~near_edge])
    assert np.isposinf(d2[~found]).all()
    got = np.sqrt(d2[found])
    np.testing.assert_allclose(got, want[found], rtol=1e-12, atol=1e-300)
    recomputed = np.linalg.norm(
        cloud[index[found]] - np.repeat(q, k, 0).reshape(n, k, 3)[found], axis=-1
    )
    np.testing.assert_allclose(got, recomputed, rtol=1e-12, atol=1e-300)
    assert (d2[:, 1:] >= d2[:, :-1]).all()  # closest first, the ones not found (inf) last


@given(
    scenes(),
    st.sampled_from([1, 1, 2, 3, 5]),
    st.lists(st.sampled_from([0.0, 1e-4, 0.01, 0.05, 0.5]), min_size=2, max_size=6),
    st.integers(0, 2**16),
)
@SETTINGS
def test_knearest_with_warm_start_equals_ckdtree_as_queries_move(
    scene: dict, k: int, steps: list[float], seed: int
) -> None:
    """Each call with the warm start of the last (queries that stayed, moved a little or far)
    answers what a cold search does (k = 1 has its own kept test)."""
    clouds, counts, queries = scene["clouds"], scene["counts"], scene["queries"]
    B, N, _ = queries.shape
    qc, md = scene["query_counts"], scene["max_distance"]
    bound = np.inf if md is None else md
    forest = build_forest(clouds, counts)
    warm = kdtree.knn_warm_start(B, N, k)
    rng = np.random.default_rng(seed)
    for step in steps:
        queries = queries + rng.normal(size=queries.shape) * step * _scale(clouds)
        index, d2 = kdtree.knearest(forest, queries, k, qc, md, warm)
        assert index.shape == d2.shape == (B, N, k)
        for b in range(B):
            n_q = N if qc is None else int(qc[b])
            assert (index[b, n_q:] == -1).all() and np.isposinf(d2[b, n_q:]).all()
            _assert_k_nearest(
                index[b, :n_q], d2[b, :n_q], clouds[b, : counts[b]], queries[b, :n_q], k, bound
            )


def test_knearest_rejects_a_warm_start_of_other_queries() -> None:
    forest = build_forest(np.random.default_rng(0).random((2, 10, 3)), np.array([10, 4]))
    with pytest.raises(ValueError, match="warm start"):
        kdtree.knearest(forest, np.zeros((2, 5, 3)), 1, warm=kdtree.knn_warm_start(2, 6, 1))
    with pytest.raises(ValueError, match="warm start"):
        kdtree.knearest(forest, np.zeros((2, 5, 3)), 5, warm=kdtree.knn_warm_start(2, 5, 1))
    with pytest.raises(ValueError, match="at least 1"):
        kdtree.knearest(forest, np.zeros((2, 5, 3)), 0)
