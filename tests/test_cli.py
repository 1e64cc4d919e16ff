"""The `oob` CLI as a user runs it: a separate process, exit codes, output formats, no tracebacks.

Nothing here touches a Ray cluster: RAY_ADDRESS is unset and TMPDIR points at an empty folder,
so `oob plan` finds no local cluster and plans offline.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import with_examples

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
INVALID = ROOT / "tests" / "invalid"
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<code>OOB\d{3}) (?P<msg>.+)$")


@pytest.fixture
def oob(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TMPDIR=str(tmpdir))

    def run(*args, cwd=ROOT, extra_env=None, check_traceback=True):
        proc = subprocess.run([sys.executable, "-m", "oobspec.cli", *map(str, args)], cwd=cwd,
                              env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=50, check=False)
        if check_traceback:
            assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    run.tmpdir = tmpdir
    return run


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    with_examples(tmp_path, text)
    return path


WARN_ONLY = """\
    version: 1
    name: warn
    actors:
      a:
        class: examples.counter:Counter
        servers: [{name: http, port: 8080}]
"""


# --- lint -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_lint_ok(oob):
    proc = oob("lint", SPECS / "counter.yaml", SPECS / "grpc.yaml", SPECS / "process.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip() == "3 specs ok"


@pytest.mark.timeout(60)
def test_lint_errors_exit_1_one_line_each(oob):
    spec = INVALID / "38-class-does-not-import.yaml"
    proc = oob("lint", spec)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        m = LINE.match(line)
        assert m and m["file"] == str(spec) and m["code"] == "OOB501", line
    assert proc.stderr.strip() == "2 errors, 0 warnings"


@pytest.mark.timeout(60)
def test_lint_several_files_mixed(oob):
    proc = oob("lint", SPECS / "counter.yaml", INVALID / "24-same-port.yaml")
    assert proc.returncode == 1
    assert [LINE.match(x)["code"] for x in proc.stdout.splitlines()] == ["OOB301"]


@pytest.mark.timeout(60)
def test_lint_warnings_alone_exit_0_strict_exit_1(oob, tmp_path):
    spec = write(tmp_path, WARN_ONLY)
    proc = oob("lint", spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OOB306 warning:" in proc.stdout
    assert proc.stderr.strip() == "0 errors, 1 warning"
    assert oob("lint", "--strict", spec).returncode == 1
    assert oob("lint", "--strict", SPECS / "counter.yaml").returncode == 0


@pytest.mark.timeout(60)
def test_lint_json(oob, tmp_path):
    spec = write(tmp_path, WARN_ONLY)
    proc = oob("lint", "-o", "json", spec, INVALID / "16-connect-missing-actor.yaml")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert {(d["code"], d["severity"]) for d in data} == {("OOB306", "warning"), ("OOB201", "error")}
    for d in data:
        assert set(d) == {"code", "message", "file", "line", "col", "severity", "hint"}
    clean = oob("lint", "-o", "json", SPECS / "counter.yaml")
    assert clean.returncode == 0 and json.loads(clean.stdout) == []


@pytest.mark.timeout(60)
def test_lint_github(oob, tmp_path):
    spec = write(tmp_path, WARN_ONLY)
    proc = oob("lint", "-o", "github", INVALID / "39-route-not-a-method.yaml", spec)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    errors = [x for x in lines if x.startswith("::error file=")]
    warnings = [x for x in lines if x.startswith("::warning file=")]
    assert len(errors) == 2 and len(warnings) == 1 and len(lines) == 3
    assert re.match(r"^::error file=[^,]+,line=13,col=55,title=OOB502::'gett' is not a method", errors[0])


@pytest.mark.timeout(60)
def test_lint_no_import(oob, tmp_path):
    spec = INVALID / "38-class-does-not-import.yaml"
    assert oob("lint", "--no-import", spec).returncode == 0


@pytest.mark.timeout(60)
def test_lint_with_values_and_set(oob):
    assert oob("lint", SPECS / "web.yaml").returncode == 1
    proc = oob("lint", SPECS / "web.yaml", "--values", SPECS / "web.values.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = oob("lint", SPECS / "web.yaml", "-f", SPECS / "web.values.yaml", "--set", "backend.replicas=zero")
    assert proc.returncode == 1 and "OOB121" in proc.stdout


@pytest.mark.timeout(60)
def test_lint_missing_file(oob, tmp_path):
    proc = oob("lint", tmp_path / "nope.yaml")
    assert proc.returncode == 1
    assert LINE.match(proc.stdout.strip())["code"] == "OOB100"


# --- render ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_render_with_values_and_set(oob):
    proc = oob("render", SPECS / "web.yaml", "--values", SPECS / "web.values.yaml",
               "--set", "frontend.replicas=3", "--set", "name=shop", "--set", "log_level=on")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["name"] == "shop"
    assert data["actors"]["frontend"]["replicas"] == 3 and data["actors"]["backend"]["replicas"] == 2
    assert data["actors"]["frontend"]["env"]["LOG_LEVEL"] == "on"  # quoted, so YAML 1.1 readers agree
    assert [s["name"] for s in data["actors"]["frontend"]["servers"]] == ["http"]
    assert "when" not in proc.stdout and "{{" not in proc.stdout


@pytest.mark.timeout(60)
def test_render_values_files_later_wins(oob, tmp_path):
    override = write(tmp_path, "backend: {replicas: 5}\nfrontend: {auth: true}\n", "override.yaml")
    proc = oob("render", SPECS / "web.yaml", "-f", SPECS / "web.values.yaml", "-f", override)
    data = yaml.safe_load(proc.stdout)
    assert data["actors"]["backend"]["replicas"] == 5 and data["actors"]["frontend"]["replicas"] == 2
    assert data["actors"]["frontend"]["servers"][0]["auth"] == {"token_env": "WEB_TOKEN"}


@pytest.mark.timeout(60)
def test_render_errors(oob):
    proc = oob("render", SPECS / "web.yaml")
    assert proc.returncode == 1 and proc.stdout == ""
    assert all(LINE.match(x) for x in proc.stderr.splitlines())


# --- plan -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_plan_offline_text(oob):
    proc = oob("plan", SPECS / "counter.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "offline" in proc.stdout and "create" in proc.stdout
    assert "http://127.0.0.1:8080" in proc.stdout
    assert list(oob.tmpdir.iterdir()) == []  # nothing started, nothing registered


@pytest.mark.timeout(60)
def test_plan_offline_json(oob):
    proc = oob("plan", SPECS / "web.yaml", "--values", SPECS / "web.values.yaml", "--set", "backend.replicas=3",
               "-o", "json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["online"] is False and plan["namespace"] == "oob-web"
    assert {(a["kind"], a["actor"], len(a["replicas"])) for a in plan["actions"]} == {
        ("create", "backend", 3), ("create", "frontend", 2)}
    assert plan["waves"] == [["backend"], ["frontend"]]


@pytest.mark.timeout(60)
def test_plan_of_a_bad_spec(oob):
    proc = oob("plan", INVALID / "09-unknown-key-typo.yaml")
    assert proc.returncode == 1 and "OOB120" in proc.stderr


@pytest.mark.timeout(60)
def test_plan_and_render_never_show_the_token(oob, tmp_path):
    secret = "tok-1234567890-abcdef"
    spec = write(tmp_path, """\
        version: 1
        name: sec
        actors:
          a:
            class: examples.counter:Counter
            restarts: 1
            servers: [{name: http, port: 0, auth: {token_env: SEC_TOKEN}}]
    """)
    for args in (("render", spec), ("plan", spec), ("plan", spec, "-o", "json"), ("lint", "-o", "json", spec)):
        proc = oob(*args, extra_env={"SEC_TOKEN": secret})
        assert proc.returncode == 0, proc.stderr
        assert secret not in proc.stdout + proc.stderr


# --- schema and usage -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_schema(oob):
    proc = oob("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["title"] == "oobspec" and "actors" in schema["properties"]
    assert proc.stdout == (ROOT / "schemas" / "oobspec.schema.json").read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ("lint", "--bogus", "specs/counter.yaml"),
    ("lint",),
    ("render",),
    ("plan",),
    ("nosuchcommand",),
    ("lint", "-o", "xml", "specs/counter.yaml"),
    ("plan", "-o", "github", "specs/counter.yaml"),
    ("render", "specs/counter.yaml", "extra"),
    ("render", "specs/web.yaml", "--set", "novalue"),
    ("lint", "specs/counter.yaml", "--set", "=1"),
    ("lint", "specs/counter.yaml", "--values"),
    ("render", "specs/web.yaml", "--set", "a=1", "--set", "a.b=2"),
])
def test_usage_errors_exit_2(oob, args):
    proc = oob(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() and proc.stdout == ""


@pytest.mark.timeout(60)
def test_help_and_version(oob):
    proc = oob("--help")
    assert proc.returncode == 0
    for command in ("lint", "render", "plan", "apply", "status", "sync", "delete", "logs", "schema"):
        assert command in proc.stdout
    assert oob("lint", "--help").returncode == 0
    proc = oob("--version")
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


@pytest.mark.timeout(60)
def test_debug_shows_the_traceback(oob):
    spec = INVALID / "04-python-tag.yaml"
    quiet = oob("render", spec)
    assert quiet.returncode == 1 and "OOB102" in quiet.stderr
    loud = oob("--debug", "render", spec, check_traceback=False)
    assert loud.returncode == 1 and "Traceback" in loud.stderr


@pytest.mark.timeout(60)
def test_no_traceback_on_odd_input(oob, tmp_path):
    odd = tmp_path / "odd.yaml"
    odd.write_bytes(b"\xff\xfe\x00garbage: [")
    for args in (("lint", odd), ("render", odd), ("plan", odd), ("lint", tmp_path), ("render", tmp_path / "x.yaml"),
                 ("lint", INVALID / "05-alias-bomb.yaml"), ("render", INVALID / "45-sandbox-globals.yaml")):
        proc = oob(*args)
        assert proc.returncode == 1, (args, proc.stderr)


@pytest.mark.timeout(60)
def test_lint_json_stays_parseable_when_user_modules_print(oob):
    proc = oob("lint", "-o", "json", INVALID / "57-class-import-exits.yaml")
    assert proc.returncode == 1
    (diag,) = json.loads(proc.stdout)
    assert diag["code"] == "OOB501" and "SystemExit" in diag["message"]
    assert "noisy_module imported" in proc.stderr


def test_report_formats_escape_what_would_break_a_line():
    from oobspec.errors import Diagnostic
    from oobspec.report import diagnostics, summary

    d = Diagnostic("OOB120", "unknown key 'a%b'\nsecond", "dir,1/a:b.yaml", 3, 4, "warning", "did you mean 'x'?")
    (line,) = diagnostics([d], "github").splitlines()
    assert line == ("::warning file=dir%2C1/a%3Ab.yaml,line=3,col=4,title=OOB120::"
                    "unknown key 'a%25b'%0Asecond (did you mean 'x'?)")
    assert json.loads(diagnostics([d], "json"))[0]["hint"] == "did you mean 'x'?"
    assert summary([], 1) == "1 spec ok" and summary([d], 2) == "0 errors, 1 warning"
