"""Apply: observe, plan (pure), then execute the plan's actions on Ray, wave by wave."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ApplyError, ClusterError
from ..models import Spec, memory_bytes
from ..plan import Observed, Plan, config_hash, make_plan
from . import cluster, state
from .context import env_key
from .wiring import setup_links

log = logging.getLogger("oobspec")
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class Applier:
    def __init__(self, spec: Spec, progress: Progress = _quiet, detached: bool = False):
        self.spec, self.progress, self.detached = spec, progress, detached
        self.namespace = spec.namespace
        source = spec._source
        self.base_dir = source.base_dir if source else Path.cwd()
        self.endpoints: dict[str, dict[str, list[str]]] = {}  # actor -> server -> urls
        self.info: dict[tuple[str, int], dict] = {}
        self.handles: dict[tuple[str, int], object] = {}
        self.placement = None
        self.shipped: dict | None = None  # runtime_env of uploaded code, on a remote cluster
        self.code: dict[str, str] = {}  # actor -> digest of its class's source
        self.by_reference: set[str] = set()  # actors whose module could not travel by value

    # --- configuration handed to each replica ---

    def _links_of(self, name: str) -> dict:
        out = {}
        for link in self.spec.links:
            entry = {"from": link.from_, "to": list(link.to), "transport": link.transport}
            src_actor, _, src_buf = link.from_.partition(".")
            if src_actor == name:
                entry.update(role="source", source_buffer=src_buf)
            for target in link.to:
                t_actor, _, t_buf = target.partition(".")
                if t_actor == name:
                    entry.setdefault("role", "target")
                    entry["target_buffer"] = t_buf
            if "role" in entry:
                out[link.name] = entry
        return out

    def replica_config(self, name: str, index: int, digest: str) -> dict:
        actor = self.spec.actors[name]
        targets = {t for link in self.spec.links for t in link.to}
        endpoints = {}
        for key, ref in actor.connect.items():
            peer, _, server = ref.partition(".")
            endpoints[key] = self.endpoints.get(peer, {}).get(server, [])
        return {
            "deployment": self.spec.name, "namespace": self.namespace, "actor": name, "replica": index,
            "replicas": actor.replicas, "config_hash": digest, "code_hash": self.code.get(name, ""),
            "restarts": actor.restarts,
            "command": list(actor.command) if actor.command else None,
            "servers": [dict(s.model_dump(mode="json", exclude={"when"}), port=s.port + index if s.port else 0)
                        for s in actor.servers],
            "endpoints": endpoints,
            "buffers": {b: dict(buf.model_dump(mode="json"), link_target=f"{name}.{b}" in targets)
                        for b, buf in actor.buffers.items()},
            "links": self._links_of(name),
            "sys_path": [str(self.base_dir), os.getcwd()],
            "module": actor.class_.partition(":")[0] if actor.class_ else None,
            # Auth tokens travel as constructor arguments, not runtime_env: Ray's runtime-env
            # agent logs env_vars, and a secret must never reach a log.
            "secrets": {s.auth.token_env: os.environ[s.auth.token_env] for s in actor.servers
                        if s.auth and s.auth.token_env in os.environ and s.auth.token_env not in actor.env},
            "env": self.replica_env(name, index, endpoints),
        }

    def runtime_env(self, name: str) -> dict:
        """The same for every replica of an actor (and for every actor without `env`), so Ray
        sets it up once and can reuse its workers; per-replica variables travel in the config."""
        actor = self.spec.actors[name]
        env = dict(self.spec.ray.runtime_env or {})
        env_vars = dict(env.get("env_vars") or {})
        env_vars.update(actor.env)
        if name in self.by_reference:  # its module did not travel by value: the workers import it
            paths = [str(self.base_dir), os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if env_vars:
            env["env_vars"] = env_vars
        if self.shipped:  # a cluster that is not this machine: the spec's folder and oobspec travel
            env.setdefault("working_dir", self.shipped["working_dir"])
            env["py_modules"] = list(env.get("py_modules") or []) + self.shipped["py_modules"]
        # No runtime_env at all when none is needed: Ray then starts the actor in a plain worker.
        return env

    def replica_env(self, name: str, index: int, endpoints: dict) -> dict[str, str]:
        """OOB_* variables, set in the replica's environment before the user's __init__ runs."""
        out = {"OOB_REPLICA": str(index), "OOB_REPLICAS": str(self.spec.actors[name].replicas),
               "OOB_DEPLOYMENT": self.spec.name}
        for key, urls in endpoints.items():
            out[f"OOB_{env_key(key)}_URL"] = urls[0] if urls else ""
            out[f"OOB_{env_key(key)}_URLS"] = ",".join(urls)
        return out

    def actor_class(self, name: str):
        import ray
        from ..imports import import_object, import_path, ship_by_value
        from .actor import make_actor_class, make_command_class
        actor = self.spec.actors[name]
        if actor.command is not None:
            return ray.remote(make_command_class())
        with import_path(self.base_dir):
            try:
                user_cls = import_object(actor.class_)
            except ImportError as exc:
                raise ApplyError(f"actor {name}: class '{actor.class_}' does not import: {exc}") from None
        actor_cls = make_actor_class(user_cls)
        # The user's module travels inside the pickled class: workers need no PYTHONPATH (and
        # no runtime_env), and a handle taken in any process has the real method signatures.
        if not ship_by_value(actor_cls):
            self.by_reference.add(name)
            self.progress(f"actor {name}: its module cannot be pickled by value; the workers import it "
                          "from the spec's folder (handles in other processes need it importable too)")
        return ray.remote(actor_cls)

    def options(self, name: str, index: int, cfg: dict) -> dict:
        actor = self.spec.actors[name]
        res = actor.resources
        opts = {"name": f"{name}-{index}", "namespace": self.namespace, "max_restarts": actor.restarts,
                "runtime_env": self.runtime_env(name), "max_concurrency": 1000}
        # Named actors that are not detached die with their last handle; the embedded mode
        # tears them down itself, and its Ray goes with the foreground process anyway.
        opts["lifetime"] = "detached"
        if res.cpus is not None:
            opts["num_cpus"] = res.cpus
        if res.gpus:
            opts["num_gpus"] = res.gpus
        if res.memory is not None:
            opts["memory"] = memory_bytes(res.memory)
        if res.custom:
            opts["resources"] = dict(res.custom)
        if self.placement is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            bundle = self.bundle_index[(name, index)]
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle)
            opts.setdefault("num_cpus", 0.01)
        return opts

    # --- placement ---

    def bundles(self) -> list[dict]:
        out, self.bundle_index = [], {}
        for name, actor in self.spec.actors.items():
            for i in range(actor.replicas):
                res = actor.resources
                bundle = {"CPU": res.cpus or 0.01}
                if res.gpus:
                    bundle["GPU"] = res.gpus
                if res.memory is not None:
                    bundle["memory"] = memory_bytes(res.memory)
                bundle.update(res.custom)
                self.bundle_index[(name, i)] = len(out)
                out.append(bundle)
        return out

    def ensure_placement(self) -> None:
        from ray.util.placement_group import get_placement_group, placement_group
        bundles = self.bundles()
        digest = hashlib.sha256(json.dumps([self.spec.ray.placement, bundles], sort_keys=True).encode()).hexdigest()[:10]
        pg_name = f"_oob-{self.spec.name}-{digest}"
        try:
            self.placement = get_placement_group(pg_name)
        except ValueError:
            self.progress(f"placement group {self.spec.ray.placement} for {len(bundles)} replicas")
            self.placement = placement_group(bundles, strategy=self.spec.ray.placement, name=pg_name,
                                             lifetime="detached" if self.detached else None)
        if not self.placement.wait(timeout_seconds=60):
            raise ApplyError(f"placement group {self.spec.ray.placement} for {len(bundles)} replicas cannot be "
                             "placed on this cluster (not enough nodes or resources)")
        old = cluster.get_meta(self.namespace, "placement")
        if old and old["name"] != pg_name:
            cluster.remove_placement(old["name"])
        cluster.put_meta(self.namespace, "placement", {"name": pg_name})

    # --- execution ---

    def run(self, timeout: float = 120.0) -> dict[str, dict[str, list[str]]]:
        if cluster.is_client():
            from .remote import package_env
            self.shipped = package_env(self.base_dir)
            self.progress(f"uploaded {self.base_dir} and oobspec to the cluster")
        plan, observed, self.code = plan_on_cluster(self.spec, self.base_dir)
        for row in observed.replicas:
            if row.alive:
                self.info[(row.actor, row.replica)] = {"endpoints": row.endpoints, "node_id": row.node_id,
                                                       "gpu_uuid": row.gpu_uuid}
        doomed = [f"{a.actor}-{i}" for a in plan.actions if a.kind in ("delete", "replace") for i in a.replicas]
        for action in plan.changes:
            self.progress(f"{action.kind} {action.actor} [{','.join(map(str, action.replicas))}]: {action.reason}")
        if doomed:
            cluster.kill(doomed, self.namespace)
            for name in doomed:
                self.info.pop(cluster.split_name(name), None)
        todo = {(a.actor, i) for a in plan.actions if a.kind in ("create", "replace") for i in a.replicas}
        for name in self.spec.actors:
            self._collect_endpoints(name)
        created: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            if self.spec.ray.placement:
                self.ensure_placement()
            for wave in plan.waves:
                refs = {}
                for name in wave:
                    indices = sorted(i for (a, i) in todo if a == name)
                    if not indices:
                        continue
                    cls = self.actor_class(name)
                    digest = config_hash(self.spec, name)
                    for i in indices:
                        cfg = self.replica_config(name, i, digest)
                        created.append(f"{name}-{i}")  # before .remote(): an interrupt there still cleans it
                        handle = cls.options(**self.options(name, i, cfg)).remote(cfg, *self.spec.actors[name].args,
                                                                                     **self.spec.actors[name].kwargs)
                        refs[(name, i)] = handle._oob_ready.remote(timeout)
                self._wait_ready(refs, deadline, timeout)
                for name in wave:
                    self._collect_endpoints(name)
            setup_links(self.spec, self.namespace, self.info, self.progress)
            self.update_in_place(set(created))
        except BaseException:
            with handling_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the clean-up short
                if created:
                    self.progress(f"cleaning up {len(created)} replica(s) started by this apply")
                    cluster.kill(created, self.namespace, timeout=2.0)
            raise
        cluster.put_meta(self.namespace, "spec", self.spec.model_dump(mode="json", by_alias=True))
        return self.endpoints

    def _wait_ready(self, refs: dict, deadline: float, timeout: float) -> None:
        """Wait for the replicas' `_oob_ready`, in short steps so Ctrl-C is seen at once."""
        import ray
        pending = {ref: key for key, ref in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(0.25, max(0.0, deadline - time.monotonic())))
            if not ready:
                if time.monotonic() >= deadline:
                    raise self._not_ready(sorted(pending.values()), timeout)
                continue
            key = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except Exception as exc:
                raise ApplyError(f"actor {key[0]}-{key[1]} failed to start: {_cause(exc)}", self._log_tail(key)) from None
            self.info[key] = info
            # What a later apply needs of this replica even while it is too busy to answer.
            cluster.put_meta(self.namespace, f"replica/{key[0]}-{key[1]}",
                             {k: info.get(k) for k in ("config_hash", "code_hash", "endpoints", "gpu_uuid")})
            self.progress(f"ready {key[0]}-{key[1]} (pid {info['pid']})"
                          + "".join(f"  {s}: {u}" for s, u in info["endpoints"].items()))

    def update_in_place(self, created: set[str]) -> None:
        """Replicas kept from before learn their actor's replica count and their peers'
        endpoints as they are now (scaling changes both without restarting anyone). A busy
        replica is not waited for long."""
        import ray
        refs = {}
        for (name, i) in sorted(self.info):
            if f"{name}-{i}" in created or name not in self.spec.actors or i >= self.spec.actors[name].replicas:
                continue
            actor = self.spec.actors[name]
            endpoints = {key: self.endpoints.get(ref.partition(".")[0], {}).get(ref.partition(".")[2], [])
                         for key, ref in actor.connect.items()}
            try:
                refs[cluster.handle(f"{name}-{i}", self.namespace)._oob_update.remote(actor.replicas, endpoints)] = \
                    f"{name}-{i}"
            except ValueError:  # gone meanwhile
                continue
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=5.0) if refs else ([], [])
        changed = [refs[r] for r in done if _quiet_get(r)]
        if changed:
            self.progress(f"updated in place: {', '.join(changed)} (replica count or peers' endpoints)")

    def _not_ready(self, keys: list[tuple[str, int]], timeout: float) -> ApplyError:
        """Name every replica still pending and what it was doing, from Ray's own records."""
        records = state.actor_records(self.namespace)
        doing = []
        for actor, i in keys:
            record = records.get(f"{actor}-{i}")
            if record is None or (record.state == "PENDING_CREATION" and not record.pid):
                what = f"waiting for resources ({self.resources_text(actor)})"
            elif record.state == "PENDING_CREATION":
                what = f"still in __init__ (pid {record.pid})"
            elif record.state == "ALIVE":
                what = "servers not accepting connections yet"
            else:
                what = record.words
            doing.append(f"{actor}-{i} {what}")
        return ApplyError(f"not ready after {timeout:g}s: " + "; ".join(doing), self._log_tail(keys[0]))

    def resources_text(self, name: str) -> str:
        res = self.spec.actors[name].resources
        parts = [f"{res.cpus:g} CPU" if res.cpus else "", f"{res.gpus:g} GPU" if res.gpus else "",
                 f"{res.memory} memory" if res.memory else ""] + [f"{v:g} {k}" for k, v in res.custom.items()]
        return ", ".join(p for p in parts if p) or "a worker slot"

    def _log_tail(self, key: tuple[str, int], lines: int = 20) -> str:
        """The replica's last output, from its worker's log files (it may be stuck in __init__
        or dead), else asked of the replica itself."""
        import ray
        record = state.actor_records(self.namespace).get(f"{key[0]}-{key[1]}")
        text = state.tail(record, lines) if record else ""
        if text:
            return text
        try:
            h = cluster.handle(f"{key[0]}-{key[1]}", self.namespace)
            chunks = ray.get(h._oob_read_logs.remote([0, 0]), timeout=5)
            text = "".join(t for _o, t in chunks)
        except Exception:  # the replica is gone: nothing to show
            text = ""
        return "\n".join(text.splitlines()[-lines:])

    def _collect_endpoints(self, name: str) -> None:
        actor = self.spec.actors[name]
        servers: dict[str, list[str]] = {s.name: [] for s in actor.servers}
        for i in range(actor.replicas):
            info = self.info.get((name, i))
            for s in actor.servers:
                if info and s.name in info["endpoints"]:
                    servers[s.name].append(info["endpoints"][s.name])
        self.endpoints[name] = servers

