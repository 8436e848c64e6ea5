"""What a fresh install must give: every module imports with the declared dependencies, and the command
line answers --help for itself and every subcommand."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sadtalker_rt

MODULES = sorted(m.name for m in pkgutil.walk_packages(sadtalker_rt.__path__, "sadtalker_rt."))
COMMAND = Path(sys.executable).with_name("sadtalker-rt")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def _help(*args: str) -> str:
    assert COMMAND.exists(), f"{COMMAND} is missing: the package's console script is not installed"
    done = subprocess.run([str(COMMAND), *args, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_subcommand():
    from sadtalker_rt.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    text = _help()
    assert names and all(name in text for name in names)
    for name in names:
        assert "Usage:" in _help(name), name
