"""The edges a user (or another local user) reaches: the registry, connecting to what is not
Ray, SIGTERM, a token that is not set, the wrapped program's launcher, what gets installed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from conftest import OOB, ROOT, free_port, port_open, user_env

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 65534  # nobody: "another local user"


def can_chown(folder: Path) -> bool:
    probe = folder / ".chown-probe"
    probe.write_text("")
    try:
        os.chown(probe, OTHER_UID, -1)
        return True
    except PermissionError:
        return False
    finally:
        probe.unlink()


def run_oob(*args: str, env: dict, cwd: str = "/", timeout: float = 50) -> subprocess.CompletedProcess:
    return subprocess.run([OOB, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def private_tmp(tmp_path):
    """A TMPDIR of our own and no XDG_RUNTIME_DIR: the registry falls back to <tmp>/oobspec-<uid>."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = user_env(TMPDIR=str(tmp))
    env.pop("XDG_RUNTIME_DIR", None)
    return tmp, env


@pytest.fixture
def listener():
    """Where a planted entry points: it must never be connected to."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(0.2)
        yield sock


def connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
        return True
    except TimeoutError:
        return False


# --- the registry of foreground applies -------------------------------------------------------


def test_a_registry_folder_planted_by_another_user_is_ignored(private_tmp, listener):
    tmp, env = private_tmp
    if not can_chown(tmp):
        pytest.skip("chown needs root here: cannot play another local user")
    planted = tmp / f"oobspec-{os.getuid()}"
    planted.mkdir()
    (planted / "shop.json").write_text(json.dumps({"address": "127.0.0.1:%d" % listener.getsockname()[1],
                                                   "pid": os.getpid()}))
    os.chmod(planted, 0o777)
    os.chown(planted, OTHER_UID, -1)
    out = run_oob("status", "shop", env=env)
    assert out.returncode == 1
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: ignoring {planted}: owned by uid {OTHER_UID}, not by you (uid {os.getuid()}) "
                        "(remove it; oob keeps its registry there)"], out.stderr
    assert "no Ray cluster found for 'shop'" in out.stderr
    assert not connected(listener)  # the planted address was never tried (in token mode the token goes there)


def test_an_entry_planted_in_a_private_folder_is_ignored(private_tmp, listener):
    tmp, env = private_tmp
    if not can_chown(tmp):
        pytest.skip("chown needs root here: cannot play another local user")
    folder = tmp / f"oobspec-{os.getuid()}"
    folder.mkdir(mode=0o700)
    entry = folder / "shop.json"
    entry.write_text(json.dumps({"address": "127.0.0.1:%d" % listener.getsockname()[1], "pid": os.getpid()}))
    os.chown(entry, OTHER_UID, -1)
    out = run_oob("status", "shop", env=env)
    assert out.returncode == 1 and f"warning: ignoring {entry}: owned by uid {OTHER_UID}" in out.stderr
    assert not connected(listener)


def test_the_registry_is_private_and_prefers_xdg_runtime_dir(tmp_path, monkeypatch):
    from oobspec.control import registry
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with socket.create_server(("127.0.0.1", 0)) as sock:
        address = "127.0.0.1:%d" % sock.getsockname()[1]
        path = registry.register("shop", address)
        assert path == runtime / "oobspec" / "shop.json"
        assert (os.stat(path.parent).st_mode & 0o777, os.stat(path).st_mode & 0o777) == (0o700, 0o600)
        from oobspec.control import cluster
        assert cluster.foreground_owner("shop") == {"address": address, "pid": os.getpid()}
        registry.unregister(path)
        assert not path.exists()
    os.chmod(runtime, 0o755)  # not private: the XDG folder is passed over for <tmp>/oobspec-<uid>
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    fallback = tmp_path / f"oobspec-{os.getuid()}"
    assert registry.registry_dir(create=True) == fallback and os.stat(fallback).st_mode & 0o777 == 0o700


# --- connecting: one deadline, whatever answers -------------------------------------------------


GRPC_SERVER = """
import sys, time, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
if sys.argv[1] == "gcs":  # answers the calls a probe makes, then nothing else Ray needs
    def cluster_id(request, context):
        return b"\\x12\\x1c" + b"x" * 28
    def config(request, context):
        return b""
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("ray.rpc.NodeInfoGcsService", {
            "GetClusterId": grpc.unary_unary_rpc_method_handler(cluster_id)}),
        grpc.method_handlers_generic_handler("ray.rpc.InternalKVGcsService", {
            "GetInternalConfig": grpc.unary_unary_rpc_method_handler(config)})))
server.add_insecure_port("127.0.0.1:" + sys.argv[2])
server.start()
time.sleep(300)
"""


@pytest.fixture
def grpc_server():
    started = []

    def start(kind: str) -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", GRPC_SERVER, kind, str(port)], start_new_session=True)
        started.append(proc)
        deadline = time.time() + 20
        while not port_open(port) and time.time() < deadline:
            time.sleep(0.1)
        return f"127.0.0.1:{port}"
    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_grpc_server_that_is_not_ray_is_one_line_in_seconds(grpc_server, tmp_path):
    address = grpc_server("plain")
    start = time.monotonic()
    out = run_oob("status", "shop", "--address", address, env=user_env(TMPDIR=str(tmp_path)))
    assert time.monotonic() - start < 10
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (f"error: cannot connect to Ray at {address}: a gRPC server "
                                                  "answers there, but not Ray's GCS")


@pytest.mark.ray
@pytest.mark.timeout(90)
def test_a_server_ray_would_wait_for_forever_ends_at_the_deadline(grpc_server, tmp_path):
    """It answers the probe like a GCS, then nothing: `ray.init` alone would wait without end."""
    address = grpc_server("gcs")
    start = time.monotonic()
    out = run_oob("status", "shop", "--address", address, timeout=80,
                  env=user_env(TMPDIR=str(tmp_path), OOB_CONNECT_TIMEOUT="5"))
    took = time.monotonic() - start
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: cannot connect to Ray at {address}: Ray did not finish "
                                                  "the connection within 5s (OOB_CONNECT_TIMEOUT)")
    assert took < 15, took
    assert "Traceback" not in out.stderr and "SIGTERM handler is not set" not in out.stderr


# --- a token that is not set ------------------------------------------------------------------


TOKEN_SPEC = """\
    version: 1
    name: tok
    actors:
      web:
        class: apps:Chatty
        restarts: 1
        servers:
          - name: http
            port: 0
            auth: {token_env: TOK_UNSET_TOKEN}
