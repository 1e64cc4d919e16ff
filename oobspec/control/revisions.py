"""Revisions: what an apply deploys, recorded in the cluster before any replica starts, so a
replica can be started again at the version it ran (a failed update restores it, `--atomic`
returns the whole deployment) even after its spec file or its code changed on disk.

A revision is the rendered spec, the spec's folder, each actor's code digest and each class
pickled by value (cloudpickle, as Ray ships it), under a digest of spec and code. The cluster
keeps the newest `KEEP` of them; `current` names the last one that applied completely.

The index (`revisions`) also numbers every apply, rollback and restart of the deployment, as
`oob history` lists them (`History`): 1, 2, 3... never reused, even once old ones are dropped.
An index an older oobspec wrote (digests only) reads as revisions 1..n, oldest first.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..models import Spec

KEEP = 10


@dataclass
class Revision:
    spec: dict  # the rendered spec, as `Spec.record()` writes it
    base_dir: str
    code: dict[str, str]  # actor -> digest of its class's source
    classes: dict[str, str] = field(default_factory=dict)  # actor -> its class, cloudpickled, base64
    time: float = 0.0

    @classmethod
    def of(cls, spec: Spec, base_dir: Path, code: dict[str, str], classes: dict[str, bytes]) -> "Revision":
        return cls(spec.record(), str(base_dir), dict(code),
                   {a: base64.b64encode(b).decode() for a, b in classes.items()}, time.time())

    @property
    def digest(self) -> str:
        text = json.dumps([self.spec, self.code], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"spec": self.spec, "base_dir": self.base_dir, "code": self.code, "classes": self.classes,
                "time": self.time}

    @classmethod
    def from_dict(cls, data: dict) -> "Revision":
        return cls(data["spec"], data["base_dir"], dict(data["code"]), dict(data["classes"]), float(data["time"]))

    def spec_model(self) -> Spec:
        return Spec.model_validate(self.spec)

    def user_class(self, actor: str) -> type | None:
        """The actor's class as this revision ran it (None: it travelled by reference)."""
        if actor not in self.classes:
            return None
        from ray import cloudpickle
        return cloudpickle.loads(base64.b64decode(self.classes[actor]))

    def builder(self, progress: Callable[[str], None]):
        """A Builder that starts replicas of this revision: its spec, its code."""
        from .replicas import Builder
        builder = Builder(self.spec_model(), progress, base_dir=Path(self.base_dir))
        builder.code = dict(self.code)
        builder.class_source = self.user_class
        return builder


@dataclass
class Entry:
    """One apply (or rollback, or restart) as `oob history` lists it."""

    number: int
    digest: str
    time: float
    by: str = ""  # user@host
    result: str = "pending"  # pending (still running, or cut short) | ok | failed
    message: str = ""  # a failed one: the one-line error
    note: str = ""  # "rollback to 2", "restart web"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Entry":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class History:
    """The index of a deployment's revisions: entries oldest first, the last number given."""

    entries: list[Entry] = field(default_factory=list)
    last: int = 0

    @classmethod
    def from_index(cls, data: dict | None, time_of: Callable[[str], float] = lambda _d: 0.0) -> "History":
        """`data`: the stored index (None: nothing applied yet). `time_of(digest)`: when an
        index without entries (an older oobspec's) recorded that revision."""
        if not data:
            return cls()
        if "entries" in data:
            return cls([Entry.from_dict(e) for e in data["entries"]], int(data["last"]))
        old = list(reversed(data["digests"]))  # newest first there
        return cls([Entry(n, d, time_of(d), result="ok") for n, d in enumerate(old, 1)], len(old))

    def add(self, digest: str, when: float, by: str, note: str = "") -> Entry:
        """A new entry, numbered after every earlier one; only the newest `KEEP` stay."""
        self.last += 1
        entry = Entry(self.last, digest, when, by, note=note)
        self.entries = (self.entries + [entry])[-KEEP:]
        return entry

    def entry(self, number: int) -> Entry | None:
        return next((e for e in self.entries if e.number == number), None)

    def digests(self, keep: str | None = None) -> list[str]:
        """The revisions to keep, newest first: every listed entry's, and `keep` (the current
        one, even after `KEEP` failed applies)."""
        out = [e.digest for e in reversed(self.entries)] + ([keep] if keep else [])
        return list(dict.fromkeys(out))

    def current(self, pointer: dict | None) -> int | None:
        """The number of the current entry, from the stored `current` pointer (one an older
        oobspec wrote names only a digest: its newest complete entry)."""
        if not pointer:
            return None
        if "revision" in pointer:
            return int(pointer["revision"])
        found = [e.number for e in self.entries if e.digest == pointer["digest"] and e.result != "failed"]
        return found[-1] if found else None

    def previous(self, current: int | None) -> Entry | None:
        """What `oob rollback` returns to by default: the newest complete entry before the
        current one that deployed something else."""
        now = self.entry(current) if current is not None else None
        for e in reversed(self.entries):
            if (current is None or e.number < current) and e.result == "ok" and (now is None or e.digest != now.digest):
                return e
        return None

    def to_index(self, keep: str | None = None) -> dict:
        return {"digests": self.digests(keep), "entries": [e.to_dict() for e in self.entries], "last": self.last}


__all__ = ["KEEP", "Entry", "History", "Revision"]
