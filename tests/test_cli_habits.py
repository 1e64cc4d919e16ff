"""The CLI's habits as scripts and CI see them: output to a pipe is never wrapped, `--set` keys
that no template reads are warned about, `--timeout` is kept, Ray Jobs prints lint warnings
once, `delete SPEC` renders with --values/--set, `logs --tail/--since`, and status text shows a
wrapped command's restarts. `oob` runs from `/` as a subprocess, against a `ray start --head`
(with the job API) that this module starts."""
from __future__ import annotations

import re
import time

import pytest
import requests

from conftest import free_port, oob, started_head, status_of, user_env, write_in

MODULE = '''
import time


class Talker:
    def __init__(self):
        print("talker starting", flush=True)

    def say(self, word: str) -> str:
        print(f"said {word}", flush=True)
        return word


class Sleepy:
    def __init__(self):
        time.sleep(120)
'''

TICKER = "import sys; [print(f'tick {i}', flush=True) for i in range(6)]; sys.exit(3)"


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "habits-proj"
    path.mkdir()
    (path / "habits_app.py").write_text(MODULE)
    return path


def test_a_set_key_that_no_template_reads_is_a_warning(folder):
    spec = write_in(folder, """
        version: 1
        name: inv
        actors:
          inventory:
            class: habits_app:Talker
            replicas: "{{ inventory.replicas }}"
            restarts: "{{ restarts | default(1) }}"
    """)
    values = write_in(folder, "inventory: {replicas: 1}\n", "values.yaml")
    typo = oob("lint", spec, "--no-import", "-f", values, "--set", "inventroy.replicas=3", "--set", "restarts=2")
    assert typo.returncode == 0, typo.stdout + typo.stderr
    assert typo.stdout.splitlines() == [
        f"{spec}:2:1: OOB112 warning: --set inventroy.replicas: no template in the spec reads it "
        "(did you mean 'inventory.replicas'?)"]
    assert oob("lint", spec, "--no-import", "--strict", "-f", values, "--set", "inventroy.replicas=3").returncode == 1
    fine = oob("lint", spec, "--no-import", "--set", "inventory.replicas=3", "--set", "inventory={replicas: 2}")
    assert (fine.returncode, fine.stdout) == (0, "")
    rendered = oob("render", spec, "-f", values, "--set", "inventroy.replicas=3")  # the YAML stays clean
    assert rendered.returncode == 0 and "OOB112" in rendered.stderr and "OOB112" not in rendered.stdout


@pytest.fixture(scope="module")
def head():
    """`ray start --head` with the job API; its GCS address and job URL. The job agent gets a
    free port of its own: at its default (52365) another head on this machine leaves it none."""
    gcs, dashboard, agent, metrics = free_port(), free_port(), free_port(), free_port()
    with started_head(f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                      env=user_env(), ports=(gcs, dashboard, agent)):
        yield {"gcs": f"127.0.0.1:{gcs}", "jobs": f"http://127.0.0.1:{dashboard}"}


