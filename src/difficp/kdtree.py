"""A compiled (numba) KD-tree forest for the hard-nearest ICP fast path.

Why not scipy: ICP asks the same question 30 times with queries that barely move. scipy's
``cKDTree.query`` answers each call from scratch and, at 10k points, takes longer than a whole
Open3D iteration. Here the search is a numba function that the fused ICP kernel
(:mod:`difficp.fused`) calls per point, warm-started with the point's previous partner: the
distance to it bounds the search from the first node, so most of the tree is pruned at once.
The answer is still the exact nearest neighbour (ties aside).

Layout: one tree per cloud of a batch, all stored in flat arrays. Tree ``b`` owns points
``point_offset[b] : point_offset[b + 1]`` of ``points`` (reordered so that every node covers a
contiguous range; ``order`` maps back to the cloud's own indices) and nodes
``node_offset[b] :``. A node stores its point range, its first child (the second child is the
next node; -1 for a leaf), its split (axis and value), its bounding box and its cell. Splits are
at the median of the widest box side, so trees are balanced and leaves hold between
``leaf_size // 2`` and ``leaf_size`` points (``LEAF_SIZE`` unless the build asks for another).
A search goes down the child on its side of each split and prunes the other by the distance to
the split plane; boxes bound the node a search starts from, cells find that node.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from numba.core.errors import NumbaWarning

# numba tries its TBB layer first and, finding an older TBB (open3d ships one), warns before
# falling back to OpenMP: harmless, and not something a difficp user can act on.
warnings.filterwarnings(
    "ignore", message=".*The TBB threading layer requires TBB version", category=NumbaWarning
)

LEAF_SIZE = 8
# Deep enough for any balanced tree that fits in memory (depth ~ log2(points / LEAF_SIZE)).
STACK_DEPTH = 96


class KDForest(NamedTuple):
    """Flat arrays of one KD-tree per cloud (see the module docstring); a named tuple, so the
    compiled functions take it as one argument.

    Attributes:
        points: ``(P, 3)`` float64, every cloud's valid points in tree order.
        order: ``(P,)`` int64, index of each tree point in its own cloud.
        point_offset: ``(B + 1,)`` int64.
        node_offset: ``(B,)`` int64, the root node of each tree.
        node_start, node_end: ``(nodes,)`` int64 point range of a node, local to its tree.
        node_child: ``(nodes,)`` int64 first child, local to its tree (-1 for a leaf).
        node_low, node_high: ``(nodes, 3)`` float64 bounding box.
        cell_low, cell_high: ``(nodes, 3)`` float64 cell of the median splits (the root's is
            infinite); it holds the node's box, and no other point lies inside it.
        node_parent: ``(nodes,)`` int64 parent, local to its tree (-1 for a root).
        point_leaf: ``(P,)`` int64 leaf holding each tree point, local to its tree.
        node_axis, node_split: ``(nodes,)`` int64 / float64 the split of an inner node: its
            first child's points have ``point[axis] <= split``, its second child's ``>=``.
    """

    points: np.ndarray
    order: np.ndarray
    point_offset: np.ndarray
    node_offset: np.ndarray
    node_start: np.ndarray
    node_end: np.ndarray
    node_child: np.ndarray
    node_low: np.ndarray
    node_high: np.ndarray
    cell_low: np.ndarray
    cell_high: np.ndarray
    node_parent: np.ndarray
    point_leaf: np.ndarray
    node_axis: np.ndarray
    node_split: np.ndarray

    @property
    def batch(self) -> int:
        return self.node_offset.shape[0]


@njit(cache=True, error_model="numpy")
def _node_capacity(count: int, leaf_size: int) -> int:
    """Nodes to reserve for a tree of ``count`` points: leaves hold >= leaf_size // 2 points,
    so there are at most count / (leaf_size // 2) of them and a binary tree has 2 * leaves - 1
    nodes."""
    return 2 * max(1, count // (leaf_size // 2)) + 1


@njit(cache=True, error_model="numpy")
def _select(pts: np.ndarray, idx: np.ndarray, lo: int, hi: int, k: int, dim: int) -> None:
    """Quickselect: reorder the rows ``lo:hi`` of ``pts`` ``(M, 3)`` (and ``idx`` with them) so
    that row ``k`` holds the k-th smallest ``pts[:, dim]``, with nothing larger before it and
    nothing smaller after it. The rows themselves move (not an index into them): the passes
    of every level then read memory in order."""
    while hi - lo > 1:
        a = pts[lo, dim]
        b = pts[(lo + hi - 1) // 2, dim]
        c = pts[hi - 1, dim]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi - 1
        while i <= j:
            while pts[i, dim] < pivot:
                i += 1
            while pts[j, dim] > pivot:
                j -= 1
            if i <= j:
                for d in range(3):
                    pts[i, d], pts[j, d] = pts[j, d], pts[i, d]
                idx[i], idx[j] = idx[j], idx[i]
                i += 1
                j -= 1
        # now [lo, j] <= pivot <= [i, hi) and everything strictly between equals the pivot
        if k <= j:
            hi = j + 1
        elif k >= i:
            lo = i
        else:
            return


class _Tree(NamedTuple):
    """The arrays one tree's build writes: views into a :class:`KDForest`'s, node and point
    indices local to the tree (a named tuple, so the compiled builders take it as one
    argument; made by :func:`_tree_view`).

    Attributes:
        points: ``(M, 3)`` float64 the tree's points, sorted into tree order by the build.
        order: ``(M,)`` int64 the cloud's index of each tree point (moves with ``points``).
        leaf_of: ``(M,)`` int64 the leaf of each tree point.
        start, end, child, low, high, cell_low, cell_high, parent, axis, split: the tree's rows
            of the forest's ``node_start``, ``node_end``, ``node_child``, ``node_low``,
            ``node_high``, ``cell_low``, ``cell_high``, ``node_parent``, ``node_axis`` and
            ``node_split``.
    """

    points: np.ndarray
    order: np.ndarray
    leaf_of: np.ndarray
    start: np.ndarray
    end: np.ndarray
    child: np.ndarray
    low: np.ndarray
    high: np.ndarray
    cell_low: np.ndarray
    cell_high: np.ndarray
    parent: np.ndarray
    axis: np.ndarray
    split: np.ndarray


@njit(cache=True, error_model="numpy")
def _tree_view(f: KDForest, n0: int, n1: int, p0: int, p1: int) -> _Tree:
    """The tree of ``f`` that owns nodes ``n0:n1`` and points ``p0:p1``.

    Made outside a parallel function, or inside its parallel loop only to be handed to a
    function that is not inlined: numba's parfors lost the writes through a tuple's attributes
    that a parallel function made itself, to a tuple it had built (seen with numba 0.68)."""
    return _Tree(
        f.points[p0:p1],
        f.order[p0:p1],
        f.point_leaf[p0:p1],
        f.node_start[n0:n1],
        f.node_end[n0:n1],
        f.node_child[n0:n1],
        f.node_low[n0:n1],
        f.node_high[n0:n1],
        f.cell_low[n0:n1],
        f.cell_high[n0:n1],
        f.node_parent[n0:n1],
        f.node_axis[n0:n1],
        f.node_split[n0:n1],
    )


@njit(inline="always", error_model="numpy")
def _split_node(tree: _Tree, node: int, first: int, leaf_size: int) -> bool:
    """Bound ``node`` (its range and cell already set) by the box of its points and, unless
    it is a leaf (at most ``leaf_size`` points; then ``leaf_of`` its points), split them at
    the median of the box's widest side into the children ``first`` and ``first + 1`` (ranges
    and cells set). Returns whether it was split."""
    pts, low, high = tree.points, tree.low, tree.high
    cell_low, cell_high = tree.cell_low, tree.cell_high
    s, e = tree.start[node], tree.end[node]
    lx = ly = lz = np.inf
    hx = hy = hz = -np.inf
    for i in range(s, e):
        x, y, z = pts[i, 0], pts[i, 1], pts[i, 2]
        lx, hx = min(lx, x), max(hx, x)
        ly, hy = min(ly, y), max(hy, y)
        lz, hz = min(lz, z), max(hz, z)
    low[node, 0], low[node, 1], low[node, 2] = lx, ly, lz
    high[node, 0], high[node, 1], high[node, 2] = hx, hy, hz
    if e - s <= leaf_size:
        tree.child[node] = -1
        for i in range(s, e):
            tree.leaf_of[i] = node
        return False
    dim = 0
    for d in range(1, 3):
        if high[node, d] - low[node, d] > high[node, dim] - low[node, dim]:
            dim = d
    mid = (s + e) // 2
    _select(pts, tree.order, s, e, mid, dim)
    tree.start[first], tree.end[first] = s, mid
    tree.start[first + 1], tree.end[first + 1] = mid, e
    tree.child[node] = first
    tree.parent[first] = tree.parent[first + 1] = node
    split = pts[mid, dim]  # left points <= split <= right points
    tree.axis[node] = dim
    tree.split[node] = split
    for d in range(3):
        cell_low[first, d] = cell_low[first + 1, d] = cell_low[node, d]
        cell_high[first, d] = cell_high[first + 1, d] = cell_high[node, d]
    cell_high[first, dim] = split
    cell_low[first + 1, dim] = split
    return True


@njit(inline="always", error_model="numpy")
def _start_tree(tree: _Tree, cloud: np.ndarray) -> None:
    """Copy ``cloud`` ``(M, 3)`` into the tree's points (the build then sorts them into tree
    order) and make node 0 the root: all ``M`` points, in an infinite cell."""
    for i in range(cloud.shape[0]):
        tree.order[i] = i
        for d in range(3):
            tree.points[i, d] = cloud[i, d]
    tree.start[0] = 0
    tree.end[0] = cloud.shape[0]
    tree.parent[0] = -1
    for d in range(3):
        tree.cell_low[0, d] = -np.inf
        tree.cell_high[0, d] = np.inf


@njit(cache=True, error_model="numpy")
def _build_subtree(tree: _Tree, root: int, first_free: int, leaf_size: int) -> int:
    """Build the subtree of ``root`` (its range and cell set) depth first, its other nodes
    numbered from ``first_free``, sorting the tree's points in its range into tree order in
    place (``order`` moves with them); ``leaf_of[i]`` becomes the leaf of tree point ``i``.
    Returns the next free node."""
    stack = np.empty(STACK_DEPTH * 2, dtype=np.int64)
    n_nodes = first_free
    stack[0] = root
    top = 1
    while top > 0:
        top -= 1
        node = stack[top]
        if _split_node(tree, node, n_nodes, leaf_size):
            stack[top] = n_nodes + 1
            stack[top + 1] = n_nodes
            top += 2
            n_nodes += 2
    return n_nodes


@njit(cache=True, error_model="numpy")
def _build_tree(tree: _Tree, cloud: np.ndarray, leaf_size: int) -> None:
    """The whole tree of ``cloud`` ``(M, 3)``, in this thread.

    A function of its own, not inlined into :func:`_build_forest`'s parallel loop: numba's
    parfors lost writes made through a tuple's attributes inside the loop's body (see
    :func:`_tree_view`)."""
    _start_tree(tree, cloud)
    _build_subtree(tree, 0, 1, leaf_size)


@njit(cache=True, error_model="numpy")
def _subtree_size(count: int, leaf_size: int) -> int:
    """Nodes of a tree over ``count`` points (median splits down to ``leaf_size``)."""
    sizes = np.empty(STACK_DEPTH * 2, dtype=np.int64)
    sizes[0] = count
    top = 1
    nodes = 0
    while top > 0:
        top -= 1
        m = sizes[top]
        nodes += 1
        if m > leaf_size:
            sizes[top] = m // 2
            sizes[top + 1] = m - m // 2
            top += 2
    return nodes


# Clouds from this size up, alone in a forest, build their tree on the thread pool (measured
# 267k points: 40 ms on one thread; the pool's start costs ~0.1 ms).
PARALLEL_BUILD_POINTS = 16384
# Levels built breadth first before the subtrees below them are built in parallel: 2 ** 4 = 16
# subtrees, enough to balance a few threads.
PARALLEL_LEVELS = 4
# Leaves no larger than this: a cloud of PARALLEL_BUILD_POINTS then has no leaf above the level
# PARALLEL_LEVELS (see _build_tree_parallel).
MAX_LEAF_SIZE = PARALLEL_BUILD_POINTS // 2**PARALLEL_LEVELS - 1


@njit(parallel=True, cache=True, error_model="numpy")
def _build_tree_parallel(tree: _Tree, cloud: np.ndarray, leaf_size: int) -> int:
    """:func:`_build_tree` of ``cloud`` ``(M, 3)`` on numba's thread pool, for a cloud of at
    least ``2 ** PARALLEL_LEVELS * (leaf_size + 1)`` points (then no node above the level
    ``PARALLEL_LEVELS`` is a leaf): the first levels breadth first in this thread (level ``l``
    is nodes ``2 ** l - 1 : 2 ** (l + 1) - 1``), then the subtrees below in parallel, each
    into its own range of nodes. The same tree as the serial build, numbered differently.

    One parallel region, not one per level as well: on this project's 2-core machine with
    another job on the second core, each region's start cost several milliseconds (measured
    40k points at 2 threads: 40 ms with five regions, 6-7 ms on one thread). Returns the node
    count."""
    _start_tree(tree, cloud)
    for level in range(PARALLEL_LEVELS):
        first_node = (1 << level) - 1
        width = 1 << level
        for j in range(width):
            _split_node(tree, first_node + j, first_node + width + 2 * j, leaf_size)
    width = 1 << PARALLEL_LEVELS
    first_node = width - 1
    base = np.empty(width + 1, dtype=np.int64)
    base[0] = first_node + width  # the nodes above the subtrees and their roots come first
    for j in range(width):
        node = first_node + j
        base[j + 1] = base[j] + _subtree_size(tree.end[node] - tree.start[node], leaf_size) - 1
    for j in prange(width):
        _build_subtree(tree, first_node + j, base[j], leaf_size)
    return base[width]


@njit(parallel=True, cache=True, error_model="numpy")
def _build_forest(
    clouds: np.ndarray,
    counts: np.ndarray,
    node_capacity_offset: np.ndarray,
    f: KDForest,
    leaf_size: int,
) -> None:
    for b in prange(clouds.shape[0]):
        m = counts[b]
        if m == 0:
            continue
        p0 = f.point_offset[b]
        tree = _tree_view(f, node_capacity_offset[b], node_capacity_offset[b + 1], p0, p0 + m)
        # the cloud's rows are sorted into tree order where the forest keeps them
        _build_tree(tree, clouds[b, :m], leaf_size)


@njit(cache=True, error_model="numpy")
def _new_forest(counts: np.ndarray, leaf_size: int) -> tuple[KDForest, np.ndarray]:
    """The empty arrays of a forest of trees over ``counts`` ``(B,)`` points (compiled: small
    problems allocate one per ICP call, and as NumPy calls that measured ~20 us of a 100-point
    call), and the ``(B + 1,)`` offsets of each tree's reserved nodes."""
    B = counts.shape[0]
    point_offset = np.zeros(B + 1, dtype=np.int64)
    capacity_offset = np.zeros(B + 1, dtype=np.int64)
    for b in range(B):
        point_offset[b + 1] = point_offset[b] + counts[b]
        capacity_offset[b + 1] = capacity_offset[b] + _node_capacity(counts[b], leaf_size)
    n_points, n_nodes = point_offset[B], capacity_offset[B]
    boxes = np.zeros((4, n_nodes, 3))  # node_low, node_high, cell_low, cell_high
    links = np.full((2, n_nodes), -1, dtype=np.int64)  # node_child, node_parent
    forest = KDForest(
        points=np.empty((n_points, 3)),
        order=np.empty(n_points, dtype=np.int64),
        point_offset=point_offset,
        node_offset=capacity_offset[:-1].copy(),
        node_start=np.zeros(n_nodes, dtype=np.int64),
        node_end=np.zeros(n_nodes, dtype=np.int64),
        node_child=links[0],
        node_low=boxes[0],
        node_high=boxes[1],
        cell_low=boxes[2],
        cell_high=boxes[3],
        node_parent=links[1],
        point_leaf=np.zeros(n_points, dtype=np.int64),
        node_axis=np.zeros(n_nodes, dtype=np.int64),
        node_split=np.zeros(n_nodes),
    )
    return forest, capacity_offset


