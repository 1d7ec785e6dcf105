"""The code base passes ruff (lint and format), as CI requires."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff() -> list[str]:
    executable = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if executable is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return [executable]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    result = subprocess.run(ruff() + command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
