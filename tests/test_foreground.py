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


def test_ray_start_head_then_apply_with_address(write_spec):
    """`ray start --head` (token auth on by default in Ray 2.60) then `oob apply --address 127.0.0.1:P`."""
    from conftest import free_port
    gcs_port, http_port = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={gcs_port}", "--include-dashboard=false",
                             "--num-cpus=2", "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    spec = write_spec(f"""
        version: 1
        name: headed
        actors:
          echo:
            class: apps:Echo
            restarts: -1
            servers: [{{name: http, port: {http_port}, routes: [{{path: "/hello/{{name}}", call: hello}}]}}]
    """)
    try:
        deadline = time.time() + 60
        while not port_open(gcs_port) and time.time() < deadline:
            time.sleep(0.5)
        oob = [sys.executable, "-m", "oobspec.cli"]
        address = f"127.0.0.1:{gcs_port}"
        applied = subprocess.run(oob + ["apply", str(spec), "--address", address], capture_output=True, text=True,
                                 timeout=120, env=env)
        assert applied.returncode == 0, applied.stderr
        assert requests.get(f"http://127.0.0.1:{http_port}/hello/head", timeout=5).text == "hello head"
        deleted = subprocess.run(oob + ["delete", "headed"], capture_output=True, text=True, timeout=120,
                                 env=dict(env, RAY_ADDRESS=address))
        assert deleted.returncode == 0, deleted.stderr
        assert not port_open(http_port)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the cluster this test started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