"""


def test_a_token_variable_that_is_not_set_is_a_warning_in_lint_and_an_error_in_apply(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(TOKEN_SPEC))
    (tmp_path / "apps.py").write_text((ROOT / "tests" / "apps.py").read_text())
    env = {k: v for k, v in user_env().items() if k != "TOK_UNSET_TOKEN"}
    lint = run_oob("lint", str(spec), env=env)
    where = f"{spec}:10:27: OOB312"
    assert lint.returncode == 0 and f"{where} warning: auth.token_env TOK_UNSET_TOKEN is not set" in lint.stdout
    start = time.monotonic()
    apply = run_oob("apply", str(spec), env=env)
    assert apply.returncode == 1
    assert f"{where} auth.token_env TOK_UNSET_TOKEN is not set" in apply.stderr  # an error now, with file:line:col
    assert "Ray" not in apply.stderr and time.monotonic() - start < 20  # refused before anything started
    assert run_oob("lint", str(spec), env=dict(env, TOK_UNSET_TOKEN="x")).stdout == ""


# --- SIGTERM ends a command cleanly -------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_sigterm_ends_logs_follow_cleanly(ray_head, project, deployed):
    spec = project / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: term
        actors:
          web:
            class: apps:Chatty
            restarts: 1
            servers: [{name: http, port: 0}]
    """))
    deployed(spec, ray_head)
    follow = subprocess.Popen([OOB, "logs", "term", "-f", "--address", ray_head], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/", env=user_env())
    time.sleep(6)  # connected and following
    assert follow.poll() is None
    sent = time.monotonic()
    follow.send_signal(signal.SIGTERM)
    _, err = follow.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert follow.returncode == 130, err
    for noise in ("Traceback", "*** SIGTERM received", "@ 0x", "Stack trace"):
        assert noise not in err, err


# --- the wrapped program's launcher --------------------------------------------------------------


PARENT = """
import asyncio, sys
from oobspec.replica.actor import Supervised

async def main():
    sup = Supervised(["sleep", "300"], 0, {})
    await sup.start()
    print(sup.proc.pid, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def test_a_wrapped_program_starts_without_preexec_fn_and_dies_with_its_actor(monkeypatch):
    from oobspec.replica.actor import Supervised
    seen = {}

    async def spy(*args, **kwargs):
        seen.update(kwargs, argv=args)
        raise OSError("stop here")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    with pytest.raises(OSError):
        asyncio.run(Supervised(["sleep", "1"], 0, {})._spawn())
    assert "preexec_fn" not in seen  # no Python code between fork and exec in a threaded worker
    assert seen["start_new_session"] is True
    monkeypatch.undo()

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        parent.stdout.readline()  # "[oob] started sleep (pid N)"
        child = int(parent.stdout.readline())
        deadline = time.time() + 5
        while _argv(child)[:2] != [b"sleep", b"300"] and time.time() < deadline:
            time.sleep(0.02)
        assert _argv(child)[:2] == [b"sleep", b"300"]  # the launcher became the program (same pid)
        parent.kill()  # SIGKILL: no clean-up code runs in the "actor"
        parent.wait()
        deadline = time.time() + 5
        while Path(f"/proc/{child}").exists() and _state(child) != "Z" and time.time() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or _state(child) == "Z"
    finally:
        if parent.poll() is None:
            parent.kill()


def _argv(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_missing_program_is_named():
    from oobspec.replica.actor import Supervised
    with pytest.raises(FileNotFoundError, match="nope-not-a-program"):
        asyncio.run(Supervised(["nope-not-a-program"], 0, {})._spawn())


# --- packaging says what the code needs ---------------------------------------------------------


def test_pyproject_declares_what_the_code_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["requires-python"] == ">=3.11"
    deps = {d.split("[")[0].split(">")[0].split("=")[0].strip(): d for d in meta["dependencies"]}
    assert "requests" in deps and "aiohttp>=3.14.4" in deps["aiohttp"]
    assert deps["ray"].endswith(",<2.61")
    assert project["tool"]["setuptools"]["packages"] == ["oobspec", "oobspec.transports", "oobspec.control",
                                                        "oobspec.replica"]
    assert "py-modules" not in project["tool"]["setuptools"]


def test_only_oobspec_is_installed_top_level(tmp_path):
    """From another folder, `cli` and `examples` are not importable: a user's own module of that
    name is theirs."""
    probe = "import importlib.util as u; print([n for n in ('cli', 'examples', 'oobspec') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env=user_env())
    assert out.stdout.strip() == "['oobspec']", out.stdout + out.stderr
