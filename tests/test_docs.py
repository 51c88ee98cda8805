"""The README's commands exist as written, and ``--help`` shows every effective default."""

import functools
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clicooper.cli.defaults import RUN_FLAG_KEYS, effective_default
from clicooper.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
WORD = re.compile(r"[a-z][a-z-]*")


@functools.cache
def _help(*command: str) -> str:
    """``clicooper COMMAND --help`` in this process, on one line."""
    result = CliRunner().invoke(
        app, [*command, "--help"], terminal_width=400, env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, f"clicooper {' '.join(command)} --help: {result.output}"
    return " ".join(result.output.split())


def _readme_commands() -> list[str]:
    """Every `clicooper ...` in the command table and in shell blocks."""
    table = re.findall(r"^\| `clicooper ([^`]*)`", README, flags=re.M)
    blocks = re.findall(r"^(?:\.venv/bin/)?clicooper (.*)$", README, flags=re.M)
    return table + blocks


def _split(command: str) -> tuple[list[str], list[str]]:
    """(command path, flags) of one README command line."""
    tokens = command.replace("\\|", "|").split()
    path = []
    for token in tokens:
        if not WORD.fullmatch(token) or len(path) == 2:
            break
        path.append(token)
    return path, re.findall(r"(?<![\w-])--[a-z][a-z-]*", command)


COMMANDS = _readme_commands()


def test_readme_lists_commands():
    names = {_split(c)[0][0] for c in COMMANDS}
    assert {"run", "verify", "claim", "evaluate", "launch", "certs", "serve"} <= names


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_and_its_options_exist(command):
    path, flags = _split(command)
    if len(path) == 2 and path[1] not in _help(path[0]):
        path = path[:1]  # the second word is an argument (e.g. `serve trainer`), not a command
    text = _help(*path)
    missing = [flag for flag in flags if flag not in text]
    assert not missing, (
        f"`clicooper {command}`: {missing} not in `clicooper {' '.join(path)} --help`"
    )


def _required_options(path: list[str]) -> list[str]:
    command = typer.main.get_command(app)
    for word in path:
        command = command.commands[word]  # type: ignore[attr-defined]
    return [p.opts[0] for p in command.params if p.required and p.opts[0].startswith("--")]


@pytest.mark.parametrize("command", re.findall(r"^\| `clicooper ([^`]*)`", README, flags=re.M))
def test_readme_table_row_names_every_required_option(command):
    path = _split(command)[0]
    if len(path) == 2 and path[1] not in _help(path[0]):
        path = path[:1]
    missing = [opt for opt in _required_options(path) if opt not in command]
    assert not missing, f"README row `clicooper {command}` leaves out required {missing}"


def test_readme_points_inside_the_repository():
    assert "../" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_run_help_shows_every_effective_default():
    text = _help("run")
    for name, key in RUN_FLAG_KEYS.items():
        assert f"[default: ({effective_default(key)})]" in text, (name, key)
    assert effective_default("epochs") == "5; digits: 20"
