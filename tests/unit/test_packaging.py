"""What a wheel carries: pyproject.toml names every package (setuptools takes only the
ones it names, so a new sub-package missing from the list would be left out of every
install but the editable one), and the migration scripts are among them."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("router", "scheduler", "serving")


def listed() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed() -> None:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed() == set()
    assert listed() - found == {"gpugate_proto"}  # a stale name fails the build


def test_migration_scripts_ship() -> None:
    versions = ROOT / "serving" / "state" / "migrations" / "versions"
    assert {"serving.state.migrations", "serving.state.migrations.versions"} <= listed()
    assert list(versions.glob("*.py")) != []
    assert (versions / "__init__.py").is_file()  # else setuptools would skip the folder
