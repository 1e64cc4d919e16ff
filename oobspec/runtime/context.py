"""`oobspec.context()`: what a replica knows about itself, its peers and its buffers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import OobError


@dataclass
class Context:
    deployment: str
    actor: str
    replica: int
    replicas: int
    endpoints: dict[str, list[str]] = field(default_factory=dict)  # connect key -> one URL per peer replica
    buffers: dict[str, Any] = field(default_factory=dict)  # name -> numpy / cupy array
    versions: dict[str, int] = field(default_factory=dict)  # buffer -> version of the last push received
    _links: Any = None  # runtime.links.Links, set by the actor
    _owners: dict[str, Any] = field(default_factory=dict)  # buffer -> its allocation (closed on stop)

    def update(self, replicas: int, endpoints: dict[str, list[str]]) -> bool:
        """A re-apply scaled this actor or its peers: the live view changes; True if it did."""
        endpoints = {k: list(v) for k, v in endpoints.items()}
        changed = replicas != self.replicas or endpoints != self.endpoints
        self.replicas, self.endpoints = replicas, endpoints
        return changed

    async def push(self, link: str) -> dict:
        """Copy this link's source buffer into every replica of every target; returns when all are done."""
        if self._links is None:
            raise OobError("this actor has no links")
        return await self._links.push(link)


def env_key(key: str) -> str:
    """A connect key as its environment variables spell it: OOB_<KEY>_URL(S)."""
    return key.upper().replace("-", "_")


_current: Context | None = None


def set_current(ctx: Context | None) -> None:
    global _current
    _current = ctx


def current() -> Context:
    if _current is None:
        raise OobError("oobspec.context() is only available inside an actor started by oobspec")
    return _current
