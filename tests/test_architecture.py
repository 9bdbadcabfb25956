"""The package's import graph has no cycles, counting every import statement (top-level,
function-level and ``TYPE_CHECKING`` ones), so no module can dodge a cycle by importing late."""

from __future__ import annotations

import ast
import io
import tokenize
import typing
from pathlib import Path

import pytest
import torch

import difficp
from difficp.config import ICPConfig
from difficp.fused import FusedSteps
from difficp.inputs import prepare_problem
from difficp.loop import Steps, WholeLoop
from difficp.metrics import METRICS
from difficp.nonrigid.icp import NonrigidSteps
from difficp.nonrigid.rigid import RigidModel
from difficp.registration import ReferenceSteps
from difficp.strategies.correspondences import CORRESPONDENCES
from difficp.strategies.kernels import KERNELS
from difficp.strategies.rejection import REJECTIONS
from difficp.strategies.solvers import SOLVERS

PACKAGE = Path(difficp.__file__).parent

# Edges still to go, each with the change that removes it.
PENDING: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The difficp modules ``path`` imports anywhere in its body."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """``module -> the difficp modules it imports``, for every module of the package."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "difficp.fused" in graph["difficp.registration"]  # imported inside _choose_steps
    assert "difficp.loop" in graph["difficp.registration"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    for source, target in PENDING:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from PENDING"
        graph[source] = graph[source] - {target}
    assert _cycles(graph) == []


def _late_import_groups(path: Path) -> list[tuple[int, int, list[str]]]:
    """``(first line, last line, modules)`` of each run of consecutive import statements inside
    a function body of ``path``."""
    groups = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        blocks = [node.body] + [
            getattr(inner, field)
            for inner in ast.walk(node)
            if not isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody")
            if isinstance(getattr(inner, field, None), list)
        ]
        for block in blocks:
            run: list[ast.stmt] = []
            for stmt in [*block, None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run.append(stmt)
                    continue
                if run:
                    modules = [
                        m.module or "" if isinstance(m, ast.ImportFrom) else m.names[0].name
                        for m in run
                    ]
                    groups.append((run[0].lineno, run[-1].end_lineno or run[-1].lineno, modules))
                run = []
    return sorted(set((a, b, tuple(m)) for a, b, m in groups))  # type: ignore[misc]


def _comment_lines(path: Path) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def test_function_level_imports_say_why() -> None:
    """An import inside a function (to keep ``import difficp`` light: numba, scipy, roma,
    optional packages) carries a comment saying why, on its lines or the line above; one that
    needs none belongs at the top of its module."""
    unexplained = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        comments = _comment_lines(path)
        for first, last, modules in _late_import_groups(path):
            if not comments & set(range(first - 1, last + 1)):
                unexplained |= {(_module_name(path), m) for m in modules}
    assert unexplained == set()


def test_late_import_finder_sees_nested_blocks(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    try:\n        import a\n        import b\n    except ImportError:\n"
        "        pass\n    # why\n    import c\n"
    )
    assert _late_import_groups(module) == [(3, 4, ("a", "b")), (8, 8, ("c",))]
    assert _comment_lines(module) == {7}


def test_every_steps_class_implements_the_protocol() -> None:
    points = torch.rand(1, 20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    config = ICPConfig()
    problem = prepare_problem(points, points, config)
    model = RigidModel(points)
    for steps in (
        ReferenceSteps(problem, config),
        FusedSteps(problem, config),
        NonrigidSteps(problem, config, model, None, 0.0),
    ):
        assert isinstance(steps, Steps), type(steps).__name__
        # Only the compiled steps declare the whole-loop shortcut that run_loop hands over to.
        assert isinstance(steps, WholeLoop) == (type(steps) is FusedSteps), type(steps).__name__


# Each ICPConfig strategy option and the registry of its allowed values.
_REGISTRIES = {
    "correspondence": CORRESPONDENCES,
    "rejection": REJECTIONS,
    "robust_kernel": KERNELS,
    "metric": METRICS,
    "solver": SOLVERS,
}
_REGISTERED = [(o, n) for o, r in _REGISTRIES.items() for n in r.names if n is not None]


@pytest.mark.parametrize(("option", "name"), _REGISTERED)
def test_every_registered_strategy_is_accepted_and_documented(option: str, name: str) -> None:
    """A strategy is one registered class: ICPConfig accepts its name with no edit of its own
    (no hand-kept Literal list) and its docstring lists it."""
    options: dict[str, str] = {option: name}
    solvable = SOLVERS[name].metrics if option == "solver" else None
    if solvable:  # a solver of some metrics only (svd) is paired with one of them
        options["metric"] = solvable[0]
    assert getattr(ICPConfig(**options), option) == name
    assert f'"{name}"' in (ICPConfig.__doc__ or ""), f"ICPConfig's docstring misses {name!r}"
    assert typing.get_type_hints(ICPConfig)[option] in (str, str | None)
