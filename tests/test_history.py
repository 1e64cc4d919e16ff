"""Day two, as a user runs it from `/` against a `ray start --head` cluster: every apply is a
numbered revision in `oob history` (failed ones too, with why); `oob rollback` deploys an earlier
one again from the cluster's record (the spec's folder gone) and `oob restart` replaces every
replica, both rolling while a client keeps calling (zero failed requests); `oob diff` says
whether a spec differs from what runs. The numbering, the index and the diff text are also
tested without Ray."""
from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager

import pytest
import requests

from conftest import ROOT, alive_pids, free_port, oob, status_of, write_in
from oobspec.control.revisions import KEEP, Entry, History
from oobspec.control.rollouts import diff_text
from oobspec.plan import ActionKind, Observed, Reason, ReplicaState, Strategy, config_hash, make_plan
from oobspec.report import history_text

SPEC = """
version: 1
name: {name}
actors:
  chat:
    class: apps:Chatty
    replicas: 2
    restarts: -1
    drain: 1
    kwargs: {{greeting: {greeting}, fail: {fail}}}
    servers:
      - {{name: http, port: {http}, routes: [{{path: /, call: get}}]}}
"""


@contextmanager
def calling(http: int):
    """A client calling both replicas over HTTP (a new connection each time) while the block
    runs; yields the list of (replica, status, text) it saw."""
    seen: list[tuple[int, int, str]] = []
    stop = threading.Event()

    def loop():
        n = 0
        while not stop.is_set():
            i = n % 2
            try:
                r = requests.get(f"http://127.0.0.1:{http + i}/", timeout=10, headers={"Connection": "close"})
                seen.append((i, r.status_code, r.text))
            except requests.RequestException as exc:
                seen.append((i, 0, type(exc).__name__))
            n += 1
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(1)
    try:
        yield seen
    finally:
        time.sleep(1)
        stop.set()
        thread.join(timeout=30)


