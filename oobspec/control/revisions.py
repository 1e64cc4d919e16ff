"""Revisions: what an apply deploys, recorded in the cluster before any replica starts, so a
replica can be started again at the version it ran (a failed update restores it, `--atomic`
returns the whole deployment) even after its spec file or its code changed on disk.

A revision is the rendered spec, the spec's folder, each actor's code digest and each class
pickled by value (cloudpickle, as Ray ships it), under a digest of spec and code. The cluster
keeps the newest `KEEP` of them; `current` names the last one that applied completely.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
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


__all__ = ["KEEP", "Revision"]
