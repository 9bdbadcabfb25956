"""Step 2 of ICP: find each source point's partner in the target.

Three kinds of partner, all returning a :class:`Correspondences` of fixed shape ``(B, N)``:

* :func:`nearest_correspondences` - the exact nearest target point (hard). The *choice* is not
  differentiable, the partner's coordinates are (gradients flow into the chosen target points).
* :func:`soft_correspondences` - the softmax(-|p - q|^2 / T)-weighted mean of the targets (all of
  them, or the ``soft_k`` nearest): differentiable in the source, the target and ``T``.
* :func:`projective_correspondences` - the target pixel a source point projects to in a depth map.

Neighbour search (:class:`NeighborIndex`) is built once per target and reused across iterations:
on the CPU a scipy KD-tree over the whole batch at once, elsewhere a chunked brute-force search by
matrix products whose memory stays bounded.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from difficp.compile_cache import compile_or_fall_back, kernels_cached
from difficp.geometry import points_to_pixels, transform_points
from difficp.softmatch import dense_soft_match, dense_soft_mean, topk_soft_match

if TYPE_CHECKING:
    from scipy.spatial import cKDTree

    from difficp.kdtree import KDForest

SearchBackend = Literal["auto", "kdtree", "compiled", "brute_force"]
# Compiled searches of at most this many queries in all run on the calling thread: waking the
# pool cost more than such a search takes (the 3903 queries of a 3DMatch fragment, 2 threads:
# 4.7 ms with the pool, 3.3 on the calling thread). The fast path's whole ICP loop has the same
# rule of its own, difficp.fused.SERIAL_POINTS.
SERIAL_QUERIES = 4096

# Elements of the (queries x references) distance block computed at once by brute force.
_BRUTE_FORCE_BLOCK = 1 << 22


@dataclass
class Correspondences:
    """Partners of the source points, one per source point (shapes never change).

    Attributes:
        points: ``(B, N, 3)`` partner coordinates (undefined where ``valid`` is False).
        normals: ``(B, N, 3)`` partner unit normals, or None when the target has none.
        valid: ``(B, N)`` bool, the point is real (not padding) and has a partner.
        distance: ``(B, N)`` Euclidean distance from the (transformed) source point to its partner.
        covariances: ``(B, N, 3, 3)`` or None. Metric ``"gicp"``: the partner's covariance
            (gathered, or the soft weights' mean) plus, once :func:`difficp.registration.correspond`
            has added it, the moved source point's ``R S_p R^T``: the combined ``C`` of the cost
            ``r^T C^-1 r``.
        features: ``(B, N, F)`` the partner's per-point features (gathered like its normal), or
            None; source_features: ``(B, N, F')`` the source points' own. The ``"colored"``
            metric reads its colour terms from them (:func:`difficp.colors.colored_features`).
    """

    points: Tensor
    normals: Tensor | None
    valid: Tensor
    distance: Tensor
    covariances: Tensor | None = None
    features: Tensor | None = None
    source_features: Tensor | None = None


def compiled_threads_as_torch() -> None:
    """Run the compiled (numba) kernels on PyTorch's intra-op thread count
    (``torch.set_num_threads``), which starts numba's pool on the first call."""
    from difficp.kdtree import set_threads  # here: numba only when the compiled path runs

    threads = torch.get_num_threads()
    set_threads(threads)
    # Starting numba's OpenMP pool resets the process's OpenMP thread count, which PyTorch
    # shares: keep the caller's.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def lengths_mask(lengths: Tensor | None, batch: int, size: int, device: torch.device) -> Tensor:
    """``(B, size)`` bool mask of the first ``lengths[b]`` entries (all True when None)."""
    if lengths is None:
        return torch.ones(batch, size, dtype=torch.bool, device=device)
    return torch.arange(size, device=device)[None, :] < lengths.to(device)[:, None]


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, M, C)`` gathered at ``index`` ``(B, N, ...)`` -> ``(B, N, ..., C)``."""
    B, M, C = values.shape
    # One index_select on the flattened batch is several times faster than torch.gather
    # with an expanded index (and has the same gradient).
    offsets = (torch.arange(B, device=index.device) * M).reshape(B, *([1] * (index.dim() - 1)))
    flat = (index + offsets).reshape(-1)
    return values.reshape(B * M, C).index_select(0, flat).reshape(*index.shape, C)


class NeighborIndex:
    """k-nearest-neighbour search over a fixed batch of reference clouds.

    Build once per target, query every ICP iteration. The CPU backend stacks the whole batch
    in one KD-tree, cloud ``b`` centred and shifted by ``b * offset`` along x (offset larger than
    any distance inside a cloud), so one query serves all pairs with no Python loop over the
    batch. A query that drifted so far from its own cloud that the shared tree answers with
    another cloud's point is answered again by its own cloud's tree: pairs never see each other.
    The brute-force backend searches each pair in coordinates centred on its cloud.

    The compiled backend searches one numba KD-tree per cloud (:mod:`difficp.kdtree`), in
    parallel over all queries: the search never needs a gradient (indices are not
    differentiable; distances and weights are recomputed in PyTorch from the gathered points).

    Args:
        reference: ``(B, M, 3)`` reference points (not differentiated through).
        lengths: ``(B,)`` valid counts of a padded batch, or None.
        backend: ``"compiled"`` (numba KD forest, CPU), ``"kdtree"`` (scipy, CPU),
            ``"brute_force"`` (tiled matrix products and top-k; any device) or ``"auto"``
            (compiled on CPU, scipy in a forked child of a process that ran the compiled
            kernels, brute force on accelerators).
        leaf_size: most points per leaf of the compiled backend's trees (None:
            :data:`difficp.kdtree.LEAF_SIZE`).
    """

    def __init__(
        self,
        reference: Tensor,
        lengths: Tensor | None = None,
        backend: SearchBackend = "auto",
        leaf_size: int | None = None,
    ) -> None:
        if backend not in ("auto", "kdtree", "compiled", "brute_force"):
            raise ValueError(
                f"backend must be 'auto', 'kdtree', 'compiled' or 'brute_force', got {backend!r}"
            )
        if backend == "auto":
            backend = "compiled" if reference.device.type == "cpu" else "brute_force"
            if backend == "compiled" and _compiled_unsafe():
                backend = "kdtree"
        if backend == "compiled" and reference.device.type != "cpu":
            raise ValueError("backend 'compiled' runs on the CPU; use 'brute_force' on devices")
        self.backend = backend
        # scipy's query threads and torch's OpenMP pool fight for cores when both run: measured
        # 10x slower ICP on 2 busy cores. Query threads pay off only for large queries.
        self.workers = 1
        self.reference = reference.detach()
        B, M, _ = reference.shape
        self.batch = B
        self.mask = lengths_mask(lengths, B, M, reference.device)
        self.counts = self.mask.sum(1)
        self._tree: cKDTree | None = None  # built on the first query (the fast path needs none)
        self._cloud_trees: dict[int, tuple[cKDTree, np.ndarray]] = {}
        self._centered: tuple[Tensor, Tensor] | None = None
        self._forest: KDForest | None = None  # built on the first compiled query
        self._forest_order: np.ndarray | None = None
        self._leaf_size = leaf_size
        self._warm: dict[tuple[int, int, float | None], Any] = {}  # kdtree.KnnWarmStart

    def _build_tree(self) -> None:
        from scipy.spatial import cKDTree  # here: the compiled fast path needs no scipy

        ref = self.reference.cpu().double().numpy()
        mask = self.mask.cpu().numpy()
        if self.batch == 1:
            self._global_index = np.nonzero(mask[0])[0]
            self._tree = cKDTree(
                ref[0][mask[0]], leafsize=16, balanced_tree=True, compact_nodes=True
            )
            return
        b_idx, m_idx = np.nonzero(mask)
        pts = ref[b_idx, m_idx]
        # Centre every cloud on its bounding box, then shift cloud b by b * offset along x. Points
        # of one cloud are < 2 * radius apart and points of different clouds > offset - 2 * radius,
        # so the nearest neighbour of a query near its own cloud stays inside that cloud and one
        # tree and one query serve the whole batch (a 3-D tree of shifted clouds measured 1.5x
        # faster than a 4th coordinate). Centring keeps the shifted coordinates as precise as the
        # clouds' own, wherever they lie. Queries that drifted far are checked after the search.
        self._center = np.zeros((self.batch, 3))
        for b in range(self.batch):
            cloud = ref[b][mask[b]]
            if cloud.size:
                self._center[b] = 0.5 * (cloud.min(0) + cloud.max(0))
        pts -= self._center[b_idx]
        radius = float(np.sqrt((pts * pts).sum(1).max())) if pts.size else 0.0
        self._offset = 4.0 * radius if radius > 0 else 1.0
        pts[:, 0] += b_idx * self._offset
        self._global_index = m_idx
        self._cloud_of = b_idx
        self._tree = cKDTree(pts, leafsize=16, balanced_tree=True, compact_nodes=True)

    def _cloud_tree(self, b: int) -> tuple[cKDTree, np.ndarray]:
        """The KD-tree of cloud ``b`` alone (built when first needed) and its point indices."""
        if b not in self._cloud_trees:
            from scipy.spatial import cKDTree  # here: the compiled fast path needs no scipy

            mask = self.mask[b].cpu().numpy()
            ref = self.reference[b].cpu().double().numpy()[mask]
            tree = cKDTree(ref, leafsize=16, balanced_tree=True, compact_nodes=True)
            self._cloud_trees[b] = (tree, np.nonzero(mask)[0])
        return self._cloud_trees[b]

    def query(
        self,
        queries: Tensor,
        k: int = 1,
        query_mask: Tensor | None = None,
        max_distance: float | None = None,
        workers: int | None = None,
        repeated: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest references of each query, closest first.

        Args:
            queries: ``(B, N, 3)``.
            k: neighbours per query (at most the smallest reference count).
            query_mask: ``(B, N)`` bool; masked-out queries get index 0 and found False.
            max_distance: only neighbours within this distance count as found (faster search).
            workers: KD-tree query threads (default: 1 for small queries, all cores for large).
            repeated: the same queries will ask again after moving a little (ICP): the
                compiled backend keeps what makes the next answer cheap, at ~1.7x the cost of
                a plain search for ``k = 1``. False for a one-off question.
        Returns:
            ``index`` ``(B, N, k)`` long into the reference clouds (always a valid index) and
            ``found`` ``(B, N, k)`` bool.
        """
        B, N, _ = queries.shape
        if self.batch != B:
            raise ValueError(f"queries have batch {B}, the index was built for {self.batch}")
        if query_mask is None:
            query_mask = torch.ones(B, N, dtype=torch.bool, device=queries.device)
        if self.backend == "compiled":
            index, found = self._query_forest(queries.detach(), k, max_distance, repeated)
        elif self.backend == "kdtree":
            index, found = self._query_tree(queries.detach(), k, max_distance, workers)
        else:
            index, found = self._query_brute_force(queries.detach(), k, max_distance)
        found = found & query_mask[..., None] & (self.counts[:, None, None] > 0)
        return torch.where(found, index, torch.zeros_like(index)), found

    def compiled_forest(self) -> tuple[KDForest, np.ndarray | None]:
        """The numba KD-forest of the reference clouds (:class:`difficp.kdtree.KDForest`, built
        on the first call; the compiled backend's search structure, shared with the covariance
        estimate and the fused ICP kernel) and ``order`` ``(B, M)``: each forest cloud's point
        ``j`` is the reference's point ``order[b, j]`` (None: the identity, for prefix masks)."""
        if self._forest is None:
            from difficp.kdtree import LEAF_SIZE, build_forest  # here: numba only when used

            compiled_threads_as_torch()
            # Valid points first (prefix masks, as inputs.prepare_problem makes them): the
            # forest takes counts. A mask with holes is compacted into a prefix first.
            B, M = self.mask.shape
            prefix = bool((self.mask == lengths_mask(self.counts, B, M, self.mask.device)).all())
            ref = self.reference
            self._forest_order = None
            if not prefix:
                order = torch.argsort((~self.mask).to(torch.int8), dim=1, stable=True)
                self._forest_order = order.cpu().numpy()
                ref = torch.gather(ref, 1, order[..., None].expand(-1, -1, 3))
            leaf_size = LEAF_SIZE if self._leaf_size is None else self._leaf_size
            self._forest = build_forest(
                ref.cpu().double().numpy(), self.counts.cpu().numpy(), leaf_size=leaf_size
            )
        return self._forest, self._forest_order

    def built_forest(self) -> KDForest | None:
        """The forest of :meth:`compiled_forest` if it is built already and in the clouds' own
        order (a prefix mask), else None: for the fused ICP kernel, which builds its own
        otherwise."""
        return self._forest if self._forest is not None and self._forest_order is None else None

    def _query_forest(
        self, queries: Tensor, k: int, max_distance: float | None, repeated: bool = True
    ) -> tuple[Tensor, Tensor]:
        # Imported here: importing difficp must not load numba (~70 MB).
        from difficp.kdtree import on_calling_thread

        forest, _ = self.compiled_forest()
        B, N, _ = queries.shape
        with on_calling_thread() if B * N <= SERIAL_QUERIES else nullcontext():
            row = self._search_forest(forest, queries, k, max_distance, repeated)
        found = torch.from_numpy(row >= 0)
        index = torch.from_numpy(row).clamp_min_(0)
        if self._forest_order is not None:  # back to the cloud's own order
            index = torch.gather(torch.from_numpy(self._forest_order), 1, index.reshape(B, -1))
        return index.reshape(B, N, k).to(queries.device), found.to(queries.device)

    def _search_forest(
        self, forest: KDForest, queries: Tensor, k: int, max_distance: float | None, repeated: bool
    ) -> np.ndarray:
        """``(B, N, k)`` int64 rows of :meth:`_query_forest` (-1: none found)."""
        from difficp.kdtree import knearest, knn_warm_start, nearest  # numba: only when used

        B, N, _ = queries.shape
        # Masked-out queries are answered too (cheap) and dropped by the caller's found mask.
        # Contiguous in the same pass: moved points are often a transposed product's view,
        # which .double() would keep strided and the search would copy again (.to returns a
        # float64 input itself, strided or not: .contiguous() then copies it once).
        moved = queries.cpu().to(torch.float64, memory_format=torch.contiguous_format)
        q = moved.contiguous().numpy()
        if repeated:
            # ICP asks again with queries that barely moved: keep each query's neighbours and
            # how far it may move before they can change (kdtree.KnnWarmStart), per question.
            key = (N, k, max_distance)
            if key not in self._warm:
                self._warm[key] = knn_warm_start(B, N, k)
            row, _ = knearest(forest, q, k, None, max_distance, self._warm[key])
            return row
        if k == 1:  # a plain search, without that bookkeeping
            return nearest(forest, q, None, max_distance)[0][..., None]
        return knearest(forest, q, k, None, max_distance)[0]

    def _query_tree(
        self, queries: Tensor, k: int, max_distance: float | None, workers: int | None = None
    ) -> tuple[Tensor, Tensor]:
        B, N, _ = queries.shape
        if self._tree is None:
            self._build_tree()
        assert self._tree is not None
        raw = queries.cpu().double().numpy().reshape(B * N, 3)
        query_cloud = np.repeat(np.arange(B), N)
        # A copy: the batch shift below must not write into the caller's tensor.
        q = np.array(raw)
        if self.batch > 1:
            q -= self._center[query_cloud]
            q[:, 0] += query_cloud * self._offset
        bound = math.inf if max_distance is None else float(max_distance)
        if workers is None:
            workers = self.workers if q.shape[0] * k < 8192 else -1
        dist, idx = self._tree.query(q, k=k, distance_upper_bound=bound, workers=workers)
        dist = dist.reshape(B * N, k)
        idx = idx.reshape(B * N, k)
        found = np.isfinite(dist)
        n_tree = self._global_index.shape[0]
        safe = np.minimum(idx, max(n_tree - 1, 0))
        if self.batch > 1 and n_tree:
            # A query far from its own cloud can be nearest to another pair's cloud. Every found
            # neighbour inside the query's own cloud is also its nearest there; other queries are
            # answered again by their own cloud's tree (rare: only after a large drift).
            leaked = (found & (self._cloud_of[safe] != query_cloud[:, None])).any(1)
            if leaked.any():
                idx = np.array(idx)
                self._requery(raw, query_cloud, leaked, k, bound, idx, found)
                safe = np.minimum(idx, max(n_tree - 1, 0))
        idx = self._global_index[safe] if n_tree else idx * 0
        index = torch.from_numpy(idx.reshape(B, N, k)).to(queries.device)
        return index, torch.from_numpy(found.reshape(B, N, k)).to(queries.device)

    def _requery(
        self,
        raw: np.ndarray,
        query_cloud: np.ndarray,
        rows: np.ndarray,
        k: int,
        bound: float,
        idx: np.ndarray,
        found: np.ndarray,
    ) -> None:
        """Answer the queries ``rows`` ``(B * N,)`` bool with their own cloud's tree, writing
        shared-tree rows (cloud-local index + the cloud's first row) into ``idx`` / ``found``."""
        first_row = np.searchsorted(self._cloud_of, np.arange(self.batch))
        for b in np.unique(query_cloud[rows]):
            sel = np.nonzero(rows & (query_cloud == b))[0]
            tree, _ = self._cloud_tree(int(b))
            dist, local = tree.query(raw[sel], k=k, distance_upper_bound=bound)
            dist = dist.reshape(len(sel), k)
            local = local.reshape(len(sel), k)
            ok = np.isfinite(dist)
            found[sel] = ok
            # Rows of the shared tree are the clouds' valid points in batch order.
            idx[sel] = np.where(ok, first_row[b] + local, 0)

    def _query_brute_force(
        self, queries: Tensor, k: int, max_distance: float | None
    ) -> tuple[Tensor, Tensor]:
        if self._centered is None or self._centered[0].dtype != queries.dtype:
            # |q|^2 - 2 q.r + |r|^2 cancels catastrophically for clouds far from the origin:
            # search in coordinates centred on each reference cloud instead.
            ref64 = self.reference.double()
            w = self.mask[..., None].double()
            center = (ref64 * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
            self._centered = ((ref64 - center).to(queries.dtype), center)
        ref, center = self._centered
        queries = (queries.double() - center).to(queries.dtype)
        index, d2 = blocked_knn(queries, ref, self.mask, k)
        found = torch.isfinite(d2)
        if max_distance is not None:
            exact = (_gather(ref, index) - queries[:, :, None, :]).norm(dim=-1)
            found = found & (exact <= max_distance)
        return index, found


def blocked_knn(
    queries: Tensor, reference: Tensor, mask: Tensor, k: int, block: int = _BRUTE_FORCE_BLOCK
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by brute force in bounded memory, for any device.

    Queries are taken in chunks and the references in tiles, so no temporary exceeds about
    ``block`` distances (100k x 100k points: 2^22 at a time, not 10^10); each tile's top-k is
    merged into the running best. The expansion ``|q|^2 - 2 q.r + |r|^2`` (one matrix product)
    only ranks the candidates: the kept neighbours' squared distances are then recomputed from
    the differences and re-sorted, so they are as exact as a KD-tree's.

    Args:
        queries: ``(B, N, 3)``; reference: ``(B, M, 3)``, both best centred on the reference
            (the expansion cancels far from the origin); mask: ``(B, M)`` bool of real points.
        k: neighbours per query (at most M).
        block: elements of one ``chunk x tile`` distance block.
    Returns:
        ``index`` ``(B, N, k)`` long and squared distances ``(B, N, k)`` (inf for missing
        references), closest first.
    """
    B, N, _ = queries.shape
    M = reference.shape[1]
    ref_sq = (reference * reference).sum(-1)
    ref_sq = torch.where(mask, ref_sq, torch.full_like(ref_sq, math.inf))
    # Tiles of references at least 2k wide (the merge keeps k of k + tile), chunks of queries
    # filling the rest of the block.
    tile = min(M, max(2 * k, 4096, block // max(1, B * N)))
    chunk = max(1, block // max(1, B * tile))
    index_parts, dist_parts = [], []
    for start in range(0, N, chunk):
        q = queries[:, start : start + chunk]
        q_sq = (q * q).sum(-1, keepdim=True)
        best_d2: Tensor | None = None
        best_i: Tensor | None = None
        for t0 in range(0, M, tile):
            r = reference[:, t0 : t0 + tile]
            d2 = q_sq - 2 * q @ r.transpose(1, 2) + ref_sq[:, None, t0 : t0 + tile]
            kk = min(k, d2.shape[-1])
            d2_k, i_k = torch.topk(d2, kk, dim=-1, largest=False)
            i_k = i_k + t0
            if best_d2 is None or best_i is None:
                best_d2, best_i = d2_k, i_k
            else:
                merged_d2 = torch.cat([best_d2, d2_k], -1)
                merged_i = torch.cat([best_i, i_k], -1)
                best_d2, pos = torch.topk(merged_d2, min(k, merged_d2.shape[-1]), -1, False)
                best_i = torch.gather(merged_i, -1, pos)
        assert best_d2 is not None and best_i is not None
        # Exact squared distances of the kept neighbours, closest first.
        exact = ((_gather(reference, best_i) - q[:, :, None, :]) ** 2).sum(-1)
        exact = torch.where(torch.isfinite(best_d2), exact, best_d2)
        exact, order = torch.sort(exact, dim=-1, stable=True)
        index_parts.append(torch.gather(best_i, -1, order))
        dist_parts.append(exact)
    return torch.cat(index_parts, 1), torch.cat(dist_parts, 1)


def _compiled_unsafe() -> bool:
    """Whether ``backend="auto"`` should not search with the compiled KD forest here: in a
    forked child of a process whose OpenMP pool the compiled kernels started (numba would
    terminate it), or before its searches (:func:`difficp.kdtree.knearest`, ``nearest``) are
    compiled (minutes on a first use; ``difficp warmup``, which the fast path starts in the
    background, compiles them)."""
    from difficp import kdtree  # here: importing difficp must not load numba

    if kdtree.parallel_unsafe_after_fork():
        return True
    searches = (kdtree._knearest_batch, kdtree._nearest_batch)
    kernels = (*searches, kdtree._build_forest, kdtree._build_tree_parallel)
    return not compile_or_fall_back(kernels_cached(kernels))


def spatial_order(points: Tensor, mask: Tensor | None = None, bits: int = 10) -> Tensor:
    """``(B, N)`` permutation putting each cloud of ``points`` ``(B, N, 3)`` in Morton (Z) order.

    KD-tree queries that arrive in spatial order reuse the tree nodes they just visited
    (cache hits), which measured 1.1-2x faster on shuffled scans. Masked-out (padding) points
    go last, so a prefix mask stays a prefix mask.
    """
    B, N, _ = points.shape
    p = points.detach()
    valid = torch.ones(B, N, dtype=torch.bool, device=p.device) if mask is None else mask
    big = torch.finfo(p.dtype).max
    lo = torch.where(valid[..., None], p, torch.full_like(p, big)).amin(1, keepdim=True)
    hi = torch.where(valid[..., None], p, torch.full_like(p, -big)).amax(1, keepdim=True)
    scale = (hi - lo).clamp_min(torch.finfo(p.dtype).tiny)
    grid = ((p - lo) / scale * (2**bits - 1)).clamp(0, 2**bits - 1).long()
    code = torch.zeros(B, N, dtype=torch.long, device=p.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((grid[..., axis] >> bit) & 1) << (3 * bit + axis)
    code = torch.where(valid, code, torch.full_like(code, 1 << (3 * bits)))
    return torch.argsort(code, dim=1, stable=True)


def _gather_optional(values: Tensor | None, index: Tensor) -> Tensor | None:
    """``(B, M, ...)`` per-point values gathered at ``index`` ``(B, N)``, or None without them."""
    if values is None:
        return None
    return _gather(values.flatten(2), index).unflatten(-1, values.shape[2:])


@dataclass
class PointTarget:
    """A target point cloud, prepared once: ``points``/``normals`` ``(B, M, 3)``, ``mask`` ``(B, M)``,
    the neighbour index (None for dense soft correspondences) and per-point ``features``
    ``(B, M, F)`` (the colour terms of metric ``"colored"``, else None)."""

    points: Tensor
    normals: Tensor | None
    mask: Tensor
    index: NeighborIndex | None
    covariances: Tensor | None = None  # (B, M, 3, 3), metric "gicp"
    features: Tensor | None = None


def nearest_correspondences(
    source: Tensor, target: PointTarget, source_mask: Tensor, max_distance: float | None = None
) -> Correspondences:
    """Hard nearest-neighbour partners.

    The partner carries the chosen target point's normal, covariance and features (those of
    ``target`` that are not None); gradients flow into the chosen target points.

    Args:
        source: ``(B, N, 3)`` source points already moved by the current transform.
        target: the prepared :class:`PointTarget`, with its :class:`NeighborIndex`.
        source_mask: ``(B, N)`` bool, real (non-padding) source points.
        max_distance: search radius; points with no target within it get no partner (this is
            Open3D's hybrid search, and what makes hard rejection cheap).
    """
    if target.index is None:
        raise ValueError("nearest_correspondences needs a NeighborIndex on the target")
    idx, found = target.index.query(source, 1, query_mask=source_mask, max_distance=max_distance)
    idx, found = idx[..., 0], found[..., 0]
    partner = _gather(target.points, idx)
    distance = _safe_norm(source - partner)
    return Correspondences(
        partner,
        _gather_optional(target.normals, idx),
        found,
        distance,
        covariances=_gather_optional(target.covariances, idx),
        features=_gather_optional(target.features, idx),
    )


def _safe_norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis whose gradient is 0 (not NaN) at the zero vector."""
    sq = (v * v).sum(-1)
    zero = sq <= 0
    return torch.where(
        zero, torch.zeros_like(sq), torch.where(zero, torch.ones_like(sq), sq).sqrt()
    )


def _normalize(v: Tensor) -> Tensor:
    return v / _safe_norm(v)[..., None].clamp_min(torch.finfo(v.dtype).tiny)


def soft_correspondences(
    source: Tensor,
    target: PointTarget,
    temperature: Tensor | float,
    source_mask: Tensor,
    soft_k: int | None = None,
) -> Correspondences:
    """Soft partners: the softmax(-|p - q|^2 / temperature)-weighted mean of the targets.

    With ``soft_k`` the softmax runs over the ``soft_k`` nearest targets only (found with
    ``target.index``, without gradient), which bounds memory at ``B * N * soft_k``; otherwise
    over all targets, chunked over the source points (see :mod:`difficp.softmatch` for the
    memory-bounded dense version). Partner normals are the same weighted mean, re-normalised;
    covariances (metric ``"gicp"``) and features (colours) are the same weighted mean, not
    re-normalised. As ``temperature -> 0`` all tend to :func:`nearest_correspondences`.

    Args:
        source: ``(B, N, 3)`` transformed source points.
        target: the prepared :class:`PointTarget` (its ``index`` is needed with ``soft_k``).
        temperature: scalar (float or 0-d tensor), squared distance units.
        source_mask: ``(B, N)`` bool of real source points.
        soft_k: number of nearest targets in the softmax, or None for all.
    """
    points, target_mask, index = target.points, target.mask, target.index
    target_normals, target_covariances = target.normals, target.covariances
    target_features = target.features
    covariances = features = None
    if soft_k is not None:
        if index is None:
            raise ValueError("soft_correspondences with soft_k needs a NeighborIndex on the target")
        k = int(min(soft_k, int(target_mask.sum(1).min().clamp_min(1))))
        idx, found = index.query(source, k, query_mask=source_mask)
        # Normals and covariances ride along as more channels of the same weighted mean.
        channels = [] if target_normals is None else [target_normals]
        if target_covariances is not None:
            channels.append(target_covariances.flatten(-2))
        if target_features is not None:
            channels.append(target_features)
        extra = torch.cat(channels, -1) if channels else None
        partner, mixed = topk_soft_match(source, points, extra, temperature, idx, found)
        F = 0 if target_features is None else target_features.shape[-1]
        if F:
            assert mixed is not None
            features, mixed = mixed[..., -F:], mixed[..., :-F]
        normals = None
        if target_normals is not None:
            assert mixed is not None
            normals = _normalize(mixed[..., :3])
        if target_covariances is not None:
            assert mixed is not None
            covariances = mixed[..., -9:].unflatten(-1, (3, 3))
        any_found = found.any(-1)
        valid = source_mask & any_found
    else:
        if target_covariances is None:
            partner, normals = dense_soft_match(
                source, points, target_normals, temperature, target_mask
            )
        else:
            # The covariances ride along as 9 more channels of the same weighted mean.
            channels = [target_covariances.flatten(-2)]
            if target_normals is not None:
                channels.insert(0, target_normals)
            partner, mixed = dense_soft_match(
                source, points, torch.cat(channels, -1), temperature, target_mask, normalize=False
            )
            assert mixed is not None
            covariances = mixed[..., -9:].unflatten(-1, (3, 3))
            normals = None if target_normals is None else _normalize(mixed[..., :3])
        if target_features is not None:
            features = dense_soft_mean(source, points, target_features, temperature, target_mask)
        valid = source_mask & target_mask.any(1)[:, None]
    distance = _safe_norm(source - partner)
    return Correspondences(
        partner, normals, valid, distance, covariances=covariances, features=features
    )


@dataclass
class DepthTarget:
    """A target given as depth maps, prepared once for projective correspondences.

    Attributes:
        points: ``(B, H, W, 3)`` back-projected target points in the target (world) frame.
        normals: ``(B, H, W, 3)`` their unit normals (zero where undefined).
        valid: ``(B, H, W)`` bool, pixels with positive depth.
        intrinsics: ``(B, 3, 3)``.
        world_to_camera: ``(B, 4, 4)``, inverse of the camera pose.
    """

    points: Tensor
    normals: Tensor
    valid: Tensor
    intrinsics: Tensor
    world_to_camera: Tensor


def projective_correspondences(
    source: Tensor, target: DepthTarget, source_mask: Tensor
) -> Correspondences:
    """Partners by projection: each source point takes the target pixel it falls on.

    The source point (already in the target's world frame) is moved into the target camera,
    projected with the pinhole model and rounded to the nearest pixel. Points behind the camera,
    outside the image, or on a pixel with zero depth get no partner. The partner's coordinates
    are differentiable in the target depth; the choice of pixel is not.

    Args:
        source: ``(B, N, 3)`` transformed source points.
        target: the prepared :class:`DepthTarget`.
        source_mask: ``(B, N)`` bool of real points.
    """
    B, H, W, _ = target.points.shape
    in_camera = transform_points(source, target.world_to_camera)
    uv, z = points_to_pixels(in_camera, target.intrinsics)
    col = torch.round(uv[..., 0].detach())
    row = torch.round(uv[..., 1].detach())
    inside = (z > 0) & (col >= 0) & (col <= W - 1) & (row >= 0) & (row <= H - 1)
    flat = torch.where(inside, row * W + col, torch.zeros_like(col)).long()
    pts = target.points.reshape(B, H * W, 3)
    partner = _gather(pts, flat)
    normals = _gather(target.normals.reshape(B, H * W, 3), flat)
    has_depth = torch.gather(target.valid.reshape(B, H * W), 1, flat)
    valid = source_mask & inside & has_depth
    distance = _safe_norm(source - partner)
    return Correspondences(partner, normals, valid, distance)
