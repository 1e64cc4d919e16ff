"""What Ray's control store knows about a deployment's actors, dead ones included, and where
their output is, read without calling the actor (it may be busy in `__init__`, or gone)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from .. import ray_private
from ..errors import first_line, last_line
from ..replica.logs import read_from

# Ray's actor states, as `oob status` words them.
_STATES = {"DEPENDENCIES_UNREADY": "waiting for its dependencies", "PENDING_CREATION": "starting",
           "ALIVE": "alive", "RESTARTING": "restarting", "DEAD": "dead"}
_KILL_REASONS = {"WORKER_DIED": "its worker process died", "OWNER_DIED": "its owner died",
                 "NODE_DIED": "its node died", "RAY_KILL": "killed (ray.kill)", "OUT_OF_SCOPE": "out of scope",
                 "REF_DELETED": "out of scope"}


@dataclass(frozen=True)
class ActorRecord:
    name: str
    state: str  # one of _STATES' keys
    pid: int
    worker_id: str  # hex; empty before a worker is leased
    node_id: str  # hex
    restarts: int
    start_time: int
    death: str | None  # one line, for a dead actor

    @property
    def words(self) -> str:
        if self.state == "DEAD":
            return f"dead: {self.death or 'unknown cause'}"
        if self.state == "PENDING_CREATION" and not self.pid:
            return "waiting for resources"
        return _STATES.get(self.state, self.state.lower())


def death_reason(cause) -> str:
    """A Ray ActorDeathCause as one short line."""
    kind = cause.WhichOneof("context")
    if kind == "actor_died_error_context":
        ctx = cause.actor_died_error_context
        from ray.core.generated.common_pb2 import ActorDiedErrorContext
        reason = ActorDiedErrorContext.Reason.Name(ctx.reason)
        text = _KILL_REASONS.get(reason) or _first_line(ctx.error_message)
        return f"{text} before it started" if ctx.never_started and reason != "RAY_KILL" else text
    if kind == "creation_task_failure_context":
        return "__init__ raised: " + last_line(cause.creation_task_failure_context.formatted_exception_string, "unknown error")
    if kind == "runtime_env_failed_context":
        return "runtime_env failed: " + _first_line(cause.runtime_env_failed_context.error_message)
    if kind == "actor_unschedulable_context":
        return "cannot be scheduled: " + _first_line(cause.actor_unschedulable_context.error_message)
    if kind == "oom_context":
        return "out of memory"
    return "unknown cause"


def _first_line(text: str) -> str:
    """Ray's reasons are paragraphs: their first sentence."""
    return first_line(text, "unknown cause").split(". ")[0].rstrip(".")


def is_client() -> bool:
    """Connected through Ray Client (ray://): this process is outside the cluster."""
    from ray.util.client import ray as client
    return client.is_connected()


def actor_records(namespace: str) -> dict[str, ActorRecord]:
    """Newest record of every named actor in the namespace (a live one wins over a dead one
    of the same name: a replaced replica leaves its predecessor's record behind)."""
    if is_client():  # the actor table is read inside the cluster
        import ray

        from .remote import oob_env
        task = ray.remote(num_cpus=0, runtime_env=oob_env())(_actor_table)
        return _records(ray.get(task.remote()), namespace)
    return _records(_actor_table(), namespace)


def _actor_table() -> list[bytes]:
    return ray_private.actor_table()


def _records(table: list[bytes], namespace: str) -> dict[str, ActorRecord]:
    from ray.core.generated import gcs_pb2
    out: dict[str, ActorRecord] = {}
    for raw in table:
        data = gcs_pb2.ActorTableData.FromString(raw)
        if data.ray_namespace != namespace or not data.name:
            continue
        state_name = gcs_pb2.ActorTableData.ActorState.Name(data.state)
        record = ActorRecord(data.name, state_name, data.pid, data.address.worker_id.hex(),
                             data.address.node_id.hex() or data.node_id.hex(), data.num_restarts,
                             data.start_time or data.timestamp,
                             death_reason(data.death_cause) if state_name == "DEAD" else None)
        old = out.get(data.name)
        if old is None or (old.state == "DEAD") > (record.state == "DEAD") or \
                ((old.state == "DEAD") == (record.state == "DEAD") and record.start_time >= old.start_time):
            out[data.name] = record
    return out


def log_files(record: ActorRecord) -> list[str]:
    """The worker's stdout and stderr files, when they are on this machine (else [])."""
    if not record.worker_id:
        return []
    try:
        session = ray_private.session_dir()
    except Exception:
        return []
    found = []
    for ext in ("out", "err"):
        found += sorted(glob.glob(os.path.join(session, "logs", f"worker-{record.worker_id}-*.{ext}")))[:1]
    return found


def tail(record: ActorRecord, lines: int = 20) -> str:
    text = ""
    for path in log_files(record):
        try:
            size = os.path.getsize(path)
            text += read_from(path, max(0, size - 64 * 1024))[1]
        except OSError:
            continue
    return "\n".join(text.splitlines()[-lines:])
