"""The tiled brute-force neighbour search (the one GPUs run) against the KD-trees: the same
neighbours (up to ties) and the same distances to 1e-12 in float64, in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from difficp.correspondence import NeighborIndex, blocked_knn


def _scipy_knn(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist, idx = cKDTree(reference).query(queries, k=k)
    return idx.reshape(len(queries), k), dist.reshape(len(queries), k)


def _assert_same_neighbours(index, d2, ref: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Index equality where the KD-tree's neighbour distances are not tied, distances always."""
    n, m = len(queries), len(ref)
    # One more neighbour than asked for: the k-th may tie with the (k+1)-th.
    want_idx, want_dist = _scipy_knn(ref, queries, min(k + 1, m))
    if want_dist.shape[1] == k:
        want_dist = np.concatenate([want_dist, np.full((n, 1), np.inf)], 1)
    np.testing.assert_allclose(np.sqrt(d2), want_dist[:, :k], rtol=0, atol=1e-12)
    # A tie (two references equally far) may come in either order.
    gaps = np.diff(want_dist, axis=1)  # (n, k): gap to the next one
    before = np.concatenate([np.full((n, 1), np.inf), gaps[:, :-1]], 1)
    untied = (gaps > 1e-12) & (before > 1e-12)
    assert (index[untied] == want_idx[:, :k][untied]).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    m=st.integers(1, 90),
    k=st.integers(1, 6),
    block=st.sampled_from([1, 7, 64, 1 << 22]),
    seed=st.integers(0, 2**16),
    grid=st.booleans(),
)
def test_blocked_knn_matches_kdtree(n: int, m: int, k: int, block: int, seed: int, grid: bool):
    k = min(k, m)
    rng = np.random.default_rng(seed)
    ref = rng.random((m, 3))
    if grid:  # many exact ties
        ref = np.round(ref * 3) / 3
    queries = rng.random((n, 3)) * 1.4 - 0.2
    mask = torch.ones(1, m, dtype=torch.bool)
    index, d2 = blocked_knn(
        torch.from_numpy(queries)[None], torch.from_numpy(ref)[None], mask, k, block
    )
    assert index.shape == (1, n, k) and d2.dtype == torch.float64
    _assert_same_neighbours(index[0].numpy(), d2[0].numpy(), ref, queries, k)


def test_blocked_knn_tiles_a_batch_with_padding() -> None:
    # Tiles narrower than the clouds (block 64: 16 references per tile) and padded references.
    rng = np.random.default_rng(3)
    B, N, M, k = 3, 40, 50, 4
    ref = rng.standard_normal((B, M, 3))
    queries = rng.standard_normal((B, N, 3))
    lengths = torch.tensor([50, 9, 31])
    mask = torch.arange(M)[None] < lengths[:, None]
    index, d2 = blocked_knn(torch.from_numpy(queries), torch.from_numpy(ref), mask, k, block=64)
    for b in range(B):
        n_ref = int(lengths[b])
        _assert_same_neighbours(
            index[b].numpy(), d2[b].numpy(), ref[b, :n_ref], queries[b], min(k, n_ref)
        )


@pytest.mark.parametrize("k", [1, 16])
def test_brute_force_index_equals_compiled_and_scipy(k: int) -> None:
    """NeighborIndex answers the same on its three CPU backends (float64, far from the origin
    too: the brute force searches centred)."""
    rng = np.random.default_rng(k)
    ref = torch.from_numpy(rng.random((2, 300, 3)) + 1e3)
    queries = ref + torch.from_numpy(0.01 * rng.standard_normal((2, 300, 3)))
    answers = {}
    for backend in ("brute_force", "kdtree", "compiled"):
        index, found = NeighborIndex(ref, backend=backend).query(queries, k)
        assert found.all()
        answers[backend] = index
    d = {
        name: (
            (
                torch.gather(ref, 1, i.reshape(2, -1, 1).expand(-1, -1, 3)).reshape(2, 300, k, 3)
                - queries[:, :, None]
            )
            ** 2
        ).sum(-1)
        for name, i in answers.items()
    }
    torch.testing.assert_close(d["brute_force"], d["kdtree"], rtol=0, atol=1e-12)
    torch.testing.assert_close(d["compiled"], d["kdtree"], rtol=0, atol=1e-12)
    assert (answers["brute_force"] == answers["kdtree"]).float().mean() > 0.999


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocked_knn_on_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(5)
    ref = torch.from_numpy(rng.random((2, 5000, 3)))
    queries = torch.from_numpy(rng.random((2, 3000, 3)))
    mask = torch.ones(2, 5000, dtype=torch.bool)
    i_cpu, d_cpu = blocked_knn(queries, ref, mask, 8, block=1 << 16)
    i_gpu, d_gpu = blocked_knn(queries.cuda(), ref.cuda(), mask.cuda(), 8, block=1 << 16)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=0, atol=1e-12)
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.999
