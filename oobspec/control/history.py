"""The revision history in the cluster's KV: every apply (rollback, restart) recorded with its
number, time, user@host, digest and result, beside the revisions themselves (revisions.py).

    revision/<digest>  a Revision (spec, folder, code digests, classes)
    revisions          the index: digests kept (newest first), entries, the last number given
    current            the revision the last complete apply deployed, and its number
"""
from __future__ import annotations

import getpass
import logging
import os
import socket
import time

from . import cluster
from .revisions import History, Revision

log = logging.getLogger("oobspec")


def by() -> str:
    """user@host, as the history names who applied."""
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a container's)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def load(namespace: str) -> tuple[History, int | None]:
    """The history and the number of the current entry (None: no apply completed)."""
    history = History.from_index(cluster.get_meta(namespace, "revisions"), lambda d: _time_of(namespace, d))
    return history, history.current(cluster.get_meta(namespace, "current"))


def current_number(namespace: str) -> int | None:
    return load(namespace)[1]


def current_revision(namespace: str) -> Revision | None:
    """The revision the last complete apply deployed (None: none)."""
    pointer = cluster.get_meta(namespace, "current")
    return revision(namespace, pointer["digest"]) if pointer else None


def revision(namespace: str, digest: str) -> Revision | None:
    found = cluster.get_meta(namespace, f"revision/{digest}")
    return Revision.from_dict(found) if found else None


def begin(namespace: str, revision: Revision, note: str = "") -> int:
    """Record the revision and a pending entry for the apply that deploys it; returns its number.
    Revisions no entry (nor `current`) names any more are dropped."""
    cluster.put_meta(namespace, f"revision/{revision.digest}", revision.to_dict())
    raw = cluster.get_meta(namespace, "revisions")
    history = History.from_index(raw, lambda d: _time_of(namespace, d))
    entry = history.add(revision.digest, time.time(), by(), note)
    keep = _current_digest(namespace)
    for old in set(raw["digests"] if raw else ()) - set(history.digests(keep)):
        cluster.del_meta(namespace, f"revision/{old}")
    cluster.put_meta(namespace, "revisions", history.to_index(keep))
    return entry.number


def finish(namespace: str, number: int, failure: str | None, quiet: bool = False) -> None:
    """The entry's result: ok (failure None) or failed, with the one-line message. quiet: the
    apply was cut short, and recording that must not raise."""
    try:
        history = History.from_index(cluster.get_meta(namespace, "revisions"))
        entry = history.entry(number)
        if entry is None:
            return
        entry.result, entry.message = ("ok", "") if failure is None else ("failed", failure)
        cluster.put_meta(namespace, "revisions", history.to_index(_current_digest(namespace)))
    except Exception:
        if not quiet:
            raise
        log.debug("recording the result of revision %s", number, exc_info=True)


def set_current(namespace: str, revision: Revision, number: int | None) -> None:
    pointer = {"digest": revision.digest}
    if number is not None:
        pointer["revision"] = number
    cluster.put_meta(namespace, "current", pointer)


def _current_digest(namespace: str) -> str | None:
    pointer = cluster.get_meta(namespace, "current")
    return pointer["digest"] if pointer else None


def _time_of(namespace: str, digest: str) -> float:
    found = cluster.get_meta(namespace, f"revision/{digest}")
    return float(found["time"]) if found else 0.0


__all__ = ["begin", "by", "current_number", "current_revision", "finish", "load", "revision", "set_current"]
