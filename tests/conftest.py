"""Shared fixtures. Ray costs seconds to start: one session per test module, never `ray stop`."""
from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec (dedented) into tmp_path; classes in tests/apps.py import from there."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path
    return write


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray for one test module (our own, shut down at the end)."""
    import ray
    from oobspec.runtime.apply import start_embedded
    if ray.is_initialized():
        ray.shutdown()
    try:
        start_embedded("oob-tests", log_to_driver=False)
    except Exception:  # a loaded 2-core machine can miss Ray's start-up deadline once
        ray.shutdown()
        start_embedded("oob-tests", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _import_path():
    # Spec classes live in tests/apps.py and examples/: importable as the actors see them.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    yield
