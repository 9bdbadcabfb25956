"""``difficp register SOURCE TARGET``: register two point-cloud files by ICP.

Reads both files (:mod:`difficp.io` formats), estimates normals when the chosen metric needs
them and the file has none, runs :func:`difficp.icp` and prints the 4x4 source->target transform
with fitness, inlier RMSE, iterations and convergence. ``--out`` writes the transform as text,
``--aligned`` the source moved into the target frame (format from its extension).

Problems with the input (missing or malformed files, bad options, unwritable output paths) are
reported as one line on stderr with exit code 2, never as a traceback, before any work is done.
Outputs are written after the result is printed, together and atomically: if one cannot be
written, none is (and no partial file is left), the result is still printed, and the command
exits with code 2 and one line on stderr. Points with NaN/inf coordinates or normals are dropped
with a warning on stderr that gives their number.

Progress (iteration, fitness, inlier RMSE, stage of ``--scales``, elapsed time) goes to stderr
when it is a terminal or ``--progress`` is given (``--no-progress``: never), through the
``progress`` callback of :func:`difficp.icp`; stdout keeps only the report.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from functools import partial
from typing import Any, TextIO

import numpy as np
import torch

import difficp
from difficp._atomic import AtomicFiles, check_writable
from difficp.cli import add_command
from difficp.config import CORRESPONDENCES, METRICS, ROBUST_KERNELS, SOLVERS, ICPConfig
from difficp.geometry import depth_to_points, rotate_vectors, transform_points
from difficp.io import (
    POINT_CLOUD_EXTENSIONS,
    PointCloudData,
    point_cloud_writer,
    read_depth,
    read_intrinsics,
    read_point_cloud,
    read_transform,
    transform_writer,
)
from difficp.loop import Progress
from difficp.normals import estimate_normals
from difficp.sampling import multiscale_icp, parse_scales, voxel_downsample

DESCRIPTION = (
    "Register SOURCE onto TARGET by ICP and print the 4x4 transform that maps source "
    "points into the target frame (target ~ R @ source + t). Files: .ply, .pcd, .xyz, "
    ".xyzn, .txt (3 or 6 columns), .npy. Normals missing from a file are estimated "
    "(PCA of the k nearest neighbours) when the metric needs them."
)

DTYPES = ("float32", "float64")
# The flags that set the ICPConfig option of the same name.
CONFIG_OPTIONS = (
    "correspondence",
    "metric",
    "solver",
    "max_distance",
    "max_iterations",
    "translation_tolerance",
    "rotation_tolerance",
    "robust_kernel",
    "kernel_scale",
    "temperature",
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``register`` sub-command on ``subparsers`` (from ``add_subparsers``)."""
    p = add_command(subparsers, "register", DESCRIPTION, run)
    p.add_argument("source", metavar="SOURCE", help="point cloud to move")
    p.add_argument("target", metavar="TARGET", help="point cloud to move it onto")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="point_to_plane",
        help="error metric (default: %(default)s, which suits scans; note that difficp.icp's "
        "default is point_to_point)",
    )
    p.add_argument(
        "--solver", choices=SOLVERS, default=None, help="solver (default: svd or linear by metric)"
    )
    p.add_argument(
        "--correspondence",
        choices=CORRESPONDENCES,
        default="nearest",
        help="how partners are found; projective needs a depth-image TARGET (default: %(default)s)",
    )
    p.add_argument(
        "--intrinsics",
        nargs="+",
        metavar="FX_FY_CX_CY|FILE",
        help="pinhole intrinsics of depth-image (.png) inputs: four numbers fx fy cx cy, or a "
        "JSON file (Open3D's camera layout, or fx/fy/cx/cy keys)",
    )
    p.add_argument(
        "--depth-scale",
        type=float,
        default=1000.0,
        help="stored depth units per metre of .png inputs: 1000 for Redwood/PrimeSense/Kinect "
        "millimetres, 5000 for TUM (default: %(default)s)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=1,
        help="keep every STRIDE-th valid pixel of a depth-image SOURCE (default: %(default)s)",
    )
    p.add_argument(
        "--max-distance",
        type=float,
        default=None,
        help="reject pairs farther than this, in the files' units; also the inlier threshold of "
        "the printed fitness (default: keep all pairs, with a warning that suggests a value)",
    )
    p.add_argument(
        "--max-iterations", type=int, default=30, help="iteration cap (default: %(default)s)"
    )
    p.add_argument(
        "--translation-tolerance",
        type=float,
        default=0.0,
        help="also stop once a step moves the source by less than this (files' units) and "
        "--rotation-tolerance (small_gicp's rule; default: off)",
    )
    p.add_argument(
        "--rotation-tolerance",
        type=float,
        default=0.0,
        help="also stop once a step turns the source by less than this many degrees and "
        "--translation-tolerance (default: off)",
    )
    p.add_argument(
        "--robust-kernel",
        choices=[k for k in ROBUST_KERNELS if k is not None],
        default=None,
        help="IRLS robust kernel on the residuals (default: none)",
    )
    p.add_argument(
        "--kernel-scale",
        type=float,
        default=1.0,
        help="scale of the robust kernel (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1e-3,
        help="softmax temperature of soft partners (default: %(default)s)",
    )
    p.add_argument(
        "--normals-k",
        type=int,
        default=16,
        help="neighbours for estimated normals (default: %(default)s)",
    )
    p.add_argument(
        "--voxel-size",
        type=float,
        default=None,
        help="down-sample both clouds to one mean point per voxel of this size first "
        "(default: full resolution)",
    )
    p.add_argument(
        "--scales",
        metavar="V:D:I,...",
        default=None,
        help="coarse-to-fine stages voxel_size:max_distance:iterations, e.g. "
        "0.05:0.1:30,0.025:0.05:20,none:0.02:14 ('none': full resolution / the option's "
        "value); normals are estimated per stage; the printed fitness is the last stage's",
    )
    for flag, meaning in (
        ("--init", "initial transform (4x4 text)"),
        ("--out", "write the transform here (4x4 text)"),
        ("--aligned", "write the transformed source here (.ply/.pcd/...)"),
    ):
        p.add_argument(flag, metavar="FILE", help=meaning)
    p.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float64",
        help="computation precision (default: %(default)s)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show ICP's progress (iteration, fitness, inlier RMSE, stage, time) on stderr "
        "(default: when stderr is a terminal)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is often fastest for small clouds "
        "on a busy machine)",
    )
    return p


