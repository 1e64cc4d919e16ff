"""A link source's side inside a replica (replica 0 of the link's `from` actor): its targets,
mapped once (direct, on this node) or reached by Ray call, and the push."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..contract import Descriptor, PushResult, WiredTarget
from ..errors import OobError
from ..transports.base import TransportError, callers_work
from ..transports.inbox import SlotBusy, TargetGone
from .metrics import off

log = logging.getLogger(__name__)

INLINE_BYTES = 8 << 20  # pushes up to this size copy on the event loop; bigger ones in a thread


@dataclass
class Target:
    """One target replica as the source sees it."""

    key: str  # its replica name
    handle: Any  # its Ray actor handle
    transport: str
    descriptor: Descriptor | None
    direct: bool = False  # on this node: written by the source, no Ray call
    sender: Any = None  # direct: shm.Sender / cuda_ipc.Writer; else the transport's Sender (None for nccl)
    outbox: Any = None  # direct: its control block and doorbell

    def close(self) -> None:
        for part in (self.sender, self.outbox):
            if part is not None:
                part.close()
        self.sender = self.outbox = None


class LinkSource:
    def __init__(self, book, groups):
        self.book, self.groups = book, groups
        self.targets: dict[str, list[Target]] = {}  # link -> its targets
        self.version: dict[str, int] = {}
        self.last: dict[str, PushResult] = {}
        self._stream = None  # cupy stream of the direct GPU copies
        self._lock = asyncio.Lock()
        self.metrics = off()  # the replica's, once it has them

    async def connect(self, link: str, targets: list[tuple[WiredTarget, Any]]) -> None:
        """Each target as apply wired it, with its Ray handle; idempotent."""
        async with self._lock:  # never while a push of this replica copies
            self._connect(link, targets)
        await self._resume(link)

    async def _resume(self, link: str) -> None:
        """A new source (replaced, or restarted by Ray) goes on from the newest version its targets
        hold, so their `ctx.updated(after=v)` keeps meaning "newer than v"."""
        if self.version.get(link):
            return
        targets = self.targets[link]
        found = [t.outbox.version for t in targets if t.outbox is not None]
        others = [t for t in targets if not t.direct]
        if others:
            got = await asyncio.gather(*(t.handle._oob_link_version.remote(link) for t in others),
                                       return_exceptions=True)
            found += [v for v in got if isinstance(v, int)]
        self.version[link] = max(found, default=0)

    def _connect(self, link: str, targets: list[tuple[WiredTarget, Any]]) -> None:
        spec = self.book.role(link)
        source = self.book.owner(spec.source_buffer).array
        old = {t.key: t for t in self.targets.get(link, [])}
        fresh = []
        for given, handle in targets:
            target = Target(given.key, handle, given.transport, given.descriptor)
            kept = old.pop(target.key, None)
            if kept and (kept.transport, kept.descriptor) == (target.transport, target.descriptor) \
                    and target.transport != "nccl":
                kept.handle = target.handle
                fresh.append(kept)
                continue
            if kept:
                kept.close()
            if target.transport == "shm" or (target.transport == "cuda_ipc"
                                             and target.descriptor.device_uuid == self.book.gpu_uuid()):
                target.direct = True
                self._open(target, source)
            elif target.transport != "nccl":
                from ..transports import get_transport
                target.sender = get_transport(target.transport).Sender(source, target.descriptor.wire())
            fresh.append(target)
        for gone in old.values():
            gone.close()
        self.targets[link] = fresh
        self.version.setdefault(link, 0)

    def _open(self, target: Target, source) -> None:
        """Map a direct target's memory and control block, by its segment's name."""
        from ..transports import get_transport
        from ..transports.inbox import Outbox
        target.close()
        d = target.descriptor
        outbox = Outbox(d.segment)
        try:
            if target.transport == "shm":
                target.sender = get_transport("shm").Sender(source, d.wire())
            elif outbox.pid == os.getpid():  # a link between two buffers of this replica
                local = self.book.owner(self._local_target(d.segment))
                target.sender = get_transport("cuda_ipc").Writer(source, d.wire(), base=local.slot(0).data.ptr)
            else:
                target.sender = get_transport("cuda_ipc").Writer(source, d.wire(), outbox.handle)
        except BaseException:
            outbox.close()
            raise
        target.outbox = outbox

    async def _rewire(self, link: str) -> bool:
        """A source that Ray restarted: connect from what apply recorded when it wired the link
        (nccl excepted: its communicator needs every rank, so a re-apply)."""
        try:
            import ray

            from .. import ray_private
            raw = await asyncio.to_thread(ray_private.kv_get, f"{self.book.cfg.namespace}/links/{link}")
            recorded = [WiredTarget.from_record(t) for t in json.loads(raw)] if raw else []
            if not recorded or any(t.transport == "nccl" for t in recorded):
                return False
            handles = await asyncio.to_thread(
                lambda: [ray.get_actor(t.key, namespace=self.book.cfg.namespace) for t in recorded])
        except Exception as exc:  # not on Ray, or a target is gone: the caller says how to fix it
            log.debug("cannot re-wire link %s: %s", link, exc)
            return False
        async with self._lock:
            if link not in self.targets:
                self._connect(link, list(zip(recorded, handles)))
        await self._resume(link)
        log.info("link %s: wired again from apply's record (this replica was restarted)", link)
        return True

    def _local_target(self, segment: str) -> str:
        return next(name for name, owner in self.book.ctx._owners.items() if owner.segment == segment)

    async def push(self, link: str) -> dict:
        spec = self.book.role(link)
        if spec.role != "source" or self.book.cfg.replica != 0:
            raise OobError(f"link '{link}' pushes from replica 0 of {spec.source.actor}, not from {self.book.cfg.name}")
        if link not in self.targets and not await self._rewire(link):
            raise OobError(f"link '{link}' is not connected yet: apply wires it once every replica is ready "
                           f"(if Ray restarted {self.book.cfg.name}, run `oob apply` again to re-wire it)")
        owner = self.book.owner(spec.source_buffer)
        # The caller's GPU work, marked now: its streams are current here, maybe not after an await.
        caller = callers_work(owner.array.device) if owner.buffer.device == "gpu" else []
        async with self._lock:  # one push of a link at a time: versions stay in order
            # A relay (its source buffer is itself a link's target) holds the slot it sends.
            held = await owner.inbox.pin(spec.timeout) if owner.inbox is not None else None
            try:
                return await self._push(link, spec, owner.slot(held) if held is not None else owner.array, caller)
            finally:
                if held is not None:
                    owner.inbox.unpin(held)

    async def _push(self, link: str, spec, source, caller: list) -> dict:
        version = self.version[link] + 1
        targets = self.targets[link]
        start = time.perf_counter()
        failed: dict[str, str] = {}
        direct = [t for t in targets if t.direct]
        if direct:
            await self._push_direct(direct, source, version, spec.timeout, caller, failed)
        others = [t for t in targets if not t.direct]
        if others:
            await self._push_by_call(link, others, source, version, spec.timeout, caller, failed)
        seconds = time.perf_counter() - start
        self.version[link] = version
        reached = len(targets) - len(failed)
        nbytes = int(source.nbytes) * reached
        self.metrics.push(link, seconds, nbytes)
        self.last[link] = PushResult(version, nbytes, seconds, nbytes / seconds / 1e9 if seconds else 0.0, reached,
                                     len(direct), "/".join(sorted({t.transport for t in targets})), time.time())
        if failed:
            why = "; ".join(f"{key}: {reason}" for key, reason in failed.items())
            raise OobError(f"link '{link}': version {version} reached {reached} of {len(targets)} targets; {why}")
        return self.last[link].to_dict()

    def _claim_now(self, t: Target, source) -> int:
        """Before the copy: the target runs, is the one we mapped (else map its successor), is not
        closing, and a slot of it is ours now (SlotBusy if readers hold them; TargetGone)."""
        if t.outbox is None or t.outbox.closing:  # gone at the last push, or restarted since
            self._open(t, source)
        try:
            t.outbox.check()
            return t.outbox.begin()
        except TargetGone:
            t.close()
            raise

    async def _push_direct(self, targets: list[Target], source, version: int, seconds: float, caller: list,
                           failed: dict) -> None:
        claimed, busy = {}, []
        for t in targets:
            try:
                claimed[t.key] = self._claim_now(t, source)
            except SlotBusy:
                busy.append(t)
            except TargetGone:
                failed[t.key] = "not running (restarting, or dead)"
            except TransportError as exc:  # e.g. another user's file under its name: refused
                failed[t.key] = str(exc)
        if busy:  # wait for their readers together: the slowest bounds the push, not their sum
            got = await asyncio.gather(*(t.outbox.claim(seconds) for t in busy), return_exceptions=True)
            for t, slot in zip(busy, got):
                if isinstance(slot, TargetGone):
                    t.close()
                if isinstance(slot, TransportError):
                    failed[t.key] = str(slot)
                elif isinstance(slot, int):
                    claimed[t.key] = slot
        live = [t for t in targets if t.key in claimed]
        slots = [claimed[t.key] for t in live]
        error = next((e for e in (got if busy else []) if isinstance(e, BaseException)
                      and not isinstance(e, TransportError)), None)
        try:
            if error is not None:  # cancelled while it waited: let go of what it holds
                raise error
            await self._copy(live, slots, source, caller)
        except BaseException:
            for t, slot in zip(live, slots):
                t.outbox.abandon(slot, written=error is None)
            raise
        for t, slot in zip(live, slots):
            try:
                t.outbox.publish(version, slot)
            except TargetGone:  # it exited during the copy; a restarted one gets the next push
                t.close()
                failed[t.key] = "not running (it exited; restarting, or dead)"

    def _ordered(self, source, caller: list):
        """Our copy stream, after the caller's work (`caller`: its events); returns (stream,
        whether that work is done already)."""
        if self._stream is None:
            from ..transports.base import import_cupy
            with source.device:
                self._stream = import_cupy().cuda.Stream(non_blocking=True)
        for event in caller:
            self._stream.wait_event(event)
        return self._stream, all(event.done for event in caller)

    async def _copy(self, targets: list[Target], slots: list[int], source, caller: list) -> None:
        if not targets:
            return
        inline = source.nbytes * len(targets) <= INLINE_BYTES
        if any(t.transport == "cuda_ipc" for t in targets):
            with source.device:
                # Queued here, back to back on one stream, after the caller's work; then one wait,
                # on the event loop only if the caller's work is done already (else in a thread).
                stream, done = self._ordered(source, caller)
                for t, slot in zip(targets, slots):
                    if t.transport == "cuda_ipc":
                        t.sender.copy(slot, stream, source)
            inline = inline and done
        if inline:
            self._finish(targets, slots, source)
        else:
            await asyncio.to_thread(self._finish, targets, slots, source)

    def _finish(self, targets: list[Target], slots: list[int], source) -> None:
        for t, slot in zip(targets, slots):
            if t.transport == "shm":
                t.sender.send(slot, source)
        if self._stream is not None and any(t.transport == "cuda_ipc" for t in targets):
            self._stream.synchronize()

    async def _push_by_call(self, link: str, targets: list[Target], source, version: int, seconds: float,
                            caller: list, failed: dict) -> None:
        calls = []
        nccl = [t for t in targets if t.transport == "nccl"]
        if nccl:
            # The caller's work first (off the loop): the broadcast's deadline is for the broadcast.
            pending = [event for event in caller if not event.done]
            if pending:
                await asyncio.to_thread(lambda: [event.synchronize() for event in pending])
            calls += [(t, t.handle._oob_receive.remote(link, {"transport": "nccl"}, version)) for t in nccl]
            group = self.groups.get(link)
            try:
                if group is None:
                    raise OobError("nccl is wired at apply: re-apply to wire the link again")
                await asyncio.to_thread(group.broadcast, source, seconds)
            except OobError as exc:  # aborted (or never wired): name the ranks that did not take part
                self.groups.by_link.pop(link, None)
                await self._name_missing(calls, failed, str(exc))
                calls = []
        others = [t for t in targets if t.transport != "nccl"]

        async def send(t: Target):
            # cuda_ipc records its event on our stream, after the caller's work; object_store's
            # ray.put copies the slot being sent, off the event loop.
            if t.transport == "cuda_ipc":
                with source.device:
                    return t.sender.send(source, self._ordered(source, caller)[0])
            return await asyncio.to_thread(t.sender.send, source)
        payloads = await asyncio.gather(*(send(t) for t in others))
        calls += [(t, t.handle._oob_receive.remote(link, {"transport": t.transport, "payload": p}, version))
                  for t, p in zip(others, payloads)]
        results = await asyncio.gather(*(ref for _, ref in calls), return_exceptions=True)
        for (t, _), result in zip(calls, results):
            if isinstance(result, BaseException):
                failed[t.key] = _why(result)

    @staticmethod
    async def _name_missing(calls: list, failed: dict, why: str) -> None:
        """After an aborted broadcast: each rank's own error if it said one within a second, else `why`."""
        futures = [asyncio.ensure_future(ref) for _, ref in calls]
        await asyncio.wait(futures, timeout=1.0)
        for (t, _), future in zip(calls, futures):
            error = future.exception() if future.done() and not future.cancelled() else None
            failed[t.key] = _why(error) if error else why
            future.cancel()

    def stats(self) -> dict:
        return {name: {"last_push": self.last[name].to_dict() if name in self.last else None, "transports": sorted({t.transport for t in self.targets.get(name, [])})}
                for name, spec in self.book.links.items() if spec.role == "source"}

    async def wait_idle(self, seconds: float) -> None:
        """Until a push in progress has finished (at most `seconds`); then no push starts."""
        try:
            await asyncio.wait_for(self._lock.acquire(), seconds)
        except asyncio.TimeoutError:
            pass

    def close(self) -> None:
        for targets in self.targets.values():
            for t in targets:
                t.close()
        self.targets.clear()


def _why(error: BaseException) -> str:
    """A target's failed Ray call, in one line: "not running (...)" when its actor is dead or restarting."""
    import ray
    first = (str(error).splitlines() or [""])[0]
    first = first if len(first) <= 120 else first[:117] + "..."
    if isinstance(error, ray.exceptions.RayActorError):
        return f"not running ({type(error).__name__}: {first})"
    return f"{type(error).__name__}: {first}"