def history_json(address: str, name: str) -> dict:
    out = oob("history", name, "--address", address, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_all_answered(seen, last: str) -> None:
    assert len(seen) > 20 and [s for s in seen if s[1] != 200] == []
    for i in range(2):
        assert [t for j, _s, t in seen if j == i][-1] == last


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_history_rollback_diff_and_restart(deployed, ray_head, project, tmp_path):
    http, name = free_port(), "days"  # its next one is free too: replica i binds port + i
    spec = lambda greeting, fail="false", folder=project: write_in(  # noqa: E731
        folder, SPEC.format(name=name, greeting=greeting, fail=fail, http=http))
    deployed(spec("v1"), ray_head)
    deployed(spec("v2"), ray_head)
    bad = oob("apply", spec("v3", fail="true"), "--address", ray_head)
    assert bad.returncode == 1, bad.stdout + bad.stderr

    found = history_json(ray_head, name)
    assert [(r["number"], r["result"]) for r in found["revisions"]] == [(1, "ok"), (2, "ok"), (3, "failed")]
    assert found["current"] == 2 and "cannot greet with 'v3'" in found["revisions"][2]["message"]
    assert all("@" in r["by"] for r in found["revisions"])
    text = oob("history", name, "--address", ray_head).stdout
    assert text.splitlines()[0].split() == ["REVISION", "TIME", "BY", "DIGEST", "RESULT", "CURRENT", "DESCRIPTION"]

    shutil.rmtree(project)  # the revision carries the spec, the class and its code
    with calling(http) as seen:
        back = oob("rollback", name, "1", "--address", ray_head)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "roll chat-0: stand-in _oob-surge-chat-0 starts beside it" in back.stderr
    assert f"http://127.0.0.1:{http}" in back.stdout
    assert_all_answered(seen, "v1")
    found = history_json(ray_head, name)
    assert [(r["number"], r["result"], r["note"]) for r in found["revisions"]][-1] == (4, "ok", "rollback to 1")
    assert found["current"] == 4 and found["revisions"][3]["digest"] == found["revisions"][0]["digest"]

    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(ROOT / "tests" / "apps.py", again)
    same = oob("diff", spec("v1", folder=again), "--address", ray_head)
    assert (same.returncode, same.stdout) == (0, ""), same.stdout + same.stderr
    edited = oob("diff", spec("v9", folder=again), "--address", ray_head)
    assert edited.returncode == 1, edited.stderr
    assert any(line.startswith("-") and "greeting: v1" in line for line in edited.stdout.splitlines()), edited.stdout
    assert any(line.startswith("+") and "greeting: v9" in line for line in edited.stdout.splitlines()), edited.stdout

    before, endpoints = alive_pids(ray_head, name), status_of(ray_head, name)["replicas"]
    with calling(http) as seen:
        restarted = oob("restart", name, "--address", ray_head)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert_all_answered(seen, "v1")
    after = alive_pids(ray_head, name)
    assert set(after) == {"chat-0", "chat-1"} and not set(after.values()) & set(before.values())
    assert [r["endpoints"] for r in status_of(ray_head, name)["replicas"]] == [r["endpoints"] for r in endpoints]
    assert history_json(ray_head, name)["revisions"][-1]["note"] == "restart"


# --- without Ray ---------------------------------------------------------------------------


def test_numbers_keep_growing_once_old_revisions_are_dropped_and_the_current_one_is_kept():
    history = History()
    for n in range(1, 13):
        assert history.add(f"d{n}", float(n), "me@host").number == n
    assert [e.number for e in history.entries] == list(range(13 - KEEP, 13)) and history.last == 12
    index = history.to_index(keep="d1")  # the current one, older than every entry listed
    assert index["digests"][0] == "d12" and index["digests"][-1] == "d1" and len(index["digests"]) == KEEP + 1
    again = History.from_index(index)
    assert again == history and again.add("d13", 13.0, "me@host").number == 13


def test_an_index_an_older_oobspec_wrote_reads_as_numbered_revisions():
    history = History.from_index({"digests": ["c", "b", "a"]}, lambda d: {"a": 1.0, "b": 2.0, "c": 3.0}[d])
    assert [(e.number, e.digest, e.time, e.result) for e in history.entries] == [(1, "a", 1.0, "ok"), (2, "b", 2.0, "ok"),
                                                                               (3, "c", 3.0, "ok")]
    assert history.current({"digest": "b"}) == 2 and history.current({"digest": "b", "revision": 7}) == 7
    assert History.from_index(None) == History()


def test_rollback_by_default_returns_to_the_newest_complete_revision_that_deployed_something_else():
    history = History([Entry(1, "a", 1.0, result="ok"), Entry(2, "b", 2.0, result="ok"),
                       Entry(3, "c", 3.0, result="failed"), Entry(4, "a", 4.0, result="ok", note="rollback to 1"),
                       Entry(5, "a", 5.0, result="ok", note="restart")], 5)
    assert history.previous(5).number == 2
    assert history.previous(2).number == 1
    assert history.previous(1) is None


SMALL = {"version": 1, "name": "web", "actors": {"web": {"class": "apps:Chatty", "kwargs": {"greeting": "v1"}}}}


def test_diff_text_is_empty_for_the_same_spec_and_names_what_changed():
    assert diff_text("web", SMALL, {"web": "c1"}, json.loads(json.dumps(SMALL)), {"web": "c1"}) == ""
    edited = json.loads(json.dumps(SMALL))
    edited["actors"]["web"]["kwargs"]["greeting"] = "v2"
    text = diff_text("web", SMALL, {"web": "c1"}, edited, {"web": "c2"})
    lines = text.splitlines()
    assert lines[:2] == ["--- web (running)", "+++ web (spec)"]
    assert "-    kwargs: {greeting: v1}" in lines and "+    kwargs: {greeting: v2}" in lines
    assert lines[-1] == "code changed: actor web"
    new = diff_text("web", None, {}, SMALL, {"web": "c1"}).splitlines()
    assert new[:2] == ["--- /dev/null", "+++ web (spec)"] and all(line.startswith(("+", "@")) for line in new[2:])


def test_a_restart_replaces_unchanged_replicas_the_way_a_change_would():
    from oobspec.models import Spec
    spec = Spec.model_validate({"version": 1, "name": "web", "actors": {
        "web": {"class": "apps:Chatty", "replicas": 2, "servers": [{"name": "http", "port": 8080}]},
        "other": {"class": "apps:Chatty"}}})
    observed = Observed(True, [ReplicaState(a, i, config_hash(spec, a)) for a, n in (("web", 2), ("other", 1))
                               for i in range(n)])
    assert make_plan(spec, observed).changes == []
    plan = make_plan(spec, observed, restart={"web"})
    [action] = plan.changes
    assert (action.kind, action.actor, action.replicas, action.reason) == (ActionKind.REPLACE, "web", [0, 1],
                                                                           Reason.RESTART)
    assert action.strategy == Strategy.ROLLING and action.describe() == "restart asked for; rolling, no downtime"
    assert [(s.kind, s.replicas) for s in plan.steps if s.actor == "web"] == [("roll", [0]), ("roll", [1])]


def test_history_text_lists_every_revision_with_its_result_and_the_current_one():
    rows = [dict(Entry(1, "abc", 0.0, "me@host", "ok").to_dict(), current=False),
            dict(Entry(2, "def", 0.0, "me@host", "failed", "apply stopped at step 1/1 (roll web[0]): boom").to_dict(),
                 current=False),
            dict(Entry(3, "abc", 0.0, "me@host", "ok", note="rollback to 1").to_dict(), current=True)]
    lines = history_text({"revisions": rows}).splitlines()
    assert lines[0].split() == ["REVISION", "TIME", "BY", "DIGEST", "RESULT", "CURRENT", "DESCRIPTION"]
    assert lines[2].split()[:5] == ["2", "-", "me@host", "def", "failed"] and lines[2].endswith("apply: apply stopped "
                                                                                                "at step 1/1 (roll web[0]): boom")
    assert lines[3].split() == ["3", "-", "me@host", "abc", "ok", "*", "rollback", "to", "1"]
