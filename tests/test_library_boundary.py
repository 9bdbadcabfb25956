"""The package boundary: ``difficp`` is the library, the experiments live outside it.

Importing and running ``difficp`` needs only torch, roma, numpy, scipy and numba; plotting,
progress bars, HDF5 and Open3D belong to ``difficp_experiments`` (the ``experiments`` extra).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import difficp

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = Path(difficp.__file__).resolve().parent
EXTRA_ONLY = ("matplotlib", "tqdm", "h5py", "open3d", "difficp_experiments")

# A fresh interpreter: other tests have imported half the world into this one.
# PyTorch itself imports tqdm when it is installed (torch.hub), so count only what difficp adds.
_SCRIPT = """
import json, sys
import torch
before = set(sys.modules)
import difficp

g = torch.Generator().manual_seed(0)
source = torch.rand(64, 3, generator=g, dtype=torch.float64)
target = source + torch.tensor([0.01, 0.0, -0.01], dtype=torch.float64)
result = difficp.icp(source, target, max_distance=0.5)
assert result.transform.shape == (4, 4)
names = %r
added = set(sys.modules) - before
print(json.dumps(sorted(n for n in added if n.split(".")[0] in names)))
"""


def test_import_and_icp_load_no_experiment_dependency() -> None:
    # The difficp this process imported, whatever the installation points at.
    path = [str(LIBRARY.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT % (EXTRA_ONLY,)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(LIBRARY))
)
def test_library_modules_import_no_experiment_dependency(path: Path) -> None:
    allowed = {"open3d"} if path.name == "interop.py" else set()  # to_open3d, imported on call
    assert _imported_modules(path) & set(EXTRA_ONLY) <= allowed


def test_experiment_dependencies_are_an_extra_not_a_requirement() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    required = {re.match(r"[\w.-]+", dep)[0] for dep in project["dependencies"]}
    assert required == {"torch", "roma", "numpy", "scipy", "numba"}
    experiments = {re.match(r"[\w.-]+", dep)[0] for dep in extras["experiments"]}
    assert experiments == {"matplotlib", "tqdm", "h5py", "open3d"}
    assert "difficp[experiments]" in extras["test"]
