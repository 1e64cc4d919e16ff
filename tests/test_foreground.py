"""`oob apply` without an address: embedded Ray in the foreground, torn down on Ctrl-C / SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import requests

from conftest import OOB, oob, port_open, user_env, write_in

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def _start(spec, *args):
    """A foreground `oob apply` from `/`, its own process group (so the test can always clean up)."""
    return subprocess.Popen([OOB, "apply", str(spec), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=user_env(), cwd="/", start_new_session=True)


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
def test_foreground_apply_tears_down(project, sig):
    spec = write_in(project, """
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
    proc = _start(spec)
    try:
        url = _wait_for_endpoint(proc)
        assert requests.get(f"{url}/hello/fg", timeout=5).text == "hello fg"
        pid = requests.get(f"{url}/pid", timeout=5).json()
        segments = [n for n in os.listdir("/dev/shm") if n.startswith("oob-fg-")]
        assert segments
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
    assert not [n for n in segments if os.path.exists(f"/dev/shm/{n}")]


def _pids_in_session(proc) -> set[int]:
    """Every process the foreground apply started (its embedded Ray included): its process group."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == proc.pid:
                    out.add(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_ctrl_c_during_startup_stops_within_5s_and_removes_everything(project):
    spec = write_in(project, """
        version: 1
        name: slowfg
        actors:
          slow: {class: apps:Slow, kwargs: {seconds: 120}}
    """)
    proc = _start(spec)
    try:
        deadline = time.time() + 120
        seen = ""
        while "warming up" not in seen and time.time() < deadline:  # the actor is inside __init__
            seen += proc.stdout.readline()
        match = re.search(r"warming up \(pid (\d+)\)", seen)
        assert match, seen
        actor_pid = int(match.group(1))
        before = _pids_in_session(proc)
        assert actor_pid in before or os.path.exists(f"/proc/{actor_pid}")
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 5, f"took {took:.1f}s"
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    time.sleep(1)
    assert not os.path.exists(f"/proc/{actor_pid}") or open(f"/proc/{actor_pid}/stat").read().split(")")[-1].split()[0] == "Z"
    assert not [p for p in before if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] != "Z"]


def test_foreground_status_and_logs_from_another_terminal(project):
    """A second terminal finds the foreground apply's private Ray by the deployment's name."""
    spec = write_in(project, """
        version: 1
        name: fgchat
        actors:
          chat: {class: apps:Chatty, restarts: -1, servers: [{name: http, port: 0, routes: [{path: /, call: get}]}]}
    """)
    proc = _start(spec)
    try:
        url = _wait_for_endpoint(proc)
        assert requests.get(url, timeout=5).text == "hi"
        status = oob("status", "fgchat", "-o", "json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["healthy"] is True
        # One deployment, one owner: a second foreground apply refuses at once, touching nothing.
        second = oob("apply", spec, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"'fgchat' is already running in the foreground (oob apply, pid {proc.pid}" in second.stderr
        assert oob("status", "fgchat").returncode == 0
        logs = oob("logs", "fgchat")
        assert logs.returncode == 0 and "chatty starting" in logs.stdout, logs.stdout + logs.stderr
        assert "fgchat" in oob("list").stdout
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
