"""pyproject lists every package folder (the list is by hand because of the top-level schemas/)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"slimrec.schemas", "slimrec.profiles"} | {
        ".".join(p.parent.relative_to(ROOT / "libs").parts) for p in (ROOT / "libs" / "slimrec").rglob("__init__.py")
    }
    assert found == listed