class InputError(Exception):
    """A problem with the user's files or options: reported in one line, exit code 2."""


def _device(name: str) -> Any:

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _warn(message: str) -> None:
    print(f"difficp register: warning: {message}", file=sys.stderr)


def _is_depth_image(path: str) -> bool:
    return path.lower().endswith(".png")


def _intrinsics(args: argparse.Namespace) -> Any:

    if not args.intrinsics:
        raise InputError(
            "depth images (.png) need --intrinsics fx fy cx cy or --intrinsics camera.json"
        )
    given = " ".join(args.intrinsics)
    try:
        if len(args.intrinsics) == 1:
            return read_intrinsics(args.intrinsics[0])
        return read_intrinsics([float(v) for v in args.intrinsics])
    except ValueError as err:
        raise InputError(f"--intrinsics {given}: {err}") from None
    except OSError as err:
        raise InputError(f"cannot read --intrinsics {given}: {err}") from None


def _read_depth(path: str, role: str, args: argparse.Namespace) -> Any:

    try:
        depth = read_depth(path, args.depth_scale)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {role} {path}: {err}") from None
    if not (depth > 0).any():
        raise InputError(f"{role} {path} has no valid (non-zero) depth")
    return depth


def _depth_cloud(depth: Any, K: Any, stride: int) -> Any:
    """The valid pixels of a depth image as a point cloud (every ``stride``-th one)."""
    points = depth_to_points(torch.from_numpy(depth), torch.from_numpy(K)).numpy()
    return PointCloudData(points[depth > 0][::stride])


