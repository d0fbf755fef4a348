"""CLI flags of issue 10: ``splitserve --version`` and ``--served-model-name`` aliases on the router and ``up``."""

from __future__ import annotations

import argparse
import subprocess
import sys

from splitserve import launcher
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
