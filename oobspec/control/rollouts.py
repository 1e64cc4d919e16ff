"""Day two on a running deployment: `oob history`, `rollback`, `restart` and `diff`.

A rollback is an apply of a recorded revision (its spec, classes and code, whatever the spec's
folder holds now, or whether it still exists) with `--atomic`; a restart is an apply of the
current revision that replaces every replica (or one actor's) all the same. Both go through the
executor like any apply: rolling where the actor can roll, surge-first, and recorded in the
history. Nothing here prints: the CLI does.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from ..contract import namespace_of
from ..errors import ClusterError, OobError
from ..models import Spec
from . import history
from .apply import Applier, code_versions
from .cluster import session

Progress = Callable[[str], None]


def history_of(name: str, address: str | None) -> dict:
    """Every recorded revision, oldest first, and which is current."""
    with session(name, address):
        found, current = history.load(namespace_of(name))
    if not found.entries:
        raise ClusterError(f"no deployment '{name}' in this cluster")
    return {"name": name, "current": current,
            "revisions": [dict(e.to_dict(), current=e.number == current) for e in found.entries]}


def rollback(name: str, number: int | None, address: str | None, progress: Progress,
             timeout: float = 120.0) -> dict[str, dict[str, list[str]]]:
    """Deploy revision `number` again (None: the one before the current one); the endpoints."""
    namespace = namespace_of(name)
    with session(name, address):
        found, current = history.load(namespace)
        if not found.entries:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        entry = found.previous(current) if number is None else found.entry(number)
        if entry is None:
            listed = ", ".join(str(e.number) for e in found.entries)
            raise OobError(f"deployment '{name}' has no revision {number} to roll back to (recorded: {listed})"
                           if number is not None else
                           f"deployment '{name}' has no earlier complete revision to roll back to")
        revision = history.revision(namespace, entry.digest)
        if revision is None:
            raise OobError(f"revision {entry.number} of '{name}' is no longer recorded in the cluster")
        progress(f"rolling back {name} to revision {entry.number} ({entry.digest})")
        return Applier.of_revision(revision, progress, f"rollback to {entry.number}").run(timeout, atomic=True)


def restart(name: str, actor: str | None, address: str | None, progress: Progress,
            timeout: float = 120.0) -> dict[str, dict[str, list[str]]]:
    """Replace every replica of the current revision (or of one actor), one at a time."""
    namespace = namespace_of(name)
    with session(name, address):
        revision = history.current_revision(namespace)
        if revision is None:
            raise ClusterError(f"no deployment '{name}' in this cluster (no complete apply is recorded)")
        spec = revision.spec_model()
        if actor is not None and actor not in spec.actors:
            raise OobError(f"deployment '{name}' has no actor '{actor}' (actors: {', '.join(spec.actors)})")
        applier = Applier.of_revision(revision, progress, f"restart {actor}" if actor else "restart")
        applier.restart = {actor} if actor else set(spec.actors)
        return applier.run(timeout)


def diff(spec: Spec, address: str | None) -> str:
    """What applying `spec` changes against the running revision: a unified diff of the rendered
    specs and a line per actor whose code changed ("" when nothing does)."""
    with session(spec.name, address, spec.ray.address, required=False) as found:
        running = history.current_revision(spec.namespace) if found else None
    base = spec._source.base_dir if spec._source else Path.cwd()
    return diff_text(spec.name, running.spec if running else None, running.code if running else {},
                     spec.record(), code_versions(spec, base))


def diff_text(name: str, old: dict | None, old_code: dict[str, str], new: dict, new_code: dict[str, str]) -> str:
    """Both specs as YAML of the same normal form (validated, then what the cluster keeps), so a
    spec that renders the same gives no diff; None: nothing deployed, everything is new."""
    from ..render import to_yaml
    before = to_yaml(Spec.model_validate(old).record()) if old is not None else ""
    after = to_yaml(Spec.model_validate(new).record())
    lines = list(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                      f"{name} (running)" if old is not None else "/dev/null", f"{name} (spec)"))
    lines += [f"code changed: actor {a}\n" for a in sorted(set(old_code) & set(new_code)) if old_code[a] != new_code[a]]
    return "".join(lines)


__all__ = ["diff", "diff_text", "history_of", "restart", "rollback"]
