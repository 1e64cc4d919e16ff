"""A replica's life as the user's class sees it, and where a wrapped command runs: `on_start()`
once its servers are up, `on_stop()` while it drains, a failing `on_start` failing the apply,
and `cwd:`. As users run it: spec and module in a temp folder, `oob` from `/`, real clients."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from conftest import free_port, oob, write_in

MODULE = '''
import asyncio
import json
import time


class Pool:
    def __init__(self, port: int, journal: str):
        self.port, self.journal, self.in_flight, self.started = port, journal, 0, False

    def _note(self, **event):
        with open(self.journal, "a") as f:
            f.write(json.dumps(event) + "\\n")

    async def on_start(self):  # async: its own server must answer already
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.close()
        self.started = True
        self._note(event="on_start")

    def on_stop(self):  # sync
        self._note(event="on_stop", in_flight=self.in_flight)

    async def state(self) -> dict:
        return {"started": self.started}

    async def slow(self) -> str:
        self.in_flight += 1
        await asyncio.sleep(3)
        self.in_flight -= 1
        return "done"


class NoDatabase:
    def on_start(self):
        raise ConnectionError("the database at db:5432 is not there")

    async def ping(self) -> str:
        return "pong"
'''


@pytest.fixture
def address(local_ray) -> str:
    """The module's own local Ray, as the CLI reaches it."""
    import ray
    return ray.get_runtime_context().gcs_address


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "hooks-proj"
    path.mkdir()
    (path / "pools.py").write_text(MODULE)
    return path


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_on_start_runs_once_servers_are_up_and_on_stop_while_draining(address, folder):
    port, journal = free_port(), folder / "journal.jsonl"
    spec = write_in(folder, f"""
        version: 1
        name: hooked
        actors:
          pool:
            class: pools:Pool
            kwargs: {{port: {port}, journal: {journal}}}
            restarts: 1
            drain: 10
            servers:
              - {{name: http, port: {port}, routes: [{{path: /state, call: state}}, {{path: /slow, call: slow}}]}}
    """)
    out = oob("apply", spec, "--address", address)
    try:
        assert out.returncode == 0, out.stderr
        assert requests.get(f"http://127.0.0.1:{port}/state", timeout=10).json() == {"started": True}
        slow: dict = {}
        caller = threading.Thread(target=lambda: slow.update(
            r=requests.get(f"http://127.0.0.1:{port}/slow", timeout=30)))
        caller.start()
        time.sleep(0.5)  # in flight when the delete comes
    finally:
        deleted = oob("delete", "hooked", "--address", address)
    caller.join()
    assert deleted.returncode == 0, deleted.stderr
    assert (slow["r"].status_code, slow["r"].text) == (200, "done")  # on_stop did not cut it
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    assert events == [{"event": "on_start"}, {"event": "on_stop", "in_flight": 1}]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_an_on_start_that_raises_fails_the_apply_with_its_message(address, folder):
    spec = write_in(folder, """
        version: 1
        name: nodb
        actors:
          api:
            class: pools:NoDatabase
            servers: [{name: http, port: 0, routes: [{path: /ping, call: ping}]}]
    """)
    try:
        out = oob("apply", spec, "--address", address, "--timeout", "60")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "ConnectionError: the database at db:5432 is not there" in out.stderr
    finally:
        oob("delete", "nodb", "--address", address)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_command_runs_in_its_cwd_and_by_default_in_the_specs_folder(address, folder):
    (folder / "site").mkdir()
    (folder / "site" / "index.html").write_text("hello from site/")
    (folder / "marker.txt").write_text("the spec's folder")
    site, top = free_port(), free_port()
    serve = '["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]'
    spec = write_in(folder, f"""
        version: 1
        name: served
        actors:
          site:
            command: {serve}
            cwd: site
            restarts: 1
            servers: [{{name: http, protocol: tcp, port: {site}}}]
          top:
            command: {serve}
            restarts: 1
            servers: [{{name: http, protocol: tcp, port: {top}}}]
    """)
    out = oob("apply", spec, "--address", address)
    try:
        assert out.returncode == 0, out.stderr
        assert requests.get(f"http://127.0.0.1:{site}/", timeout=10).text == "hello from site/"
        assert requests.get(f"http://127.0.0.1:{top}/marker.txt", timeout=10).text == "the spec's folder"
    finally:
        oob("delete", "served", "--address", address)


def test_cwd_is_for_commands_only(tmp_path):
    spec = write_in(tmp_path, """
        version: 1
        name: nocwd
        actors:
          app: {class: "mod:App", cwd: site}
    """)
    out = oob("lint", spec, "--no-import")
    assert out.returncode == 1
    assert "'cwd' is the working folder of a 'command'; a class actor has none" in out.stdout
