"""Apply: observe, plan (pure), then carry out the plan's steps (executor.py).

The entry points used by the CLI and `oobspec.deploy` live here too."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ApplyError, ClusterError, first_line
from ..models import Spec
from ..plan import Observed, Plan, make_plan
from ..contract import ReplicaInfo
from . import cluster, history
from .executor import Executor
from .ray_cluster import RayCluster
from .replicas import Builder
from .revisions import Revision

log = logging.getLogger("oobspec")
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class Applier:
    """One apply: the plan against the cluster, carried out step by step."""

    def __init__(self, spec: Spec, progress: Progress = _quiet, detached: bool = False):
        self.spec, self.progress, self.detached = spec, progress, detached
        self.builder = Builder(spec, progress)
        self.given: Revision | None = None  # a recorded revision to deploy again (rollback, restart)
        self.note = ""  # what `oob history` says of this apply besides its result
        self.restart: set[str] = set()  # actors whose unchanged replicas are replaced all the same

    @classmethod
    def of_revision(cls, revision: Revision, progress: Progress, note: str, detached: bool = True) -> "Applier":
        """An apply of a recorded revision: its spec, its classes and code digests, its folder
        (which need not exist any more)."""
        applier = cls(revision.spec_model(), progress, detached)
        applier.builder = revision.builder(progress)
        applier.spec, applier.given, applier.note = applier.builder.spec, revision, note
        return applier

    def run(self, timeout: float = 120.0, atomic: bool = False) -> dict[str, dict[str, list[str]]]:
        """Raises ApplyError when a step fails, once every replica that ran before runs again
        (at its old or new version); with `atomic`, once the deployment is back at the revision
        that ran before."""
        if cluster.is_client() and Path(self.builder.base_dir).is_dir():
            from .remote import package_env
            self.builder.shipped = package_env(self.builder.base_dir)
            self.progress(f"uploaded {self.builder.base_dir} and oobspec to the cluster")
        plan, observed, self.builder.code = plan_on_cluster(self.spec, self.builder.base_dir,
                                                            self.given.code if self.given else None, self.restart)
        for action in plan.changes:
            self.progress(f"{action.kind} {action.actor} [{','.join(map(str, action.replicas))}]: {action.describe()}")
        for warning in plan.warnings:
            self.progress(f"warning: {warning}")
        ray_cluster = RayCluster(self.spec.namespace, timeout)
        previous, was = ray_cluster.current(), history.current_number(self.spec.namespace)
        revision = self.given or self._revision()
        # Recorded before any start: a replica can always be restored.
        number = history.begin(self.spec.namespace, revision, self.note)
        try:
            self._execute(plan, observed, ray_cluster, (previous, was), timeout, atomic)
        except ApplyError as exc:
            history.finish(self.spec.namespace, number, first_line(str(exc), "failed"))
            raise
        except BaseException:
            history.finish(self.spec.namespace, number, "interrupted", quiet=True)
            raise
        history.finish(self.spec.namespace, number, None)
        history.set_current(self.spec.namespace, revision, number)
        cluster.put_meta(self.spec.namespace, "spec", self.spec.record())
        cluster.put_meta(self.spec.namespace, "last-apply", {"ok": True, "revision": revision.digest,
                                                             "time": time.time()})
        return self.builder.endpoints

    def _execute(self, plan: Plan, observed: Observed, ray_cluster: RayCluster,
                 previous: tuple[Revision | None, int | None], timeout: float, atomic: bool) -> None:
        executor = Executor(self.spec, self.builder, ray_cluster, self.progress, self.detached, timeout)
        executor.observed(running(observed))
        try:
            executor.execute(plan)
        except ApplyError as exc:
            if executor.outcome:
                cluster.put_meta(self.spec.namespace, "last-apply", executor.outcome.record())
            if atomic:
                where = executor.outcome
                stopped = f"apply stopped at {where.step}: {where.cause}" if where else first_line(str(exc))
                self._roll_back(previous, bool(executor.before), stopped, exc.log_tail, timeout)
            raise
        except BaseException:
            with handling_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the clean-up short
                removed = executor.interrupted()
            if removed:
                self.progress(f"removed what this apply started: {', '.join(removed)}")
            raise

    def _revision(self) -> Revision:
        for name, actor in self.spec.actors.items():
            if actor.class_:
                self.builder.actor_class(name)  # imports it (an error now, before anything stops)
        return Revision.of(self.spec, self.builder.base_dir, self.builder.code, self.builder.pickles)

    def _roll_back(self, before: tuple[Revision | None, int | None], ran_before: bool, first: str, log_tail: str,
                   timeout: float) -> None:
        """--atomic: every actor back at the revision that ran before (and its number in the
        history), through the same rolling path (or, when nothing ran before, nothing left).
        `first`: where and why the apply stopped."""
        previous, number = before
        if not ran_before:
            self.progress("--atomic: nothing ran before this apply; removing what it started")
            cluster.delete_all(self.spec.name)
            raise ApplyError(f"{first}; --atomic: removed what this apply started", log_tail) from None
        if previous is None:
            raise ApplyError(f"{first}; --atomic: no earlier revision is recorded, so nothing was rolled back",
                             log_tail) from None
        self.progress(f"--atomic: returning every actor to revision {previous.digest}")
        builder = previous.builder(self.progress)
        plan, observed, _ = plan_on_cluster(builder.spec, builder.base_dir, code=previous.code)
        for action in plan.changes:
            self.progress(f"{action.kind} {action.actor} [{','.join(map(str, action.replicas))}]: {action.describe()}")
        executor = Executor(builder.spec, builder, RayCluster(self.spec.namespace, timeout), self.progress,
                            self.detached, timeout)
        executor.observed(running(observed))
        try:
            executor.execute(plan)
        except ApplyError as exc:
            raise ApplyError(f"{first}; --atomic: the roll-back failed too: {exc}", log_tail) from None
        history.set_current(self.spec.namespace, previous, number)
        raise ApplyError(f"{first}; --atomic: rolled back, every actor runs revision {previous.digest} again",
                         log_tail) from None


def running(observed: Observed) -> dict[tuple[str, int], ReplicaInfo]:
    """The replicas that run (busy ones included), as the executor starts from them."""
    return {(r.actor, r.replica): ReplicaInfo(r.actor, r.replica, r.config_hash, r.code_hash, r.pid or 0,
                                              r.node_id or "", r.endpoints, gpu_uuid=r.gpu_uuid, ports=r.ports)
            for r in observed.replicas if r.alive}


@contextmanager
def handling_signals(handler) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` (or SIG_IGN) for the duration; in a thread other than
    the main one (where Python allows no handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def plan_on_cluster(spec: Spec, base_dir: Path, code: dict[str, str] | None = None,
                    restart: set[str] | None = None) -> tuple[Plan, Observed, dict[str, str]]:
    """The plan against the connected cluster, as `oob plan` shows it and apply carries it out:
    observed replicas, node count, code versions; `restart`: actors replaced even if unchanged."""
    import ray
    observed = cluster.observe(spec.namespace)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    code = code_versions(spec, base_dir) if code is None else code
    single = spec.ray.placement == "STRICT_PACK" or len(nodes) == 1
    migrate_req = None if cluster.is_client() else cluster.tcp_migrate_req()  # Ray Client: nodes elsewhere
    return make_plan(spec, observed, single_node=single, code=code, restart=restart,
                     migrate_req=migrate_req), observed, code


def code_versions(spec: Spec, base_dir: Path) -> dict[str, str]:
    """Digest of each class actor's source, as the plan compares it with the running replicas'."""
    from ..code import code_digest
    return {name: code_digest(a.class_, base_dir) for name, a in spec.actors.items() if a.class_}


# --- entry points ---------------------------------------------------------------------------


def start_embedded(namespace: str, log_to_driver: bool = True) -> str:
    # A new local Ray turns token auth on when the mode is unset (and says so); say it ourselves.
    if "RAY_AUTH_MODE" not in os.environ:
        cluster.token_mode()
    import ray
    ray.init(address="local", namespace=namespace, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=log_to_driver, configure_logging=True)
    return ray.get_runtime_context().gcs_address


MISSING_TOKEN = "OOB312"


def preflight(spec: Spec, address: str | None = None) -> list:
    """Every lint check, before anything touches the cluster: errors refuse the apply with the
    same lines `oob lint` prints; the warnings are returned."""
    from ..api import lint
    from ..errors import SpecError
    # A token the replicas cannot read would fail them after they started: refused here instead.
    found = [replace(d, severity="error") if d.code == MISSING_TOKEN else d for d in lint(spec, address=address)]
    if any(d.is_error for d in found):
        raise SpecError(found)  # the warnings too: the same lines as `oob lint`
    return found


def apply_with_errors(spec: Spec, progress: Progress, timeout: float, detached: bool, atomic: bool = False) -> dict:
    try:
        return Applier(spec, progress, detached).run(timeout, atomic)
    except ApplyError as exc:
        if exc.log_tail:
            print(f"--- last lines of the actor's log ---\n{exc.log_tail}\n---", file=sys.stderr)
        raise


__all__ = ["Applier", "ClusterError", "apply_with_errors", "preflight", "start_embedded"]
