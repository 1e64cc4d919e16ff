"""`oob apply` without an address: embedded Ray in the foreground, torn down on Ctrl-C / SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, port_open

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def _start(spec, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "oobspec.cli", "apply", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)


def _wait_for_endpoint(proc):
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if match:
            return match.group(1)
    proc.kill()
    pytest.fail("no endpoint printed:\n" + "".join(lines) + proc.stderr.read())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_apply_tears_down(write_spec, tmp_path, sig):
    spec = write_spec("""
        version: 1
        name: fg
        actors:
          echo:
            class: apps:Echo
            restarts: -1
            buffers: {scratch: {shape: [16], dtype: int32}}
            servers: [{name: http, port: 0, routes: [{path: /pid, call: pid}, {path: "/hello/{name}", call: hello}]}]
          sink:
            class: apps:Echo
            buffers: {scratch: {shape: [16], dtype: int32}}
        links: [{name: scratch, from: echo.scratch, to: [sink.scratch]}]
    """)
    proc = _start(spec, tmp_path)
    try:
        url = _wait_for_endpoint(proc)
        assert requests.get(f"{url}/hello/fg", timeout=5).text == "hello fg"
        pid = requests.get(f"{url}/pid", timeout=5).json()
        assert [n for n in os.listdir("/dev/shm") if n.startswith("oob-fg-")]
        time.sleep(0.5)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "stopped" in err
    port = int(url.rsplit(":", 1)[1])
    assert not port_open(port)
    assert not os.path.exists(f"/proc/{pid}")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("oob-fg-")]
