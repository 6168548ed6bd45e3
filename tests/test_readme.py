"""The README is a manual: short, written for the reader, and every command in its code blocks parses.

Each ``slim ...`` line of a fenced block is parsed by the real command line (unknown options, missing
arguments and bad choices fail here, as they would for a user) and its ``--help`` must run; each
``make X`` names a Makefile target. Nothing runs the pipeline.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from slimrec.cli import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 12_000
# "I" as a word, or "we"/"our"/"us" as the writer: a diary, not a manual
FIRST_PERSON = re.compile(r"\b(I|I'm|I've|we|We|our|Our|us|me|my|My)\b")


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def _commands(prefix: str) -> list[str]:
    out = []
    for block in _blocks(README.read_text()):
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(prefix + " "):
                out.append(line)
    return out


SLIM = _commands("slim")


def _resolve(args: list[str]):
    """(command path, the command object, its remaining arguments) for ``slim`` + ``args``."""
    cmd = typer.main.get_command(app)
    path = []
    # typer may carry its own click: test groups by what they do, not by click's classes
    while hasattr(cmd, "get_command") and args and not args[0].startswith("-"):
        sub = cmd.get_command(cmd.context_class(cmd), args[0])
        assert sub is not None, f"slim has no command {args[0]!r}"
        path.append(args.pop(0))
        cmd = sub
    return path, cmd, args


def test_readme_has_slim_commands_of_every_kind():
    used = {_resolve(shlex.split(c)[1:])[0][0] for c in SLIM}
    assert {"run", "ingest", "stage", "refresh", "replay", "validate", "tables"} <= used


@pytest.mark.parametrize("line", SLIM)
def test_readme_slim_command_parses_and_has_help(line):
    path, cmd, rest = _resolve(shlex.split(line)[1:])
    with cmd.make_context(" ".join(["slim", *path]), list(rest)) as ctx:  # raises on an unknown option
        assert ctx.params is not None
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example: slim" in r.output


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    used = {c.split()[1] for c in _commands("make")}
    assert used and used <= targets


def test_readme_size_and_voice():
    text = README.read_text()
    assert len(text.encode()) <= MAX_BYTES
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    prose = re.sub(r"`[^`]*`", "", prose)  # code spans: option values, paths
    hits = [ln for ln in prose.splitlines() if FIRST_PERSON.search(ln)]
    assert hits == []


def test_readme_results_block_is_generated():
    text = README.read_text()
    assert text.count("<!-- results:start -->") == 1 and text.count("<!-- results:end -->") == 1
    assert "slim report --lake lake" in text


def test_readme_local_links_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [ln for ln in links if "://" not in ln]
    assert local and [ln for ln in local if not (ROOT / ln).exists()] == []


def test_stage_help_names_every_stage():
    from slimrec.pipeline import STAGES

    r = CliRunner().invoke(app, ["stage", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert all(s in r.output for s in STAGES), r.output
