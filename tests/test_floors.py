"""pyproject.toml's dependency floors are what `.ci/floors.txt` pins, the set the suite is run on to show that the
floors are true (how: the file's header)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def floors() -> dict[str, str]:
    """Every package pyproject.toml names (dependencies and every extra) → its ``>=`` floor."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, str] = {}
    for line in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        req = Requirement(line)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line}: one >= floor expected"
        name = canonicalize_name(req.name)
        assert found.setdefault(name, lows[0]) == lows[0], f"{req.name} has two floors"
    return found


def test_the_floors_file_pins_exactly_pyprojects_floors():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    want = floors()
    assert sorted(pins) == sorted(want)
    assert {n: Version(v) for n, v in pins.items()} == {n: Version(v) for n, v in want.items()}
