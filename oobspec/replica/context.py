"""`oobspec.context()`: what a replica knows about itself, its peers and its buffers."""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import OobError
from .snapshot import Reading, torch_view


class _Live(Mapping):
    """A read-only mapping computed on each lookup: the current slot, the current version."""

    def __init__(self, items: Callable[[], dict], get: Callable[[Any], Any]):
        self._items, self._get = items, get

    def __getitem__(self, name: str):
        items = self._items()
        if name not in items:
            raise KeyError(name)
        return self._get(items[name])

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(dict(self))


@dataclass
class Context:
    deployment: str
    actor: str
    replica: int
    replicas: int
    endpoints: dict[str, list[str]] = field(default_factory=dict)  # connect key -> one URL per peer replica
    _links: Any = None  # runtime.links.Links, set by the actor
    _owners: dict[str, Any] = field(default_factory=dict)  # buffer -> its Allocation (closed on stop)

    @property
    def buffers(self) -> Mapping[str, Any]:
        """name -> numpy / cupy array; a `buffering: double` target's is its complete current slot."""
        return _Live(lambda: self._owners, lambda owner: owner.array)

    @property
    def versions(self) -> Mapping[str, int]:
        """Link target buffer -> version of the last push it received, live from its control block."""
        return _Live(lambda: {n: o for n, o in self._owners.items() if o.inbox is not None},
                     lambda owner: owner.inbox.version)

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

    async def updated(self, buffer: str, after: int | None = None, timeout: float | None = None) -> int:
        """Wait for a push into `buffer` newer than version `after` (default: the current one) and
        return its version; at once if there is one. Sleeps until the source rings (no polling).
        TimeoutError after `timeout` seconds."""
        inbox = self._owner(buffer).inbox
        if inbox is None:
            raise OobError(f"buffer '{buffer}' of {self.actor} is not a link target: nothing pushes into it")
        after = inbox.version if after is None else after
        try:
            return await inbox.wait(after, timeout)
        except asyncio.TimeoutError:
            raise LinkTimeout(f"no push into '{buffer}' after version {after} within {timeout} s") from None

    def reading(self, buffer: str, timeout: float | None = None):
        """`async with ctx.reading(b) as snap:` snap.version, snap.array, snap.views, snap.tensors():
        a complete version no push overwrites until the block ends (on a GPU: until the work the
        block queued is done). Waits for a push in progress (one slot) at most `timeout` seconds
        (default: the link's), then OobError."""
        return Reading(self._owner(buffer), buffer, timeout)

    def views(self, buffer: str) -> dict[str, Any]:
        """The named parts of a `layout:` buffer as numpy / cupy arrays (bfloat16 as uint16 bits)."""
        owner = self._owner(buffer)
        if not owner.buffer.layout:
            raise OobError(f"buffer '{buffer}' has no layout: use buffers['{buffer}'] or tensor('{buffer}')")
        return owner.views()

    def tensor(self, buffer: str):
        """A torch view of the buffer (cpu or cuda; shared memory, no copy; a layout as flat bytes)."""
        owner = self._owner(buffer)
        return torch_view(owner.array, None if owner.buffer.layout else owner.buffer.dtype)

    def tensors(self, buffer: str) -> dict[str, Any]:
        """The named parts of a `layout:` buffer as torch tensors (bfloat16 included), no copy."""
        owner = self._owner(buffer)
        if not owner.buffer.layout:
            raise OobError(f"buffer '{buffer}' has no layout: use tensor('{buffer}')")
        return {name: torch_view(view, owner.buffer.layout[name].dtype) for name, view in owner.views().items()}

    def _owner(self, buffer: str):
        if buffer not in self._owners:
            known = ", ".join(self._owners) or "none"
            raise OobError(f"actor {self.actor} has no buffer '{buffer}' (buffers: {known})")
        return self._owners[buffer]


class LinkTimeout(OobError, TimeoutError):
    """`ctx.updated(..., timeout=...)` saw no new version in time."""


def env_key(key: str) -> str:
    """A connect key as its environment variables spell it: OOB_<KEY>_URL(S)."""
    return key.upper().replace("-", "_")


def endpoint_env(endpoints: dict[str, list[str]]) -> dict[str, str]:
    """OOB_<KEY>_URL (the first) and OOB_<KEY>_URLS (all, comma-separated) of each connect key."""
    out = {}
    for key, urls in endpoints.items():
        out[f"OOB_{env_key(key)}_URL"] = urls[0] if urls else ""
        out[f"OOB_{env_key(key)}_URLS"] = ",".join(urls)
    return out


_current: Context | None = None


def set_current(ctx: Context | None) -> None:
    global _current
    _current = ctx


def current() -> Context:
    if _current is None:
        raise OobError("oobspec.context() is only available inside an actor started by oobspec")
    return _current