def build_forest(
    clouds: np.ndarray, counts: np.ndarray, parallel: bool = True, leaf_size: int = LEAF_SIZE
) -> KDForest:
    """One KD-tree per cloud.

    Args:
        clouds: ``(B, M, 3)`` points; cloud ``b`` uses its first ``counts[b]`` rows.
        counts: ``(B,)`` valid points per cloud (0 allowed: that tree is empty).
        parallel: build the trees on numba's thread pool (False: in this thread).
        leaf_size: most points of a leaf, in ``[2, MAX_LEAF_SIZE]`` (every search works on any
            such tree; only its speed changes).
    """
    clouds = np.ascontiguousarray(clouds, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    if clouds.ndim != 3 or clouds.shape[2] != 3 or counts.shape != (clouds.shape[0],):
        raise ValueError(
            f"clouds must be (B, M, 3) with counts (B,), got {clouds.shape} and {counts.shape}"
        )
    if not 2 <= leaf_size <= MAX_LEAF_SIZE:
        raise ValueError(f"leaf_size must lie in [2, {MAX_LEAF_SIZE}], got {leaf_size}")
    if counts.size and (counts.min() < 0 or counts.max() > clouds.shape[1]):
        raise ValueError(f"counts must lie in [0, {clouds.shape[1]}], got {counts.tolist()}")
    forest, capacity_offset = _new_forest(counts, leaf_size)
    n_nodes = int(capacity_offset[-1])
    if parallel and counts.shape == (1,) and counts[0] >= PARALLEL_BUILD_POINTS:
        # one large cloud: its tree itself built on the thread pool (the forest's loop is over
        # clouds: one thread would build it alone)
        m = int(counts[0])
        _build_tree_parallel(_tree_view(forest, 0, n_nodes, 0, m), clouds[0, :m], leaf_size)
    else:
        with nullcontext() if parallel else on_calling_thread():
            _build_forest(clouds, counts, capacity_offset, forest, leaf_size)
    return forest


@njit(inline="always", error_model="numpy")
def _box_distance2(
    x: float, y: float, z: float, low: np.ndarray, high: np.ndarray, node: int
) -> float:
    dx = max(low[node, 0] - x, 0.0, x - high[node, 0])
    dy = max(low[node, 1] - y, 0.0, y - high[node, 1])
    dz = max(low[node, 2] - z, 0.0, z - high[node, 2])
    return dx * dx + dy * dy + dz * dz


@njit(inline="always", error_model="numpy")
def _point_distance2(f: KDForest, row: int, x: float, y: float, z: float) -> float:
    """Squared distance from ``(x, y, z)`` to row ``row`` of ``f.points``."""
    dx = f.points[row, 0] - x
    dy = f.points[row, 1] - y
    dz = f.points[row, 2] - z
    return dx * dx + dy * dy + dz * dz


@njit(inline="always", error_model="numpy")
def _within(d2: float, bound: float, inclusive: bool) -> bool:
    """Whether a node or point at squared distance ``d2`` can still hold an answer."""
    return d2 <= bound if inclusive else d2 < bound


@njit(inline="always", error_model="numpy")
def _start_search(
    x: float, y: float, z: float, f: KDForest, node: int, stack: np.ndarray, stack_d2: np.ndarray
) -> int:
    """Put ``node`` (global) alone on the depth-first stack; returns the stack's height (1)."""
    stack[0] = node
    stack_d2[0] = _box_distance2(x, y, z, f.node_low, f.node_high, node)
    return 1


@njit(inline="always", error_model="numpy")
def _next_leaf(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    node_base: int,
    bound: float,
    inclusive: bool,
    stack: np.ndarray,
    stack_d2: np.ndarray,
    top: int,
) -> tuple[int, int]:
    """The depth-first descent every search of this module shares: pop nodes off ``stack`` /
    ``stack_d2`` (global nodes with lower bounds of their points' squared distances; ``top``
    entries) until a leaf within ``bound`` (``<=`` with ``inclusive``, else ``<``), going on
    through the child on the query's side of each split and pushing the other one when the
    split is within the bound.

    Returns ``(leaf, top)``: the leaf (global; -1 when the stack ran out) and the new height.
    The caller scans the leaf, tightens its bound and calls again: the bound only changes
    between leaves, so pruning is the same as a loop written out in full.
    """
    while top > 0:
        top -= 1
        if not _within(stack_d2[top], bound, inclusive):
            continue
        node, node_d2 = stack[top], stack_d2[top]
        # Down to a leaf through the child on the query's side of each split, pushing the other
        # one when the split plane is within the bound. The plane's distance is a looser bound
        # than the child's box, but one subtraction instead of two box distances per node:
        # nearest() on 64 x 1024 ModelNet pairs 19.3-19.8 -> 17.9-19.1 ms misaligned and
        # 13.7-14.0 -> 11.3-12.2 ms aligned (alternating processes, medians of 15); the same
        # answers.
        while node >= 0:
            first = f.node_child[node]
            if first < 0:
                return node, top
            axis = f.node_axis[node]
            offset = (x if axis == 0 else (y if axis == 1 else z)) - f.node_split[node]
            near = node_base + first
            far = near + 1
            if offset >= 0.0:
                near, far = far, near
            far_d2 = max(offset * offset, node_d2)
            if _within(far_d2, bound, inclusive):
                stack[top] = far
                stack_d2[top] = far_d2
                top += 1
            node = near
    return -1, 0


@njit(inline="always", error_model="numpy")
def _scan_leaf(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    point_base: int,
    leaf: int,
    d1: float,
    i1: int,
    d2: float,
    i2: int,
) -> tuple[float, int, float, int]:
    """Update the two best answers ``(d1, i1)``, ``(d2, i2)`` with the points of ``leaf``."""
    for i in range(point_base + f.node_start[leaf], point_base + f.node_end[leaf]):
        if i == i1 or i == i2:  # noqa: SIM109 (already an answer: a leaf seen again)
            continue
        d = _point_distance2(f, i, x, y, z)
        if d < d1:
            d2, i2 = d1, i1
            d1, i1 = d, i
        elif d < d2:
            d2, i2 = d, i
    return d1, i1, d2, i2


@njit(cache=True, inline="always", error_model="numpy")
def search_tree(
    x: float,
    y: float,
    z: float,
    d1: float,
    i1: int,
    d2: float,
    i2: int,
    second: bool,
    f: KDForest,
    tree: int,
    stack: np.ndarray,
    stack_d2: np.ndarray,
    first_node: int = -1,
) -> tuple[float, int, float, int]:
    """The nearest (and, with ``second``, second-nearest) points of tree ``tree`` to
    ``(x, y, z)``.

    ``(d1, i1)``, ``(d2, i2)`` are the starting answers: squared distances with rows of
    ``f.points`` (-1 and the squared search radius when unknown; ``d1 <= d2``). Only points
    strictly closer than the bound (``d2`` with ``second``, else ``d1``) are searched, from the
    subtree of ``first_node`` (global; -1: the root), which must hold every such point (see
    :func:`enclosing_node`). Returns the final ``(d1, i1, d2, i2)``. ``stack`` / ``stack_d2``
    are scratch arrays of length ``STACK_DEPTH``.
    """
    point_base = f.point_offset[tree]
    node_base = f.node_offset[tree]
    node = node_base if first_node < 0 else first_node
    top = _start_search(x, y, z, f, node, stack, stack_d2)
    while True:
        bound = d2 if second else d1
        leaf, top = _next_leaf(x, y, z, f, node_base, bound, False, stack, stack_d2, top)
        if leaf < 0:
            return d1, i1, d2, i2
        d1, i1, d2, i2 = _scan_leaf(x, y, z, f, point_base, leaf, d1, i1, d2, i2)


@njit(cache=True, inline="always", error_model="numpy")
def enclosing_node(
    x: float, y: float, z: float, radius: float, leaf: int, f: KDForest, tree: int
) -> int:
    """The lowest ancestor of ``leaf`` (global) whose cell strictly contains the ball of
    ``radius`` about ``(x, y, z)``, or the root of tree ``tree`` (global indices).

    Every point inside that ball belongs to the returned subtree: a point of another subtree
    lies on the far side of (or on) one of the splits bounding the cell, never in its interior.
    A search warm-started near its last answer thus starts at (or a level or two above) a leaf
    instead of at the root.
    """
    node = leaf
    while True:
        if (
            f.cell_low[node, 0] < x - radius
            and x + radius < f.cell_high[node, 0]
            and f.cell_low[node, 1] < y - radius
            and y + radius < f.cell_high[node, 1]
            and f.cell_low[node, 2] < z - radius
            and z + radius < f.cell_high[node, 2]
        ):
            return node
        up = f.node_parent[node]
        if up < 0:
            return node
        node = f.node_offset[tree] + up


@njit(cache=True, inline="always", error_model="numpy")
def warm_two_nearest(
    x: float,
    y: float,
    z: float,
    last: int,
    radius2: float,
    f: KDForest,
    tree: int,
    stack: np.ndarray,
    stack_d2: np.ndarray,
) -> tuple[float, int, float]:
    """Nearest and second-nearest distances (squared) within ``sqrt(radius2)`` in tree
    ``tree``, starting from ``last`` (a row of ``f.points`` near the answer, or -1): its leaf's
    points give first answers whose distances bound the search, which then starts from the
    lowest node enclosing them.

    Returns ``(d1, i1, d2)``: ``i1`` is -1 when nothing is closer than the radius, and ``d2`` is
    ``radius2`` when there is no second point within it.
    """
    d1, i1, d2, i2 = radius2, -1, radius2, -1
    first = -1
    if last >= 0:
        leaf = f.node_offset[tree] + f.point_leaf[last]
        d1, i1, d2, i2 = _scan_leaf(x, y, z, f, f.point_offset[tree], leaf, d1, i1, d2, i2)
        if d2 < np.inf:
            first = enclosing_node(x, y, z, math.sqrt(d2), leaf, f, tree)
    d1, i1, d2, _ = search_tree(x, y, z, d1, i1, d2, i2, True, f, tree, stack, stack_d2, first)
    return d1, i1, d2


@njit(parallel=True, cache=True, error_model="numpy")
def _nearest_batch(
    queries: np.ndarray,
    query_counts: np.ndarray,
    radius2: float,
    f: KDForest,
    out_index: np.ndarray,
    out_d2: np.ndarray,
) -> None:
    B, N = queries.shape[0], queries.shape[1]
    for b in prange(B):
        stack = np.empty(STACK_DEPTH, dtype=np.int64)
        stack_d2 = np.empty(STACK_DEPTH)
        empty = f.point_offset[b + 1] == f.point_offset[b]
        for i in range(N):
            out_index[b, i] = -1
            out_d2[b, i] = np.inf
            if i >= query_counts[b] or empty:
                continue
            x, y, z = queries[b, i, 0], queries[b, i, 1], queries[b, i, 2]
            d2, best, _, _ = search_tree(
                x, y, z, radius2, -1, radius2, -1, False, f, b, stack, stack_d2
            )
            out_index[b, i] = best
            out_d2[b, i] = d2 if best >= 0 else np.inf


def _checked_queries(
    forest: KDForest,
    queries: np.ndarray,
    query_counts: np.ndarray | None,
    max_distance: float | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The arguments of :func:`nearest` / :func:`knearest`, checked: ``queries`` ``(B, N, 3)``
    float64 contiguous, ``counts`` ``(B,)`` int64 (all ``N`` when None) and the squared radius
    (inf without ``max_distance``)."""
    queries = np.ascontiguousarray(queries, dtype=np.float64)
    if queries.ndim != 3 or queries.shape[2] != 3:
        raise ValueError(f"queries must be (B, N, 3), got {queries.shape}")
    B, N, _ = queries.shape
    if forest.batch != B:
        raise ValueError(f"queries have batch {B}, the forest was built for {forest.batch}")
    counts = (
        np.full(B, N, dtype=np.int64)
        if query_counts is None
        else np.asarray(query_counts, dtype=np.int64)
    )
    if counts.shape != (B,) or (B and (counts.min() < 0 or counts.max() > N)):
        raise ValueError(f"query_counts must be (B,) in [0, {N}], got {counts.tolist()}")
    if max_distance is not None and not float(max_distance) > 0:
        raise ValueError(f"max_distance must be positive (or None), got {max_distance}")
    radius2 = np.inf if max_distance is None else float(max_distance) ** 2
    return queries, counts, radius2


def nearest(
    forest: KDForest,
    queries: np.ndarray,
    query_counts: np.ndarray | None = None,
    max_distance: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbour of each query in its own cloud's tree (a plain, cold search).

    Args:
        queries: ``(B, N, 3)``; cloud ``b`` uses its first ``query_counts[b]`` (all if None).
        max_distance: only neighbours closer than this count.
    Returns:
        ``index`` ``(B, N)`` int64 into each cloud (-1: none found) and ``distance`` ``(B, N)``
        (inf: none found).
    """
    queries, counts, radius2 = _checked_queries(forest, queries, query_counts, max_distance)
    B, N, _ = queries.shape
    row = np.empty((B, N), dtype=np.int64)
    d2 = np.empty((B, N))
    _nearest_batch(queries, counts, radius2, forest, row, d2)
    if forest.order.size == 0:  # every tree is empty
        return np.full((B, N), -1, dtype=np.int64), np.full((B, N), np.inf)
    index = np.where(row >= 0, forest.order[np.maximum(row, 0)], -1)
    return index, np.sqrt(d2)


# ----------------------------------------------------------------------------------------------
# k nearest neighbours of the tree's own points, and PCA normals from them
# ----------------------------------------------------------------------------------------------

# Tree points per parallel task of the normals kernel (consecutive in tree order, so one task's
# queries are spatial neighbours and share the nodes they visit).
NORMALS_CHUNK = 512


@njit(inline="always", error_model="numpy")
def _offer(
    d: float, i: int, best_d2: np.ndarray, best: np.ndarray, count: int, k: int, limit: float
) -> int:
    """Offer point ``i`` at squared distance ``d`` to the ``k`` best answers so far,
    ``best_d2[:count]`` / ``best[:count]`` sorted closest first; while they are fewer than
    ``k``, only points within ``limit`` are taken. Returns the new count.

    A sorted array, as the ICP search's :func:`_insert`, not a max-heap: an insertion shifts
    the farther entries by one in a loop that branches on data once, where a heap's sift
    branches at every level (on this project's busy 2-core machine the two measured within
    noise); the k-th distance, which bounds the next row's search, is then the last entry."""
    if count < k:
        if d > limit:
            return count
        m = count
        count += 1
    else:
        if d >= best_d2[k - 1]:
            return count
        m = k - 1
    while m > 0 and best_d2[m - 1] > d:
        best_d2[m] = best_d2[m - 1]
        best[m] = best[m - 1]
        m -= 1
    best_d2[m] = d
    best[m] = i
    return count


class _KnnScratch(NamedTuple):
    """The arrays one task's k-nearest searches reuse (allocated once per task by
    :func:`_task_scratch`, not per search): the sorted answers ``best_d2`` / ``best`` ``(k,)``
    (squared distances, rows of ``f.points``) and the depth-first stack ``stack`` / ``stack_d2``
    ``(STACK_DEPTH,)``."""

    best_d2: np.ndarray
    best: np.ndarray
    stack: np.ndarray
    stack_d2: np.ndarray


@njit(inline="always", error_model="numpy")
def _knn_subtree(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    point_base: int,
    node_base: int,
    node: int,
    k: int,
    limit: float,
    scratch: _KnnScratch,
) -> int:
    """The ``k`` nearest points within squared distance ``limit`` in the subtree of ``node``
    (global), into ``scratch.best_d2`` / ``scratch.best``, closest first; returns how many
    were found."""
    best_d2, best, stack, stack_d2 = scratch
    count = 0
    top = _start_search(x, y, z, f, node, stack, stack_d2)
    while True:
        bound = best_d2[k - 1] if count == k else limit
        leaf, top = _next_leaf(x, y, z, f, node_base, bound, True, stack, stack_d2, top)
        if leaf < 0:
            return count
        for i in range(point_base + f.node_start[leaf], point_base + f.node_end[leaf]):
            d = _point_distance2(f, i, x, y, z)
            count = _offer(d, i, best_d2, best, count, k, limit)


@njit(inline="always", error_model="numpy")
def _own_knn(row: int, k: int, limit: float, f: KDForest, tree: int, scratch: _KnnScratch) -> int:
    """The ``k`` nearest points (itself included) of tree point ``row`` (a row of ``f.points``)
    in its tree ``tree``, into ``scratch.best`` (rows) / ``scratch.best_d2``, closest first;
    returns how many (``k``, or the tree's size when smaller).

    ``limit``: a squared distance known to hold at least ``k`` points (inf: unknown). Then the
    search starts at the lowest ancestor of the point's leaf whose cell holds that ball (see
    :func:`enclosing_node`) instead of the root, and prunes with it from the first node.
    """
    point_base = f.point_offset[tree]
    node_base = f.node_offset[tree]
    x, y, z = f.points[row, 0], f.points[row, 1], f.points[row, 2]
    start = node_base
    if limit < np.inf:
        leaf = node_base + f.point_leaf[row]
        start = enclosing_node(x, y, z, math.sqrt(limit), leaf, f, tree)
    return _knn_subtree(x, y, z, f, point_base, node_base, start, k, limit, scratch)


@njit(inline="always", error_model="numpy")
def _jacobi_rotation(
    app: float, aqq: float, apq: float, arp: float, arq: float
) -> tuple[float, float, float, float, float, float]:
    """One Jacobi rotation zeroing ``A[p, q]`` of a symmetric 3 x 3 ``A`` given as its entries
    ``A[p, p], A[q, q], A[p, q]`` and those of the third row ``r``, ``A[r, p], A[r, q]``
    (``A[p, q] != 0``). Returns the new ``A[p, p], A[q, q], A[r, p], A[r, q]`` and the
    rotation's cosine and sine."""
    theta = (aqq - app) / (2.0 * apq)
    t = 1.0 / (abs(theta) + math.sqrt(theta * theta + 1.0))
    if theta < 0.0:
        t = -t
    c = 1.0 / math.sqrt(t * t + 1.0)
    s = t * c
    return app - t * apq, aqq + t * apq, c * arp - s * arq, s * arp + c * arq, c, s


@njit(inline="always", error_model="numpy")
def _rotate_columns(
    c: float, s: float, x0: float, y0: float, x1: float, y1: float, x2: float, y2: float
) -> tuple[float, float, float, float, float, float]:
    """Rows ``(x_i, y_i)`` of two columns of a 3 x 3 matrix turned by the plane rotation of
    cosine ``c`` and sine ``s``: ``(c x - s y, s x + c y)`` per row."""
    return (
        c * x0 - s * y0,
        s * x0 + c * y0,
        c * x1 - s * y1,
        s * x1 + c * y1,
        c * x2 - s * y2,
        s * x2 + c * y2,
    )


@njit(inline="always", error_model="numpy")
def _smallest_eigenvector(
    a00: float, a01: float, a02: float, a11: float, a12: float, a22: float
) -> tuple[float, float, float]:
    """The unit eigenvector of the smallest eigenvalue of the symmetric 3 x 3 matrix with
    upper triangle ``a00 a01 a02 / a11 a12 / a22``, by cyclic Jacobi.

    Jacobi rather than a closed form: it is accurate to rounding for every eigenvector whose
    eigenvalue is separated from the others (the closed forms lose digits when the two smallest
    eigenvalues are close, which is common on flat patches), and 3 x 3 needs a few sweeps. On
    scalars, not on (3, 3) arrays indexed with the rotation's p and q, so that the matrix and
    the eigenvectors can stay in registers (the same arithmetic in the same order as the array
    version it replaced: bit-identical normals; its speed measured within noise).
    """
    # V's entries vij, row i and column j (the eigenvectors are its columns)
    v00, v01, v02 = 1.0, 0.0, 0.0
    v10, v11, v12 = 0.0, 1.0, 0.0
    v20, v21, v22 = 0.0, 0.0, 1.0
    for _ in range(32):
        off = a01 * a01 + a02 * a02 + a12 * a12
        diag = a00 * a00 + a11 * a11 + a22 * a22
        if not off > 1e-36 * diag:  # below rounding (also stops on zero or non-finite input)
            break
        # each rotation turns the eigenvector columns p, q of V by the same angle
        if a01 != 0.0:  # (p, q, r) = (0, 1, 2)
            a00, a11, a02, a12, c, s = _jacobi_rotation(a00, a11, a01, a02, a12)
            a01 = 0.0
            v00, v01, v10, v11, v20, v21 = _rotate_columns(c, s, v00, v01, v10, v11, v20, v21)
        if a02 != 0.0:  # (0, 2, 1)
            a00, a22, a01, a12, c, s = _jacobi_rotation(a00, a22, a02, a01, a12)
            a02 = 0.0
            v00, v02, v10, v12, v20, v22 = _rotate_columns(c, s, v00, v02, v10, v12, v20, v22)
        if a12 != 0.0:  # (1, 2, 0)
            a11, a22, a01, a02, c, s = _jacobi_rotation(a11, a22, a12, a01, a02)
            a12 = 0.0
            v01, v02, v11, v12, v21, v22 = _rotate_columns(c, s, v01, v02, v11, v12, v21, v22)
    # the first of the smallest diagonal entries (the eigenvalues)
    if a11 < a00 and a11 <= a22:
        return v01, v11, v21
    if a22 < a00 and a22 < a11:
        return v02, v12, v22
    return v00, v10, v20


@njit(inline="always", error_model="numpy")
def _smallest_eigenvector_direct(
    a00: float, a01: float, a02: float, a11: float, a12: float, a22: float
) -> tuple[float, float, float]:
    """:func:`_smallest_eigenvector` (same arguments) without iterating: the smallest
    eigenvalue ``lam`` in closed form (the trigonometric solution of the characteristic cubic),
    then the largest cross product of two rows of ``A - lam I``, which is orthogonal to all
    three.

    Measured ~10% faster for the normals than Jacobi alone (its sweeps chain square roots and
    divisions). Its error is ~ rounding * largest eigenvalue / gap to the next one, the
    eigenvector's own sensitivity to the rounding of ``A`` (within 5e-12 of Jacobi on the 267k
    points of a Redwood scan); Jacobi still answers where that gap is too small for the cross
    products (a line, a single point) or ``A`` is already diagonal."""
    off = a01 * a01 + a02 * a02 + a12 * a12
    if off == 0.0:
        return _smallest_eigenvector(a00, a01, a02, a11, a12, a22)
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p2 = (b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * off) / 6.0
    p = math.sqrt(p2)
    det = (
        b00 * (b11 * b22 - a12 * a12)
        - a01 * (a01 * b22 - a12 * a02)
        + a02 * (a01 * a12 - b11 * a02)
    )
    # the eigenvalues are q + 2 p cos(phi + 2 pi j / 3) with phi = acos(det(B / p) / 2) / 3
    r = min(1.0, max(-1.0, det / (2.0 * p2 * p)))
    lam = q + 2.0 * p * math.cos(math.acos(r) / 3.0 + 2.0 * math.pi / 3.0)
    c00, c11, c22 = a00 - lam, a11 - lam, a22 - lam
    # the rows of A - lam I are (c00 a01 a02), (a01 c11 a12), (a02 a12 c22): rows 0 x 1,
    # 0 x 2 and 1 x 2
    x0, y0, z0 = a01 * a12 - a02 * c11, a02 * a01 - c00 * a12, c00 * c11 - a01 * a01
    x1, y1, z1 = a01 * c22 - a02 * a12, a02 * a02 - c00 * c22, c00 * a12 - a01 * a02
    x2, y2, z2 = c11 * c22 - a12 * a12, a12 * a02 - a01 * c22, a01 * a12 - c11 * a02
    n0 = x0 * x0 + y0 * y0 + z0 * z0
    n1 = x1 * x1 + y1 * y1 + z1 * z1
    n2 = x2 * x2 + y2 * y2 + z2 * z2
    if n1 > n0:
        x0, y0, z0, n0 = x1, y1, z1, n1
    if n2 > n0:
        x0, y0, z0, n0 = x2, y2, z2, n2
    # |cross| ~ the product of the two other eigenvalues' gaps to lam; 6 p2 = |A - q I|_F^2
    scale = 6.0 * p2
    if not n0 > 1e-16 * scale * scale:  # (also NaN)
        return _smallest_eigenvector(a00, a01, a02, a11, a12, a22)
    inv = 1.0 / math.sqrt(n0)
    return x0 * inv, y0 * inv, z0 * inv


# a symmetric 3 x 3 matrix as its upper triangle (a00, a01, a02, a11, a12, a22)
_Upper = tuple[float, float, float, float, float, float]


@njit(inline="always", error_model="numpy")
def _add_outer(a: _Upper, w: float, x: float, y: float, z: float) -> _Upper:
    """``a + w v v^T`` for ``v = (x, y, z)``, the symmetric 3 x 3 matrices as their upper
    triangles ``(a00, a01, a02, a11, a12, a22)`` (each term ``w * x * y`` rounded as written
    out: ``w = 1`` gives ``x * y`` exactly)."""
    a00, a01, a02, a11, a12, a22 = a
    return (
        a00 + w * x * x,
        a01 + w * x * y,
        a02 + w * x * z,
        a11 + w * y * y,
        a12 + w * y * z,
        a22 + w * z * z,
    )


@njit(inline="always", error_model="numpy")
def _scatter(points: np.ndarray, rows: np.ndarray, count: int) -> _Upper:
    """The scatter matrix of ``points[rows[:count]]`` about their mean, as its upper triangle
    ``(a00, a01, a02, a11, a12, a22)`` (two passes: centred before the products, no
    cancellation far from the origin)."""
    mx = my = mz = 0.0
    for j in range(count):
        mx += points[rows[j], 0]
        my += points[rows[j], 1]
        mz += points[rows[j], 2]
    mx /= count
    my /= count
    mz /= count
    a = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for j in range(count):
        dx = points[rows[j], 0] - mx
        dy = points[rows[j], 1] - my
        dz = points[rows[j], 2] - mz
        a = _add_outer(a, 1.0, dx, dy, dz)
    return a


@njit(inline="always", error_model="numpy")
def _row_neighbours(
    row: int, stop: int, kb: int, limit: float, f: KDForest, b: int, scratch: _KnnScratch
) -> tuple[int, float]:
    """The ``kb`` nearest of tree point ``row`` (:func:`_own_knn` within ``limit``) and the
    bound for the next row of its task: the next point (its spatial neighbour in tree order) has
    its k nearest within the farthest of this point's k nearest from it, a bound that prunes
    its search from the start (inflated past the rounding). Returns ``(count, next_limit)``."""
    points, best = f.points, scratch.best
    count = _own_knn(row, kb, limit, f, b, scratch)
    next_limit = np.inf
    if row + 1 < stop and count == kb:
        # these kb points are all within the farthest of them from the next row: so are its
        # kb nearest (tighter than this row's k-th distance plus the step: measured ~4%
        # faster on 267k points)
        x, y, z = points[row + 1, 0], points[row + 1, 1], points[row + 1, 2]
        far = 0.0
        for j in range(kb):
            far = max(far, _point_distance2(f, best[j], x, y, z))
        next_limit = far * (1.0 + 1e-9)  # past the rounding of the distances
    return count, next_limit


@njit(cache=True, error_model="numpy")
def _task_scratch(
    tree_of_task: np.ndarray, task: int, k: int, point_offset: np.ndarray
) -> tuple[int, int, int, int, _KnnScratch]:
    """A task's cloud ``b``, its tree rows ``start:stop``, the neighbourhood size ``kb`` (``k``
    or the cloud's size when smaller) and its searches' :class:`_KnnScratch` (``kb``
    answers), allocated once per task (not per row).

    Not inlined: inlined into a kernel's parallel loop, numba's array analysis fails on the
    record of arrays it builds (``AssertionError: Dimension mismatch``, numba 0.68)."""
    b = tree_of_task[task, 0]
    start, stop = tree_of_task[task, 1], tree_of_task[task, 2]
    kb = min(k, point_offset[b + 1] - point_offset[b])
    best_d2 = np.empty(kb)
    best = np.empty(kb, dtype=np.int64)
    stack = np.empty(STACK_DEPTH, dtype=np.int64)
    stack_d2 = np.empty(STACK_DEPTH)
    return b, start, stop, kb, _KnnScratch(best_d2, best, stack, stack_d2)


@njit(parallel=True, cache=True, error_model="numpy")
def _normals_kernel(
    f: KDForest, k: int, viewpoint: np.ndarray, tree_of_task: np.ndarray, out: np.ndarray
) -> None:
    points, order, point_offset = f.points, f.order, f.point_offset
    for task in prange(tree_of_task.shape[0]):
        b, start, stop, kb, scratch = _task_scratch(tree_of_task, task, k, point_offset)
        limit = np.inf
        for row in range(start, stop):
            count, limit = _row_neighbours(row, stop, kb, limit, f, b, scratch)
            a00, a01, a02, a11, a12, a22 = _scatter(points, scratch.best, count)
            nx, ny, nz = _smallest_eigenvector_direct(a00, a01, a02, a11, a12, a22)
            px, py, pz = points[row, 0], points[row, 1], points[row, 2]
            toward = (
                (viewpoint[b, 0] - px) * nx
                + (viewpoint[b, 1] - py) * ny
                + (viewpoint[b, 2] - pz) * nz
            )
            if toward < 0.0:  # face the viewpoint
                nx, ny, nz = -nx, -ny, -nz
            i = order[row]
            out[b, i, 0], out[b, i, 1], out[b, i, 2] = nx, ny, nz


def _tasks(forest: KDForest) -> np.ndarray:
    """``(tasks, 3)`` int64 rows ``(cloud, first tree row, stop)``: every cloud's tree points
    in chunks of :data:`NORMALS_CHUNK` consecutive rows (spatial neighbours)."""
    tasks = [
        (b, s, min(s + NORMALS_CHUNK, forest.point_offset[b + 1]))
        for b in range(forest.batch)
        for s in range(int(forest.point_offset[b]), int(forest.point_offset[b + 1]), NORMALS_CHUNK)
    ]
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


def pca_normals(forest: KDForest, k: int, viewpoint: np.ndarray, size: int) -> np.ndarray:
    """PCA normals of every tree point from its ``k`` nearest neighbours in its own cloud
    (itself included; fewer when the cloud is smaller), flipped to face its cloud's viewpoint.

    Args:
        forest: built on the clouds (:func:`build_forest`).
        k: neighbourhood size (>= 1).
        viewpoint: ``(B, 3)`` float64.
        size: ``N``, the padded cloud size of the output.
    Returns:
        ``(B, N, 3)`` float64 unit normals in each cloud's own order; padding rows are 0.
    """
    B = forest.batch
    counts = np.diff(forest.point_offset)
    out = np.zeros((B, size, 3))
    if counts.size and counts.max() > 0:
        viewpoint = np.ascontiguousarray(np.broadcast_to(viewpoint, (B, 3)), dtype=np.float64)
        _normals_kernel(forest, max(1, int(k)), viewpoint, _tasks(forest), out)
    return out


def gicp_covariances(forest: KDForest, k: int, epsilon: float, size: int) -> np.ndarray:
    """Generalized-ICP covariances of every tree point from its ``k`` nearest neighbours in its
    own cloud (itself included; fewer when the cloud is smaller): ``I - (1 - epsilon) n n^T``
    with ``n`` the smallest eigenvector of the neighbourhood's covariance
    (:func:`difficp.normals.estimate_covariances` on the KD-forest).

    Args:
        forest: built on the clouds (:func:`build_forest`).
        k: neighbourhood size (>= 1).
        epsilon: variance along the normal, in (0, 1].
        size: ``N``, the padded cloud size of the output.
    Returns:
        ``(B, N, 3, 3)`` float64 in each cloud's own order; padding rows are the identity.
    """
    # the normals' kernel gives n (its orientation cancels in n n^T); I - (1 - epsilon) n n^T
    # = V diag(epsilon, 1, 1) V^T (difficp.normals.regularize_covariances); padding rows have
    # n = 0 and so get the identity
    n = pca_normals(forest, k, np.zeros((forest.batch, 3)), size)
    return np.eye(3) - (1.0 - float(epsilon)) * (n[..., :, None] * n[..., None, :])


# ----------------------------------------------------------------------------------------------
# Colored ICP's intensity gradients on the tangent planes, from the same neighbourhoods
# ----------------------------------------------------------------------------------------------

# Open3D fits a colour gradient only where its hybrid search finds at least this many points,
# the point itself included (difficp.colors.MIN_NEIGHBOURS; numba cannot read that module).
_GRADIENT_MIN_NEIGHBOURS = 4


@njit(inline="always", error_model="numpy")
def _tangent_gradient(
    f: KDForest,
    row: int,
    rows: np.ndarray,
    count: int,
    normals: np.ndarray,
    values: np.ndarray,
) -> tuple[float, float, float]:
    """The intensity gradient ``d`` of tree point ``row`` on its tangent plane from its
    neighbours ``rows[:count]`` (itself among them, any order; rows of ``f.points`` / ``normals`` ``(P, 3)``
    / ``values`` ``(P,)``): :func:`difficp.colors.intensity_gradients`' least squares
    ``(sum_j a_j a_j^T + (K - 1)^2 n n^T) d = sum_j a_j b_j`` with ``a_j`` the offset to
    neighbour ``j`` projected onto the plane and ``b_j`` its intensity difference, solved by a
    3 x 3 Cholesky factorisation; ``(0, 0, 0)`` with fewer than 4 points or where it fails
    (not positive definite: where the PyTorch fit's ``cholesky_ex`` reports a failure)."""
    points = f.points
    # Open3D skips the first neighbour found, the point itself (or a duplicate of it): its
    # offset is exactly 0, so it adds nothing to the sums below and only the count drops it
    used = count - 1
    if used + 1 < _GRADIENT_MIN_NEIGHBOURS:
        return 0.0, 0.0, 0.0
    qx, qy, qz = points[row, 0], points[row, 1], points[row, 2]
    nx, ny, nz = normals[row, 0], normals[row, 1], normals[row, 2]
    value = values[row]
    a = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    g0 = g1 = g2 = 0.0
    for j in range(count):
        r = rows[j]
        ox, oy, oz = points[r, 0] - qx, points[r, 1] - qy, points[r, 2] - qz
        along = ox * nx + oy * ny + oz * nz
        ax, ay, az = ox - along * nx, oy - along * ny, oz - along * nz
        diff = values[r] - value
        a = _add_outer(a, 1.0, ax, ay, az)
        g0 += ax * diff
        g1 += ay * diff
        g2 += az * diff
    a00, a01, a02, a11, a12, a22 = _add_outer(a, float(used) * float(used), nx, ny, nz)
    # A = L L^T; "not > 0" also refuses NaN pivots, as LAPACK's potrf does
    if not a00 > 0.0:
        return 0.0, 0.0, 0.0
    l00 = math.sqrt(a00)
    l10, l20 = a01 / l00, a02 / l00
    p1 = a11 - l10 * l10
    if not p1 > 0.0:
        return 0.0, 0.0, 0.0
    l11 = math.sqrt(p1)
    l21 = (a12 - l20 * l10) / l11
    p2 = a22 - l20 * l20 - l21 * l21
    if not p2 > 0.0:
        return 0.0, 0.0, 0.0
    l22 = math.sqrt(p2)
    y0 = g0 / l00  # L y = g, then L^T d = y
    y1 = (g1 - l10 * y0) / l11
    y2 = (g2 - l20 * y0 - l21 * y1) / l22
    d2 = y2 / l22
    d1 = (y1 - l21 * d2) / l11
    d0 = (y0 - l10 * d1 - l20 * d2) / l00
    return d0, d1, d2


@njit(parallel=True, cache=True, error_model="numpy")
def _intensity_gradient_kernel(
    f: KDForest,
    k: int,
    radius2: float,
    normals: np.ndarray,
    values: np.ndarray,
    column: np.ndarray,
    tree_of_task: np.ndarray,
    out: np.ndarray,
) -> None:
    # the tasks of _normals_kernel: chunks of consecutive tree rows, each row's search bounded
    # by the previous row's (_row_neighbours) and by the radius (inclusive: radius2 is already
    # the largest squared distance that counts)
    point_offset = f.point_offset
    for task in prange(tree_of_task.shape[0]):
        b, start, stop, kb, scratch = _task_scratch(tree_of_task, task, k, point_offset)
        limit = radius2
        for row in range(start, stop):
            count, limit = _row_neighbours(row, stop, kb, limit, f, b, scratch)
            limit = min(limit, radius2)
            d0, d1, d2 = _tangent_gradient(f, row, scratch.best, count, normals, values)
            i = column[row]
            out[b, i, 0], out[b, i, 1], out[b, i, 2] = d0, d1, d2


def intensity_gradients(
    forest: KDForest,
    normals: np.ndarray,
    values: np.ndarray,
    k: int,
    radius: float | None,
    size: int,
    column: np.ndarray | None = None,
) -> np.ndarray:
    """Colored ICP's tangent-plane intensity gradients of every tree point from its ``k``
    nearest neighbours closer than ``radius`` in its own cloud (itself included): the compiled
    :func:`difficp.colors.intensity_gradients`, one parallel pass on the forest.

    Args:
        forest: built on the clouds (:func:`build_forest`).
        normals: ``(P, 3)`` float64 unit normals of the tree points, in forest order.
        values: ``(P,)`` float64 intensities, in forest order.
        k: neighbours searched, the point itself included (>= 1).
        radius: only neighbours strictly closer count (None: no radius).
        size: ``M``, the padded cloud size of the output.
        column: ``(P,)`` int64 output position of each tree point in its cloud (default: the
            forest's ``order``).
    Returns:
        ``(B, M, 3)`` float64 gradients; rows no tree point maps to are 0.
    """
    B = forest.batch
    out = np.zeros((B, size, 3))
    if forest.points.shape[0] == 0:
        return out
    # strictly closer than radius, as knearest: the largest squared distance below radius^2
    radius2 = np.inf if radius is None else float(np.nextafter(float(radius) ** 2, 0.0))
    column = forest.order if column is None else np.ascontiguousarray(column, dtype=np.int64)
    _intensity_gradient_kernel(
        forest,
        max(1, int(k)),
        radius2,
        np.ascontiguousarray(normals, dtype=np.float64),
        np.ascontiguousarray(values, dtype=np.float64),
        column,
        _tasks(forest),
        out,
    )
    return out


@njit(inline="always", error_model="numpy")
def _insert(d: float, r: int, best_d2: np.ndarray, best_row: np.ndarray) -> None:
    """Insert ``(d, r)`` into the sorted ``best_d2`` / ``best_row`` if closer than the last."""
    m = best_d2.shape[0] - 1
    if d >= best_d2[m]:
        return
    while m > 0 and best_d2[m - 1] > d:  # insertion sort: k is small (soft_k <= ~64)
        best_d2[m] = best_d2[m - 1]
        best_row[m] = best_row[m - 1]
        m -= 1
    best_d2[m] = d
    best_row[m] = r


@njit(inline="always", error_model="numpy")
def _search_tree_k(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    tree: int,
    best_d2: np.ndarray,
    best_row: np.ndarray,
    stack: np.ndarray,
    stack_d2: np.ndarray,
    first_node: int,
) -> None:
    """The ``k = len(best_d2)`` nearest points of tree ``tree`` strictly closer than the
    starting ``best_d2[-1]``, into ``best_d2`` / ``best_row`` (closest first), searched from
    the subtree of ``first_node`` (global), which must hold every such point."""
    point_base = f.point_offset[tree]
    node_base = f.node_offset[tree]
    last = best_d2.shape[0] - 1
    top = _start_search(x, y, z, f, first_node, stack, stack_d2)
    while True:
        bound = best_d2[last]
        leaf, top = _next_leaf(x, y, z, f, node_base, bound, False, stack, stack_d2, top)
        if leaf < 0:
            return
        for i in range(point_base + f.node_start[leaf], point_base + f.node_end[leaf]):
            _insert(_point_distance2(f, i, x, y, z), i, best_d2, best_row)


class KnnWarmStart(NamedTuple):
    """What :func:`knearest` keeps between calls whose queries barely move (ICP iterations): a
    Verlet list, the ``n > k`` nearest points of each query at its last search.

    A query that has moved ``delta`` from where it was searched keeps its answer without a
    search when its k-th nearest stored point is closer than ``reach - delta``: every point not
    stored was at least ``reach`` away, so it is still at least ``reach - delta`` away.

    Attributes:
        rows: ``(B, N, n)`` int64 rows of ``forest.points``, the ``n`` nearest at the last
            search, closest first (-1: none; all -1 before the first call).
        anchor: ``(B, N, 3)`` where each query was at its last search.
        reach: ``(B, N)`` distance from the anchor within which every point is stored (that of
            the n-th stored point; the search radius when fewer were found, inf without one).
    """

    rows: np.ndarray
    anchor: np.ndarray
    reach: np.ndarray


def knn_warm_start(batch: int, queries: int, k: int) -> KnnWarmStart:
    """An empty :class:`KnnWarmStart` for ``(batch, queries)`` queries of ``k`` neighbours.

    It stores ``k + max(3, k // 2)`` neighbours per query: the slack lets a query move about
    a third of its neighbours' spacing (measured on ICP: more searches skipped than the
    extra distances cost).
    """
    n = k + max(3, k // 2)
    return KnnWarmStart(
        np.full((batch, queries, n), -1, dtype=np.int64),
        np.zeros((batch, queries, 3)),
        np.zeros((batch, queries)),
    )


@njit(inline="always", error_model="numpy")
def _kept_neighbours(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    rows: np.ndarray,
    anchor: np.ndarray,
    reach: float,
    best_d2: np.ndarray,
    best_row: np.ndarray,
) -> bool:
    """Whether a query now at ``(x, y, z)`` keeps its stored neighbours without a search:
    ``rows`` ``(n,)`` (closest first, -1: none), found at ``anchor`` ``(3,)`` with every point
    within ``reach`` of it stored (see :class:`KnnWarmStart`). When it has moved less than
    ``reach`` they are sorted into ``best_d2`` / ``best_row`` (length ``k``) on the way."""
    dx = x - anchor[0]
    dy = y - anchor[1]
    dz = z - anchor[2]
    delta = math.sqrt(dx * dx + dy * dy + dz * dz)
    if not delta < reach:  # (NaN: not kept)
        return False
    count = 0
    for r in rows:
        if r < 0:
            break
        _insert(_point_distance2(f, r, x, y, z), r, best_d2, best_row)
        count += 1
    # Every point not stored is farther than reach - delta: the k nearest stored points are
    # the k nearest (all of them when reach is inf).
    k = best_d2.shape[0]
    return reach == np.inf or (count >= k and math.sqrt(best_d2[k - 1]) + delta < reach)


@njit(inline="always", error_model="numpy")
def _kept_nearest(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    rows: np.ndarray,
    anchor: np.ndarray,
    reach: np.ndarray,
    b: int,
    i: int,
) -> tuple[int, float]:
    """:func:`_kept_neighbours` for ``k = 1``, written on scalars: the nearest stored point of
    query ``i`` of cloud ``b`` (its row and squared distance) when the query, now at
    ``(x, y, z)``, keeps it without a search, else ``(-1, inf)``. The warm-start arrays
    ``(B, N, ...)`` are read in place: a view of them per query and the sorted copies cost
    most of a call when few queries move."""
    best, best_d2 = -1, np.inf
    for j in range(rows.shape[2]):
        r = rows[b, i, j]
        if r < 0:
            break
        d = _point_distance2(f, r, x, y, z)
        if d < best_d2:
            best, best_d2 = r, d
    if best < 0:
        return -1, np.inf
    dx = x - anchor[b, i, 0]
    dy = y - anchor[b, i, 1]
    dz = z - anchor[b, i, 2]
    delta = math.sqrt(dx * dx + dy * dy + dz * dz)
    # every point not stored is at least reach - delta away (NaN: not kept)
    if reach[b, i] == np.inf or math.sqrt(best_d2) + delta < reach[b, i]:
        return best, best_d2
    return -1, np.inf


@njit(inline="always", error_model="numpy")
def _stored_bound(
    x: float, y: float, z: float, f: KDForest, rows: np.ndarray, radius2: float
) -> float:
    """A squared search radius that holds the stored neighbours ``rows`` of a query at
    ``(x, y, z)`` strictly inside (so that the search finds them again: no duplicates), at most
    ``radius2`` (which it is whenever fewer than were asked for are stored)."""
    far = 0.0
    for r in rows:
        if r < 0:
            far = radius2
            break
        far = max(far, _point_distance2(f, r, x, y, z))
    return min(far * (1.0 + 1e-9) + 1e-300, radius2)


@njit(inline="always", error_model="numpy")
def _search_and_store(
    x: float,
    y: float,
    z: float,
    f: KDForest,
    tree: int,
    radius2: float,
    rows: np.ndarray,
    anchor: np.ndarray,
    all_d2: np.ndarray,
    all_row: np.ndarray,
    stack: np.ndarray,
    stack_d2: np.ndarray,
) -> float:
    """Search the ``n = len(rows)`` nearest points of tree ``tree`` to ``(x, y, z)`` into
    ``all_d2`` / ``all_row`` and store them as the query's new warm start (``rows``,
    ``anchor``), bounded by (and starting from the lowest node enclosing) its previously
    stored neighbours when it has any. Returns the new reach."""
    n = rows.shape[0]
    last = rows[0]
    first = f.node_offset[tree]
    bound = radius2
    if last >= 0:
        bound = _stored_bound(x, y, z, f, rows, radius2)
        if bound < np.inf:
            leaf = f.node_offset[tree] + f.point_leaf[last]
            first = enclosing_node(x, y, z, math.sqrt(bound), leaf, f, tree)
    all_d2[:] = bound
    all_row[:] = -1
    _search_tree_k(x, y, z, f, tree, all_d2, all_row, stack, stack_d2, first)
    anchor[0], anchor[1], anchor[2] = x, y, z
    rows[:] = all_row
    # bound == radius2 whenever fewer than n were found (seeds lie inside it).
    return math.sqrt(all_d2[n - 1] if all_row[n - 1] >= 0 else bound)


@njit(parallel=True, cache=True, error_model="numpy")
def _knearest_batch(
    queries: np.ndarray,
    query_counts: np.ndarray,
    radius2: float,
    f: KDForest,
    chunks: int,
    warm_rows: np.ndarray,
    warm_anchor: np.ndarray,
    warm_reach: np.ndarray,
    out_row: np.ndarray,
    out_d2: np.ndarray,
) -> None:
    # The warm-start arrays come one by one: written through a named tuple inside prange,
    # numba's parallel loop wrote into copies.
    B, N, k = out_row.shape
    n = warm_rows.shape[2]
    total = B * N
    # Parallel over equal chunks of all queries (not over clouds): one large cloud keeps
    # every thread busy too. Scratch arrays once per chunk, not per query.
    for c in prange(chunks):
        stack = np.empty(STACK_DEPTH, dtype=np.int64)
        stack_d2 = np.empty(STACK_DEPTH)
        best_d2 = np.empty(k)
        best_row = np.empty(k, dtype=np.int64)
        all_d2 = np.empty(n)
        all_row = np.empty(n, dtype=np.int64)
        for q in range(c * total // chunks, (c + 1) * total // chunks):
            b = q // N
            i = q - b * N
            best_d2[:] = np.inf
            best_row[:] = -1
            if i < query_counts[b] and f.point_offset[b + 1] > f.point_offset[b]:
                x, y, z = queries[b, i, 0], queries[b, i, 1], queries[b, i, 2]
                if k == 1:  # every ICP iteration of the differentiable path asks this
                    nearest_row, nearest_d2 = _kept_nearest(
                        x, y, z, f, warm_rows, warm_anchor, warm_reach, b, i
                    )
                    best_row[0], best_d2[0] = nearest_row, nearest_d2
                    kept = nearest_row >= 0
                else:
                    kept = warm_rows[b, i, 0] >= 0 and _kept_neighbours(
                        x, y, z, f, warm_rows[b, i], warm_anchor[b, i], warm_reach[b, i],
                        best_d2, best_row,
                    )  # fmt: skip
                if not kept:
                    rows, anchor = warm_rows[b, i], warm_anchor[b, i]
                    warm_reach[b, i] = _search_and_store(
                        x, y, z, f, b, radius2, rows, anchor, all_d2, all_row, stack, stack_d2
                    )
                    for j in range(k):
                        best_d2[j] = all_d2[j] if all_row[j] >= 0 else np.inf
                        best_row[j] = all_row[j]
            for j in range(k):
                found = best_row[j] >= 0 and best_d2[j] < radius2
                # Index into the query's own cloud (forest rows are in tree order).
                out_row[b, i, j] = f.order[best_row[j]] if found else -1
                out_d2[b, i, j] = best_d2[j] if found else np.inf


def knearest(
    forest: KDForest,
    queries: np.ndarray,
    k: int,
    query_counts: np.ndarray | None = None,
    max_distance: float | None = None,
    warm: KnnWarmStart | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of each query in its own cloud's tree, closest first
    (exact; ties in either order).

    Args:
        queries: ``(B, N, 3)``; cloud ``b`` uses its first ``query_counts[b]`` (all if None).
        k: neighbours per query (>= 1).
        max_distance: only neighbours closer than this count.
        warm: the state of the previous call with the same queries, ``k`` and ``max_distance``
            (:func:`knn_warm_start`; updated in place): a query that moved less than its safe
            distance keeps its neighbours without a search, the others start from them.
    Returns:
        ``index`` ``(B, N, k)`` int64 into each cloud (-1: none found) and squared distances
        ``(B, N, k)`` (inf: none found).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries, counts, radius2 = _checked_queries(forest, queries, query_counts, max_distance)
    B, N, _ = queries.shape
    if warm is None:
        warm = knn_warm_start(B, N, k)
    elif warm.rows.shape[:2] != (B, N) or warm.rows.shape[2] <= k:
        raise ValueError(
            f"warm start is for {warm.rows.shape[:2]} queries and at most "
            f"{warm.rows.shape[2] - 1} neighbours, not {(B, N)} and {k}"
        )
    row = np.empty((B, N, k), dtype=np.int64)
    d2 = np.empty((B, N, k))
    if B * N:
        chunks = min(B * N, 8 * numba.get_num_threads())
        _knearest_batch(queries, counts, radius2, forest, chunks, *warm, row, d2)
    return row, d2


# The process that started numba's thread pool (None: not started by us).
_POOL_PID: int | None = None


def set_threads(threads: int) -> None:
    """Run the compiled kernels on ``threads`` threads (capped at numba's pool size)."""
    global _POOL_PID
    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import (stubs lack it)
    numba.set_num_threads(max(1, min(int(threads), pool)))
    if _POOL_PID is None:
        _POOL_PID = os.getpid()


def note_pool_owner() -> None:
    """Record this process as the one whose thread pool the compiled kernels use (what
    :func:`set_threads` records), for kernels that set their thread count themselves."""
    global _POOL_PID
    if _POOL_PID is None:
        _POOL_PID = os.getpid()


@contextmanager
def on_calling_thread() -> Iterator[None]:
    """Run the compiled kernels called inside on the calling thread alone (numba's thread count
    is per calling thread; it is restored after). For small problems: waking the pool cost
    20-40 ms per call for 100 points on 2 busy cores, and the parallel kernels run on one thread
    beat serial twins compiled without ``parallel`` (those pay NumPy reference counting per
    element: a 1000-point tree 68 against 49 us)."""
    threads = numba.get_num_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(threads)


def parallel_unsafe_after_fork() -> bool:
    """Whether this process is a fork of one whose OpenMP pool the compiled kernels started.

    GNU OpenMP (numba's thread pool here) cannot run in such a child: numba terminates it. So
    forked workers (PyTorch DataLoader, multiprocessing pools) must use the PyTorch path.
    """
    if _POOL_PID is None or os.getpid() == _POOL_PID:
        return False
    try:
        return numba.threading_layer() == "omp"
    except ValueError:  # no pool in this process
        return False


__all__ = [
    "LEAF_SIZE",
    "KDForest",
    "KnnWarmStart",
    "build_forest",
    "enclosing_node",
    "gicp_covariances",
    "intensity_gradients",
    "knearest",
    "knn_warm_start",
    "nearest",
    "note_pool_owner",
    "on_calling_thread",
    "parallel_unsafe_after_fork",
    "pca_normals",
    "search_tree",
    "set_threads",
    "warm_two_nearest",
]
