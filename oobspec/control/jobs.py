"""Ray Jobs (`--address http://HEAD:8265`): the command runs on the cluster as a job.

`oob apply` submits a job whose entrypoint is the same `oob apply` on the cluster (the spec's
folder as its working_dir, oobspec as a py_module, the rendered spec beside them), streams
the job's output back and exits with the job's exit code. The other commands go the same way.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from ..addresses import address_kind, explicit_address
from ..errors import ClusterError, first_line
from ..models import Spec

SPEC_ENV = "OOB_RENDERED_SPEC"
SPEC_PLACEHOLDER = "{spec}"
SPEC_FILE = ".oob-spec.yaml"
WARNED_ENV = "OOB_LINT_WARNINGS_SHOWN"  # the job's apply leaves out what the user's side printed


def jobs_address(address: str | None, spec: Spec | None = None) -> str | None:
    """The job API's URL when that is where this command goes (flag, RAY_ADDRESS, the spec)."""
    found = explicit_address(address, spec.ray.address if spec else None)
    return found if address_kind(found) == "jobs" else None


def _client(url: str):
    from .connect import PROBE_TIMEOUT, probe_tcp, use_token_if_any
    probe_tcp(url)
    import requests
    try:  # the SDK's own check has no timeout: a port that never answers would hang it
        requests.get(url.rstrip("/") + "/api/version", timeout=PROBE_TIMEOUT)
    except requests.RequestException as exc:
        raise ClusterError(f"cannot connect to Ray at {url}: no answer from the job API ({type(exc).__name__})") from None
    use_token_if_any(url)
    from ray.job_submission import JobSubmissionClient
    for name in list(logging.root.manager.loggerDict):  # the SDK's notes on uploads and websockets
        if name.startswith("ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # the SDK raises ConnectionError, RuntimeError, ValueError...
        text = first_line(str(exc), type(exc).__name__)
        raise ClusterError(f"cannot connect to Ray at {url}: {text}") from None


def forward(url: str, argv: list[str], spec: Spec | None = None) -> int:
    """Run `oob ARGV` on the cluster as a job; its output streams here; returns its exit code.
    ARGV names the spec as "{spec}" when the command takes one."""
    from .remote import check_cap, excludes, scan
    if spec is not None and argv[0] == "apply":  # lint here first, with the file's own lines
        from .apply import preflight
        for warning in preflight(spec, url):
            print(warning, file=sys.stderr)
    client = _client(url)
    package = str(Path(__file__).resolve().parent.parent)
    runtime_env: dict = {"py_modules": [package], "excludes": excludes(Path(package))}
    env_vars = {}
    if spec is not None:
        from ..render import to_yaml
        folder = spec._source.base_dir
        if argv[0] == "apply":  # printed above with the user's own file:line: not again from the job
            env_vars[WARNED_ENV] = "1"
        up = scan(folder)
        check_cap(up)
        print(f"· uploading {up.describe()} as the job's working_dir, with oobspec", file=sys.stderr)
        for line in up.warnings():
            print(line, file=sys.stderr)
        runtime_env.update(working_dir=str(folder), excludes=excludes(folder))
        env_vars[SPEC_ENV] = to_yaml(spec._source.document.data)
    # Auth tokens are not forwarded: a job's runtime_env is shown by the dashboard. Set them in
    # the cluster's environment (or use ray://, which passes them as a local apply does).
    if env_vars:
        runtime_env["env_vars"] = env_vars
    entrypoint = " ".join([sys.executable if _same_machine(url) else "python", "-m", "oobspec.job_entry",
                           *(_quote(a) for a in argv)])
    job = _submit(client, url, entrypoint, runtime_env)
    try:
        try:
            asyncio.run(_stream(client, job))
        except RuntimeError:  # the log stream broke off: the job's status still says how it ended
            pass
        return _exit_code(client, job)
    except KeyboardInterrupt:
        client.stop_job(job)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not client.get_job_status(job).is_terminal():
            time.sleep(0.2)
        raise


def _submit(client, url: str, entrypoint: str, runtime_env: dict, wait: float = 30.0) -> str:
    """Submit, waiting out a head whose job agent is still starting."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            text = first_line(str(exc), type(exc).__name__)
            raise ClusterError(f"the job API at {url} refused the job: {text}") from None


def _same_machine(url: str) -> bool:
    # A job on a head on this machine runs this interpreter (tests, a laptop); elsewhere `python`.
    host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def _own(line: str) -> bool:
    """Lines of the command, not of Ray's job supervisor."""
    return not (line.startswith("Running entrypoint for job ") or "INFO job_manager.py:" in line)


async def _stream(client, job: str) -> None:
    async for chunk in client.tail_job_logs(job):
        sys.stdout.write("".join(line for line in chunk.splitlines(keepends=True) if _own(line)))
        sys.stdout.flush()


def _exit_code(client, job: str) -> int:
    from ray.job_submission import JobStatus
    deadline = time.monotonic() + 30
    info = client.get_job_info(job)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        info = client.get_job_info(job)
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    if info.status != JobStatus.SUCCEEDED:  # it ended before the command ran (its runtime_env, say)
        message = first_line(info.message or "", str(info.status))
        raise ClusterError(f"job {job} {str(info.status).lower()}: {message}")
    return 0
