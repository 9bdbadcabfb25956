"""What an index page and ``pip show difficp`` say about the project: pyproject.toml's metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_metadata_names_summary_authors_licence_and_classifiers(project: dict) -> None:
    assert project["description"] and project["readme"] == "README.md"
    assert project["authors"] == [{"name": "The difficp developers"}]
    # SPDX licence (PEP 639) and the file it names, shipped in the wheel.
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    classifiers = project["classifiers"]
    assert "Development Status :: 3 - Alpha" in classifiers
    assert "Typing :: Typed" in classifiers and (ROOT / "src/difficp/py.typed").exists()
    # setuptools refuses a License :: classifier beside an SPDX licence.
    assert not [c for c in classifiers if c.startswith("License ::")]
    # Only addresses that exist: none yet (no public repository or documentation site).
    assert "urls" not in project
