"""Shared by the end-to-end tests: dates, the CLI in process, table versions, figures to print."""

from __future__ import annotations

from slimrec.cli import app
from slimrec.lake import Lake
from typer.testing import CliRunner

BASE_DATE, DAY = "2024-01-31", "2024-02-01"
FIGURES: dict = {}


def slim(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"slim {' '.join(map(str, args))} -> {r.exit_code}\n{r.output[-3000:]}\n{r.exception!r}"
    return r.output


def versions(lake: Lake) -> dict[str, int]:
    return {t["table"]: t["version"] for t in lake.tables()}