def _quiet_get(ref) -> bool:
    import ray
    try:
        return bool(ray.get(ref, timeout=0))
    except Exception:
        return False


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


def plan_on_cluster(spec: Spec, base_dir: Path) -> tuple[Plan, Observed, dict[str, str]]:
    """The plan against the connected cluster, as `oob plan` shows it and apply carries it out:
    observed replicas, node count, code versions."""
    import ray
    observed = cluster.observe(spec.namespace)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    code = code_versions(spec, base_dir)
    single = spec.ray.placement == "STRICT_PACK" or len(nodes) == 1
    return make_plan(spec, observed, single_node=single, code=code), observed, code


def code_versions(spec: Spec, base_dir: Path) -> dict[str, str]:
    """Digest of each class actor's source, as the plan compares it with the running replicas'."""
    from ..code import code_digest
    return {name: code_digest(a.class_, base_dir) for name, a in spec.actors.items() if a.class_}


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- entry points ---------------------------------------------------------------------------


def start_embedded(namespace: str, log_to_driver: bool = True) -> str:
    # A new local Ray turns token auth on when the mode is unset (and says so); say it ourselves.
    if "RAY_AUTH_MODE" not in os.environ:
        cluster.token_mode()
    import ray
    ray.init(address="local", namespace=namespace, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=log_to_driver, configure_logging=True)
    return ray.get_runtime_context().gcs_address


def preflight(spec: Spec, address: str | None = None) -> list:
    """Every lint check, before anything touches the cluster: errors refuse the apply with the
    same lines `oob lint` prints; the warnings are returned."""
    from ..api import lint
    from ..errors import SpecError
    found = lint(spec, address=address)
    if any(d.is_error for d in found):
        raise SpecError(found)  # the warnings too: the same lines as `oob lint`
    return found


def apply_with_errors(spec: Spec, progress: Progress, timeout: float, detached: bool) -> dict:
    try:
        return Applier(spec, progress, detached).run(timeout)
    except ApplyError as exc:
        if exc.log_tail:
            print(f"--- last lines of the actor's log ---\n{exc.log_tail}\n---", file=sys.stderr)
        raise


__all__ = ["Applier", "ClusterError", "apply_with_errors", "preflight", "start_embedded"]