@pytest.fixture(scope="module")
def chatty(head, tmp_path_factory):
    """A templated deployment (its name is `--set app=...`): a wrapped command that prints six
    lines and exits (restarts: 2), and a class whose name is long enough that its warning is
    a 200-character line."""
    folder = tmp_path_factory.mktemp("habits") / "habits-proj"
    folder.mkdir()
    (folder / "habits_app.py").write_text(MODULE)
    port, long_name = free_port(), "talker-" + "x" * 110
    spec = write_in(folder, f"""
        version: 1
        name: "{{{{ app }}}}"
        actors:
          ticker:
            command: ["python3", "-c", "{TICKER}"]
            restarts: 2
          {long_name}:
            class: habits_app:Talker
            servers: [{{name: http, port: {port}, routes: [{{path: /say, call: say}}]}}]
    """)
    plan = oob("plan", spec, "--address", head["gcs"], "--set", "app=habits")
    out = oob("apply", spec, "--address", head["gcs"], "--set", "app=habits")
    assert out.returncode == 0, out.stderr
    yield {"spec": spec, "apply": out, "plan": plan, "port": port, "talker": long_name}
    oob("delete", "habits", "--address", head["gcs"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_output_to_a_pipe_is_not_wrapped(chatty):
    lines = [line for line in chatty["apply"].stderr.splitlines() if "OOB306" in line]
    assert len(lines) == 1 and len(lines[0]) > 200, chatty["apply"].stderr
    assert lines[0].startswith(f"{chatty['spec']}:") and lines[0].endswith("(set restarts: -1 or a count)")


# Needs the executor to number what it reports as `oob plan` lists it (see the hand-over note).
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_step_numbers_are_consecutive_and_match_the_plan(chatty):
    steps = re.findall(r"step (\d+)/(\d+)", chatty["apply"].stderr)
    total = int(steps[-1][1])
    assert [int(n) for n, _ in steps] == list(range(1, total + 1)), chatty["apply"].stderr
    listed = next(line for line in chatty["plan"].stdout.splitlines() if line.startswith("steps: "))
    assert len(listed.split(" -> ")) == total, listed


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_status_text_shows_a_wrapped_commands_restarts(head, chatty):
    deadline = time.time() + 60
    while time.time() < deadline:
        ticker = next(r for r in status_of(head["gcs"], "habits")["replicas"] if r["actor"] == "ticker")
        if ticker["process"]["starts"] == 3 and not ticker["process"]["alive"]:
            break
        time.sleep(0.5)
    text = oob("status", "habits", "--address", head["gcs"]).stdout
    row = next(line for line in text.splitlines() if line.startswith("ticker-0"))
    assert re.search(r"\s0 \(command: 2\)\s", row), text


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_logs_tail_and_since(head, chatty):
    gcs, talker = head["gcs"], chatty["talker"]
    everything = oob("logs", "habits", "ticker", "--address", gcs)
    assert everything.stdout.count("tick 5") == 3  # (it ran three times)
    tail = oob("logs", "habits", "ticker", "--tail", "2", "--address", gcs)
    assert tail.returncode == 0 and tail.stdout.splitlines() == everything.stdout.splitlines()[-2:]
    time.sleep(3)
    assert requests.get(f"http://127.0.0.1:{chatty['port']}/say", params={"word": "later"}, timeout=10).ok
    recent = oob("logs", "habits", talker, "--since", "2s", "--address", gcs)
    assert recent.returncode == 0 and recent.stdout == "said later\n", recent.stdout + recent.stderr
    assert "talker starting" in oob("logs", "habits", talker, "--since", "1h", "--address", gcs).stdout
    assert oob("logs", "habits", talker, "--tail", "1", "--address", gcs).stdout == "said later\n"
    bad = oob("logs", "habits", "--since", "5 minutes", "--address", gcs)
    assert bad.returncode == 2 and "--since 5 minutes: not a duration" in bad.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_delete_renders_a_spec_with_values_and_set(head, chatty):
    wrong = oob("delete", chatty["spec"], "--set", "app=nothing-here", "--address", head["gcs"])
    assert wrong.returncode == 1 and "no deployment 'nothing-here'" in wrong.stderr
    out = oob("delete", chatty["spec"], "--set", "app=habits", "--address", head["gcs"])
    assert out.returncode == 0 and out.stdout.startswith("deleted habits: 2 actors"), out.stdout + out.stderr
    assert "no deployment 'habits'" in oob("status", "habits", "--address", head["gcs"]).stderr


# ray_cluster's `_log_tail` reads a local log, even an empty one, rather than ask the replica
# stuck in __init__ for 5 s more.
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_apply_keeps_its_timeout(head, folder):
    spec = write_in(folder, """
        version: 1
        name: sleepy
        actors:
          sleepy: {class: habits_app:Sleepy}
    """)
    start = time.monotonic()
    assert oob("plan", spec, "--address", head["gcs"]).returncode == 0
    before = time.monotonic() - start  # what apply does before it waits: start, connect, lint, plan
    start = time.monotonic()
    out = oob("apply", spec, "--address", head["gcs"], "--timeout", "5")
    took = time.monotonic() - start
    assert out.returncode == 1 and "not ready after 5s: sleepy-0 still in __init__" in out.stderr, out.stderr
    assert took < before + 5 + 1, f"took {took:.1f}s, {before:.1f}s of it before the wait"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_jobs_prints_each_lint_warning_once_with_the_users_file(head, folder):
    spec = write_in(folder, f"""
        version: 1
        name: jobwarn
        actors:
          talker:
            class: habits_app:Talker
            servers: [{{name: http, port: {free_port()}, routes: [{{path: /say, call: say}}]}}]
    """)
    try:
        out = oob("apply", spec, "--address", head["jobs"])
        assert out.returncode == 0, out.stdout + out.stderr
        warnings = [line for line in (out.stdout + out.stderr).splitlines() if "OOB306" in line]
        assert len(warnings) == 1 and warnings[0].startswith(f"{spec}:5:3: OOB306 warning:"), out.stdout + out.stderr
    finally:
        oob("delete", "jobwarn", "--address", head["gcs"])