def _stages(args: argparse.Namespace) -> list[Any] | None:
    """The multi-scale stages of ``--scales`` (None without it); checks ``--voxel-size``."""
    if args.voxel_size is not None and not (math.isfinite(args.voxel_size) and args.voxel_size > 0):
        raise InputError(f"--voxel-size must be a positive number, got {args.voxel_size}")
    if args.scales is None:
        return None
    if args.voxel_size is not None:
        raise InputError("--voxel-size and --scales exclude each other: --scales sets the sizes")
    if args.correspondence == "projective":
        raise InputError("--scales needs point-cloud targets, not --correspondence projective")
    try:
        return parse_scales(args.scales)
    except ValueError as err:
        raise InputError(f"--scales {args.scales}: {err}") from None


def _downsample(cloud: Any, voxel_size: float, dtype: Any, device: Any) -> tuple[Any, Any]:
    """``(points, normals)`` tensors of ``cloud`` with one mean point per voxel."""
    points, normals = cloud.to_torch(dtype, device)
    grid = voxel_downsample(points, voxel_size, normals=normals)
    return grid.points, grid.normals


def _colors(cloud: Any, voxel_size: float | None, dtype: Any, device: Any) -> Any:
    """The cloud's ``(N, 3)`` colours in [0, 1] as a tensor (averaged per voxel when
    ``voxel_size`` is given, in the order of :func:`_downsample`'s points), or None."""
    if cloud.colors is None:
        return None
    colors = torch.as_tensor(cloud.colors, dtype=dtype, device=device)
    if voxel_size is None:
        return colors
    points = torch.as_tensor(cloud.points, dtype=dtype, device=device)
    return voxel_downsample(points, voxel_size, colors=colors).colors


def _color_options(
    config: Any, args: argparse.Namespace, source: Any, target: Any, dtype: Any, device: Any
) -> dict[str, Any]:
    """``source_colors`` / ``target_colors`` for a metric that reads colours (else none); both
    files must have them (PLY red/green/blue, PCD rgb)."""
    if not config.needs_colors:
        return {}
    if args.scales is not None:
        raise InputError(f"--metric {args.metric} does not run with --scales; use --voxel-size")
    for role, path, cloud in (("source", args.source, source), ("target", args.target, target)):
        if cloud.colors is None:
            raise InputError(
                f"--metric {args.metric} needs colours, and {role} {path} has none (colours are "
                "read from PLY red/green/blue and PCD rgb/rgba fields)"
            )
    return {
        f"{role}_colors": _colors(cloud, args.voxel_size, dtype, device)
        for role, cloud in (("source", source), ("target", target))
    }


