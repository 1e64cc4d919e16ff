"""Shared fixtures. Ray costs seconds to start: one session per test module, never `ray stop`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from multinode import free_port  # noqa: F401  (one way to pick a port, for every test)

ROOT = Path(__file__).resolve().parent.parent


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec (dedented) into tmp_path. In-process tests import tests/apps.py as pytest
    does; the actors get the class from the driver (by value), never from an import path."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        with_examples(path.parent, text)
        return path
    return write


def with_examples(folder: Path, text: str = "examples.") -> None:
    """A spec naming the example classes (`examples.services:KeyValue`) has them beside it, as
    specs/ does: they are the user's own code, imported from the spec's folder, not installed."""
    if "examples." in text and not (folder / "examples").exists():
        shutil.copytree(ROOT / "specs" / "examples", folder / "examples",
                        ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray for one test module (our own, shut down at the end)."""
    import ray
    from oobspec.control.apply import start_embedded
    if ray.is_initialized():
        ray.shutdown()
    try:
        start_embedded("oob-tests", log_to_driver=False)
    except Exception:  # a loaded 2-core machine can miss Ray's start-up deadline once
        ray.shutdown()
        start_embedded("oob-tests", log_to_driver=False)
    yield
    ray.shutdown()


OOB = str(Path(sys.executable).parent / "oob")  # the console script, as users run it


def user_env(**extra) -> dict:
    """The environment a user's shell has: ours, with no RAY_ADDRESS (each test names its
    cluster). Nothing here adds an import path: the user's module reaches Ray on its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


def oob(*args, cwd="/", timeout=180, env=None, **kw) -> subprocess.CompletedProcess:
    """`oob ARGS` from another folder (default `/`), as a user runs it."""
    return subprocess.run([OOB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env or user_env(), **kw)


@pytest.fixture
def deployed():
    """`oob apply SPEC --address A ARGS` from `/`, asserted to succeed; every deployment applied
    through it is deleted when the test ends, whether it passed or not."""
    made: dict[tuple[str, str], dict | None] = {}

    def apply(spec: Path, address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        import yaml
        made[(yaml.safe_load(Path(spec).read_text())["name"], address)] = env
        out = oob("apply", spec, "--address", address, *args, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    yield apply
    for (name, address), env in reversed(list(made.items())):
        oob("delete", name, "--address", address, env=env)


@pytest.fixture
def project(tmp_path):
    """A user's folder: their module (a copy of tests/apps.py) beside the specs they write."""
    folder = tmp_path / "proj"
    folder.mkdir()
    shutil.copy(ROOT / "tests" / "apps.py", folder / "apps.py")
    return folder


def write_in(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    with_examples(folder, text)
    return path


@contextmanager
def started_head(*args: str, env: dict | None = None, ports: tuple[int, ...] = ()) -> Iterator[None]:
    """A `ray start --head ARGS --block` of our own (token auth on, as Ray 2.60 starts it),
    stopped by its process group at the end: never `ray stop`, never another cluster."""
    env = {k: v for k, v in (env or user_env()).items() if k != "RAY_AUTH_MODE"}
    if not any(a.startswith("--dashboard-agent-listen-port") for a in args):
        # At its default (52365) another head on this machine may hold it: then no job is accepted.
        args += (f"--dashboard-agent-listen-port={free_port()}",)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus=4", "--block",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 120
    while not all(port_open(p) for p in ports) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # the raylet (and the job agent) register just after the ports open
    try:
        yield
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a head takes half a minute to exit on SIGTERM; what it does then, nobody reads
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster of our own; its GCS address."""
    port = free_port()
    with started_head(f"--port={port}", "--include-dashboard=false", ports=(port,)):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_nodes():
    """A 3-node Ray cluster of our own on loopback (tests/multinode.py): head 127.0.0.2 (zone=a),
    workers 127.0.0.3 (zone=b) and 127.0.0.4 (zone=c); `.address` for `--address`."""
    from multinode import LocalCluster
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def status_of(address, name) -> dict:
    """`oob status NAME -o json` as a user runs it."""
    out = oob("status", name, "--address", address, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def alive_pids(address, name) -> dict[str, int]:
    return {r["name"]: r["pid"] for r in status_of(address, name)["replicas"] if r["state"] == "alive"}


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as a test makes them."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oobspec test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "srv.pem", tmp_path / "srv.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 20
    while not _gone(pid) and time.time() < deadline:
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Every thread has exited (and so its files are closed): a killed process's main thread
    turns zombie while its other threads, which share the files, are still exiting."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(") ", 1)[1][0] not in "ZX":
                    return False
        except (FileNotFoundError, ProcessLookupError):
            pass
    return True
