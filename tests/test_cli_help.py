"""The command line as a reader meets it: every option of every command says what it is for, every
argument is named in its command's help, the top-level help names every command, and a library error
about one setting is reported under the option that set it."""

import re

import click
import pytest
from click.testing import CliRunner

from hovle_edge.cli import main


def commands(group: click.Group, path: tuple = ()):
    """(words after `hovle-edge`, command) for every leaf command, subgroups walked."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, path + (name,))
        else:
            yield path + (name,), command


LEAVES = list(commands(main))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"export", "run", "profile", "train distill", "shapes data", "serve"} <= names and len(names) >= 16, names


@pytest.mark.parametrize("path,command", LEAVES, ids=[" ".join(path) for path, _ in LEAVES])
def test_every_option_has_help_and_every_argument_is_described(path, command):
    with click.Context(command, info_name=" ".join(path)) as ctx:
        text = command.get_help(ctx)
    missing = [param.opts[0] for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing, f"hovle-edge {' '.join(path)}: options without help: {missing}"
    for argument in (p for p in command.params if isinstance(p, click.Argument)):
        described = text.split("Options:")[0].split("\n", 1)[1]  # the help text below the usage line
        assert argument.human_readable_name in described, f"{' '.join(path)}: {argument.human_readable_name} undescribed"
    assert (command.help or "").strip(), f"hovle-edge {' '.join(path)} has no help of its own"


def test_top_level_help_names_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    prose, listing = result.output.split("Options:")[0], result.output.split("Commands:")[1]
    for name in main.commands:
        assert f"  {name} " in listing, f"{name} is not in the Commands list"
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prose), f"{name} is not named in the description"


def test_a_library_error_names_the_option_not_the_field(tiny_export, tmp_path):
    """The library says `setting="group_size"`; the user reads --group-size, never group_size."""
    result = CliRunner().invoke(main, ["quantize", "--model", str(tiny_export), "--out", str(tmp_path / "int4"),
                                       "--group-size", "24", "--held-out", "0"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: Invalid value for '--group-size': group size 24: choose a power of two"), result.output
    assert not (tmp_path / "int4").exists()