def _load_input(path: str, role: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The cloud read from ``path`` and, for a depth-image target kept as an image (projective
    correspondences), the ``(H, W)`` depth map (else None)."""
    if not _is_depth_image(path):
        if role == "target" and args.correspondence == "projective":
            raise InputError(
                "--correspondence projective needs a depth-image target (.png with --intrinsics)"
            )
        return _load(path, role), None
    K = _intrinsics(args)
    depth = _read_depth(path, role, args)
    cloud = _depth_cloud(depth, K, args.stride if role == "source" else 1)
    keep_image = role == "target" and args.correspondence == "projective"
    return cloud, depth if keep_image else None


def _load(path: str, role: str) -> Any:

    try:
        raw = read_point_cloud(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {role} {path}: {err}") from None
    cloud = raw.finite()
    dropped = len(raw) - len(cloud)
    if dropped:
        _warn(
            f"dropped {dropped} of {len(raw)} points of {role} {path} with NaN or inf "
            "coordinates or normals"
        )
    if len(cloud) < 3:
        raise InputError(f"{role} {path} has {len(cloud)} valid points; ICP needs at least 3")
    return cloud


def _check_scale(cloud: Any, role: str, path: str, dtype: Any) -> None:
    """Refuse coordinates whose squared distances overflow the computation dtype."""
    largest = float(abs(cloud.points).max())
    # ICP squares distances (and sums three squares, and differences of two points): keep a
    # margin of 1e3 under the square root of the largest finite number.
    limit = math.sqrt(torch.finfo(dtype).max) / 1e3
    if largest > limit:
        hint = " or use --dtype float64" if dtype == torch.float32 and largest < 1e150 else ""
        raise InputError(
            f"{role} {path} has coordinates up to {largest:.3g}, too large for "
            f"{str(dtype).removeprefix('torch.')} arithmetic (squared distances overflow beyond "
            f"{limit:.3g}); rescale the cloud (e.g. to metres){hint}"
        )


def _point_spacing(points: np.ndarray, sample: int = 2000) -> float:
    """Median distance from a point to its nearest neighbour (on a sample of the points)."""
    from scipy.spatial import cKDTree  # here: scipy only for this estimate (~0.3 s to load)

    rng = np.random.default_rng(0)
    queries = points if len(points) <= sample else points[rng.choice(len(points), sample, False)]
    distances, _ = cKDTree(points).query(queries, k=2)
    return float(np.median(distances[:, 1]))


def _flag_names(message: str) -> str:
    """``ICPConfig.max_distance`` -> ``--max-distance``: name the option as the user wrote it."""
    return re.sub(r"ICPConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path is checked before ICP runs, so that no result is computed in vain."""
    outputs = [(flag, path) for flag, path in (("--out", args.out), ("--aligned", args.aligned))]
    outputs = [(flag, path) for flag, path in outputs if path]
    for flag, path in outputs:
        try:
            check_writable(path, f"cannot write {flag}")
        except OSError as err:
            raise InputError(str(err)) from None
    if args.aligned and not args.aligned.lower().endswith(POINT_CLOUD_EXTENSIONS):
        raise InputError(
            f"--aligned {args.aligned}: unknown point-cloud extension; use one of "
            f"{', '.join(POINT_CLOUD_EXTENSIONS)}"
        )
    if args.out and args.aligned and os.path.abspath(args.out) == os.path.abspath(args.aligned):
        raise InputError(f"--out and --aligned are the same file {args.out}")


def _scalar(value: Any) -> Any:
    """First element of a (B,) / () result tensor as a Python number."""
    return value.reshape(-1)[0].item()


def register_files(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work of ``difficp register`` (raises :class:`InputError` on bad input).

    Every option and path is checked before the files are read, the files before ICP runs.

    Returns:
        ``{"transform": (4, 4) np.ndarray, "fitness", "inlier_rmse", "iterations", "converged",
        "source_points", "target_points", "estimated_normals": [roles]}``.
    """
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    _check_counts(args)
    _check_outputs(args)
    config = _config(args)
    init = _read_init(args, dtype, device)
    stages = _stages(args)
    source, _ = _load_input(args.source, "source", args)
    target, target_depth = _load_input(args.target, "target", args)
    _check_scale(source, "source", args.source, dtype)
    _check_scale(target, "target", args.target, dtype)
    if args.max_distance is None and stages is None:
        _warn_no_max_distance(target.points)
    color_options = _color_options(config, args, source, target, dtype, device)
    src_pts, src_nrm = _tensors(source, args.voxel_size, dtype, device)
    tgt_pts, tgt_nrm = _tensors(target, args.voxel_size, dtype, device)
    estimated: list[str] = []
    # (multiscale_icp estimates missing normals on each stage's down-sampled cloud)
    if stages is None and config.needs_source_normals and src_nrm is None:
        src_nrm = _estimate_normals(src_pts, args.normals_k, "source", estimated)
    # a depth-image target (projective) takes its normals from the image
    needs_target = stages is None and config.needs_target_normals and target_depth is None
    if needs_target and tgt_nrm is None:
        tgt_nrm = _estimate_normals(tgt_pts, args.normals_k, "target", estimated)
    depth_kwargs = {}
    if target_depth is not None:  # projective: the target stays an image
        tgt_pts = torch.as_tensor(target_depth, dtype=dtype, device=device)
        depth_kwargs["intrinsics"] = torch.as_tensor(_intrinsics(args), dtype=dtype, device=device)
    res = _register(
        src_pts,
        tgt_pts,
        init=init,
        **depth_kwargs,
        source_normals=src_nrm if config.needs_source_normals else None,
        target_normals=tgt_nrm if config.needs_target_normals else None,
        **color_options,
        config=config,
        stages=stages,
        normals_k=args.normals_k,
        progress=_progress_printer(args, len(src_pts), len(target)),
    )
    out = _summary(res, len(source), len(target), estimated)
    T = res.transform.detach().reshape(-1, 4, 4)[0].to(dtype)
    out["outputs"] = _writers(args, out["transform"], T, src_pts, src_nrm, source.colors)
    return out


def _warn_no_max_distance(target_points: np.ndarray) -> None:
    _warn(
        "no --max-distance: every pair counts as an inlier, so fitness is 1 whatever the "
        "alignment; pass --max-distance in the files' units (2-3x the point spacing, "
        f"here about {2.5 * _point_spacing(target_points):.3g})"
    )


def _check_counts(args: argparse.Namespace) -> None:
    """The integer options that must be at least something."""
    for flag, value, minimum in (
        ("--max-iterations", args.max_iterations, 1),
        ("--normals-k", args.normals_k, 3),
        ("--stride", args.stride, 1),
    ):
        if value is not None and value < minimum:
            raise InputError(f"{flag} must be at least {minimum}, got {value}")


def _config(args: argparse.Namespace) -> Any:
    """The :class:`~difficp.config.ICPConfig` of the options (their errors named as flags)."""
    try:
        # The command only reports the result: no autograd graph needed.
        options = {name: getattr(args, name) for name in CONFIG_OPTIONS}
        return ICPConfig(**options, differentiation="none")
    except ValueError as err:
        raise InputError(_flag_names(str(err))) from None


def _read_init(args: argparse.Namespace, dtype: Any, device: Any) -> Any:
    """The ``--init`` transform as a ``(4, 4)`` tensor, or None."""
    if not args.init:
        return None
    try:
        return torch.as_tensor(read_transform(args.init), dtype=dtype, device=device)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read --init {args.init}: {err}") from None


def _tensors(cloud: Any, voxel_size: float | None, dtype: Any, device: Any) -> tuple[Any, Any]:
    """``(points, normals)`` tensors of ``cloud``, down-sampled when ``voxel_size`` is given."""
    if voxel_size is not None:
        return _downsample(cloud, voxel_size, dtype, device)
    return cloud.to_torch(dtype, device)


def _estimate_normals(points: Any, k: int, role: str, estimated: list[str]) -> Any:
    """PCA normals of ``points`` from ``k`` neighbours; ``role`` is added to ``estimated``."""
    try:
        normals = estimate_normals(points, k=k)
    except (ValueError, torch.linalg.LinAlgError) as err:
        raise InputError(f"cannot estimate normals: {err}") from None
    estimated.append(role)
    return normals


def _register(
    source: Any, target: Any, *, stages: list[Any] | None, normals_k: int, **options: Any
) -> Any:
    """:func:`difficp.icp`, or :func:`difficp.multiscale_icp` over ``stages``."""
    register = difficp.icp
    if stages is not None:
        register = partial(multiscale_icp, stages=stages, normals_k=normals_k)
    try:
        result = register(source, target, **options)
    except (ValueError, torch.linalg.LinAlgError) as err:
        raise InputError(_flag_names(str(err))) from None
    if options.get("progress") is not None:
        options["progress"].finish()
    return result


def _progress_printer(
    args: argparse.Namespace, source_points: int, target_points: int
) -> ProgressPrinter | None:
    """The stderr progress printer when progress is on (see :func:`_show_progress`)."""
    if not _show_progress(args):
        return None
    printer = ProgressPrinter(sys.stderr, tty=_isatty(sys.stderr))
    printer.start(source_points, target_points)
    return printer


def _summary(res: Any, source_points: int, target_points: int, estimated: list[str]) -> dict:
    """The printed fields of the result (see :func:`register_files`)."""
    numbers = {"fitness": float, "inlier_rmse": float, "iterations": int, "converged": bool}
    return {
        "transform": res.transform.detach().reshape(-1, 4, 4)[0].cpu().double().numpy(),
        **{name: kind(_scalar(getattr(res, name))) for name, kind in numbers.items()},
        "source_points": source_points,
        "target_points": target_points,
        "estimated_normals": estimated,
    }


def _writers(
    args: argparse.Namespace, matrix: np.ndarray, T: Any, points: Any, normals: Any, colors: Any
) -> list[tuple[str, Any]]:
    """``[(path, writer)]`` of ``--out`` (the ``(4, 4)`` ``matrix``) and ``--aligned`` (the
    source moved by ``T``), for :func:`write_outputs`."""
    outputs = []
    if args.out:
        outputs.append((args.out, transform_writer(matrix)))
    if args.aligned:
        moved = transform_points(points, T)
        nrm = None if normals is None else rotate_vectors(normals, T)
        # Each format's own precision (float32 for PCD, which Open3D's binary reader needs).
        cloud = PointCloudData.checked(moved, nrm, colors)
        outputs.append((args.aligned, point_cloud_writer(args.aligned, cloud)))
    return outputs


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _show_progress(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress``, else whether stderr is a terminal."""
    progress = getattr(args, "progress", None)
    return _isatty(sys.stderr) if progress is None else bool(progress)


class ProgressPrinter:
    """The ``progress`` callback of :func:`difficp.icp` that ``difficp register`` passes:
    prints each :class:`~difficp.loop.Progress` as one line on ``stream``, e.g.
    ``difficp register: stage 2/3 iteration 5/30 fitness 0.912345 inlier_rmse 0.00123 (1.2 s)``.

    On a terminal (``tty``) each line overwrites the last (carriage return) and
    :meth:`finish` ends it; elsewhere (a log file) every report is its own line.
    """

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.started = time.perf_counter()
        self.width = 0  # of the line on screen (tty), to blank what a shorter one leaves

    def start(self, source_points: int, target_points: int) -> None:
        """The line before ICP starts: setup (and numba's one-time compile) happens next."""
        self.started = time.perf_counter()
        self._emit(
            f"difficp register: ICP on {source_points} source / {target_points} target points "
            "(the first run on a new install also compiles the fast path, once)",
            end_line=True,
        )

    def __call__(self, p: Progress) -> None:
        stage = f"stage {p.stage + 1}/{p.stages} " if p.stages > 1 else ""
        fitness = float(p.fitness.reshape(-1)[0]) if p.fitness.numel() == 1 else None
        numbers = (
            f"fitness {fitness:.6f} inlier_rmse {float(p.inlier_rmse.reshape(-1)[0]):.6g}"
            if fitness is not None
            else f"mean fitness {float(p.fitness.double().mean()):.6f}"
        )
        elapsed = time.perf_counter() - self.started
        self._emit(
            f"difficp register: {stage}iteration {p.iteration}/{p.max_iterations} {numbers} "
            f"({elapsed:.1f} s)",
            end_line=not self.tty,
        )

    def finish(self) -> None:
        """Ends the overwritten line of a terminal (nothing to do elsewhere)."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0

    def _emit(self, line: str, end_line: bool) -> None:
        if self.tty:
            pad = " " * max(self.width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self.width = 0 if end_line else len(line)
            if end_line:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def write_outputs(result: dict[str, Any]) -> None:
    """Write ``result["outputs"]`` (``[(path, writer)]``) all-or-nothing, each atomically."""
    with AtomicFiles() as files:
        for path, write in result["outputs"]:
            write(files.open(path))


def format_report(result: dict[str, Any]) -> str:
    """The text ``difficp register`` prints."""
    T = result["transform"]
    rows = "\n".join("  " + " ".join(f"{v: .9f}" for v in row) for row in T)
    lines = [
        f"source: {result['source_points']} points, target: {result['target_points']} points",
    ]
    if result["estimated_normals"]:
        lines.append("normals estimated for: " + ", ".join(result["estimated_normals"]))
    lines += [
        "transform (source -> target):",
        rows,
        f"fitness: {result['fitness']:.6f}",
        f"inlier_rmse: {result['inlier_rmse']:.6g}",
        f"iterations: {result['iterations']}",
        f"converged: {str(result['converged']).lower()}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``difficp register``; returns the exit code."""
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise InputError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        result = register_files(args)
    except InputError as err:
        print(f"difficp register: error: {err}", file=sys.stderr)
        return 2
    finally:
        # Restore, so that calling main() in-process (tests, notebooks) leaves no trace.
        torch.set_num_threads(threads)
    with np.printoptions(suppress=True):
        print(format_report(result), flush=True)
    # The result is printed first: it is not lost when an output cannot be written.
    try:
        write_outputs(result)
    except (OSError, ValueError) as err:
        print(
            f"difficp register: error: cannot write outputs (none written): {err}",
            file=sys.stderr,
        )
        return 2
    return 0
