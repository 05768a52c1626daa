"""constraints.txt (the tested versions every setup path installs) pins every dependency the two pyproject files
declare, at a version inside the declared range, and never torch (pinned on its own, installed first)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = Version(version)
    return found


def declared() -> list[Requirement]:
    requirements = []
    for path in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        requirements += [Requirement(r) for r in project.get("dependencies", [])]
        for extra in project.get("optional-dependencies", {}).values():
            requirements += [Requirement(r) for r in extra]
    return requirements


def test_every_declared_dependency_is_pinned_inside_its_range() -> None:
    locked = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in locked
            continue
        assert name in locked, f"{requirement} is not pinned in constraints.txt (run make lock)"
        assert requirement.specifier.contains(locked[name], prereleases=True), f"{requirement}: locked {locked[name]}"


def test_the_makefile_and_the_dockerfile_install_with_the_constraints() -> None:
    assert "-c $(LOCK)" in (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt" in (ROOT / "Dockerfile").read_text()
