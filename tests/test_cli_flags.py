"""CLI flags of issue 10: ``splitserve --version``, ``--served-model-name`` aliases on the router and ``up``, and help
that shows every flag's default on every command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from splitserve import launcher
from splitserve.cli import COMMANDS, build_parser
from splitserve.router.main import add_arguments, config_from_args
from splitserve.router.service import served_names
from splitserve.router.version import package_version


def test_version_flag_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == f"splitserve {package_version()}" and package_version() != "unknown"


def test_router_served_model_name_takes_several_aliases():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--model", "/m/dir", "--served-model-name", "a", "b"]), environ={})
    assert served_names(config) == ("a", "b")
    assert served_names(config_from_args(parser.parse_args([]), {"SPLITSERVE_SERVED_MODEL_NAME": "x,y"})) == ("x", "y")
    assert served_names(config_from_args(parser.parse_args(["--model", "/m/dir"]), environ={})) == ("/m/dir",)


def test_up_passes_the_aliases_to_the_router():
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    router = launcher.plan_commands(parser.parse_args(["--served-model-name", "a", "b"]), 8100)[0]
    assert router.argv[-3:] == ["--served-model-name", "a", "b"]
    assert "--served-model-name" not in launcher.plan_commands(parser.parse_args([]), 8100)[0].argv


def test_up_passes_the_chat_template_and_tool_call_parser_to_the_router_only(tmp_path):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    template = tmp_path / "chat.jinja"
    children = launcher.plan_commands(parser.parse_args(["--chat-template", str(template), "--tool-call-parser",
                                                         "hermes"]), 8100)
    router = children[0].argv
    assert router[router.index("--chat-template") + 1] == str(template)
    assert router[router.index("--tool-call-parser") + 1] == "hermes"
    assert all("--chat-template" not in c.argv and "--tool-call-parser" not in c.argv for c in children[1:])


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, its parser, option) for every option of ``parser`` and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, parser, action


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_that_shows_its_default(command):
    """Defaults come from argparse (``DefaultsFormatter``) or, for flags that fall back to a config field or an
    environment variable, from the help text itself."""
    parser = build_parser([command])  # imports the command's module, as a real invocation does
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    missing, no_default = [], []
    for path, owner, action in _options(sub, (command,)):
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append((path, action.option_strings or action.dest))
        elif action.option_strings and action.nargs != 0 and not action.required:
            if "default" not in owner._get_formatter()._get_help_string(action):
                no_default.append((path, action.option_strings))
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help does not show a default: {no_default}"
