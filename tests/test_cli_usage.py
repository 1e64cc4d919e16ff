"""Usage errors from the command line: exit code 2 and one line on stderr, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import oob as run_oob

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def oob(*args: str):
    """`oob ARGS` from the project root (the paths below are relative to it), a user's environment."""
    return run_oob(*args, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("command", ["lint", "render"])
def test_missing_values_file_is_a_usage_error(command):
    proc = oob(command, "specs/web.yaml", "--values", "/nonexistent/x.yaml")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: --values /nonexistent/x.yaml: no such file"]
    assert proc.stdout == ""


def test_missing_values_file_after_a_good_one():
    proc = oob("lint", "specs/web.yaml", "--values", "specs/web.values.yaml", "--values", "/nonexistent/y.yaml")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: --values /nonexistent/y.yaml: no such file"]


def test_good_values_file_still_lints_clean():
    proc = oob("lint", "--no-import", "specs/web.yaml", "--values", "specs/web.values.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
