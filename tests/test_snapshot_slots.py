"""The slot protocol of a link target, in one process and across two (no Ray): which slot a push
may fill while a reader holds a snapshot, torn reads detected, a closing target waiting for a
copy in progress."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

from oobspec.errors import OobError
from oobspec.models import Buffer
from oobspec.replica.buffers import Allocation
from oobspec.replica.context import Context
from oobspec.transports import shm
from oobspec.transports.inbox import Outbox, SlotBusy, TargetGone

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def segment(request):
    prefix = f"oob-s{os.getpid()}-{request.node.name.replace('[', '-').rstrip(']')}-"
    yield prefix + "data"
    shm.cleanup(prefix)


def target(segment: str, slots: int, timeout: float = 10.0) -> tuple[Allocation, Context]:
    alloc = Allocation(Buffer(shape=[1024], dtype="float64"), slots, segment, timeout)
    return alloc, Context("d", "dst", 0, 1, _owners={"data": alloc})


def push(outbox: Outbox, sender: shm.Sender, version: int) -> int:
    """One push as the source makes it: claim a slot, copy `version` into all of it, publish."""
    slot = outbox.begin()
    sender.send(slot, np.full(1024, float(version)))
    outbox.publish(version, slot)
    return slot


def source(alloc: Allocation) -> tuple[Outbox, shm.Sender]:
    d = {"name": alloc.segment, "shape": (1024,), "dtype": "<f8", "slots": alloc.slots, "stride": alloc.stride}
    return Outbox(alloc.segment), shm.Sender(np.zeros(1024), d)


def test_triple_buffering_a_held_snapshot_survives_three_pushes(segment):
    alloc, ctx = target(segment, 3)
    outbox, sender = source(alloc)
    push(outbox, sender, 1)

    async def go():
        async with ctx.reading("data") as snap:
            assert snap.version == 1 and set(snap.array.tolist()) == {1.0}
            written = [push(outbox, sender, v) for v in (2, 3, 4)]  # none waits
            assert snap.slot not in written and ctx.versions["data"] == 4
            assert set(snap.array.tolist()) == {1.0} and snap.intact  # still version 1, whole
        async with ctx.reading("data") as snap:
            assert snap.version == 4 and set(snap.array.tolist()) == {4.0}
    asyncio.run(go())
    alloc.close()


def test_double_buffering_a_push_waits_for_the_held_slot_then_fails_naming_it(segment):
    alloc, ctx = target(segment, 2)
    outbox, sender = source(alloc)
    push(outbox, sender, 1)

    async def go():
        async with ctx.reading("data") as snap:
            push(outbox, sender, 2)  # the free slot
            with pytest.raises(SlotBusy, match="readers hold its slots"):
                push(outbox, sender, 3)  # would need the held one
            started = time.monotonic()
            with pytest.raises(SlotBusy, match=r"readers held its slots for 0.2 s"):
                await outbox.claim(0.2)
            assert 0.2 <= time.monotonic() - started < 1.0
            assert set(snap.array.tolist()) == {1.0} and snap.intact
        # Released: the push that waited goes through at once.
        slot = await outbox.claim(0.2)
        sender.send(slot, np.full(1024, 3.0))
        outbox.publish(3, slot)
        async with ctx.reading("data") as snap:
            assert snap.version == 3 and set(snap.array.tolist()) == {3.0}
    asyncio.run(go())
    alloc.close()


def test_single_buffering_reader_and_push_wait_for_each_other(segment):
    alloc, ctx = target(segment, 1, timeout=0.2)
    outbox, sender = source(alloc)

    async def go():
        slot = outbox.begin()  # a push in progress
        with pytest.raises(OobError, match=r"buffer 'data': a push held it for 0.2 s"):
            async with ctx.reading("data"):
                pass
        # It ends while the reader waits: the reader gets the complete new version.
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: (sender.send(slot, np.full(1024, 5.0)), outbox.publish(5, slot)))
        async with ctx.reading("data") as snap:
            assert snap.version == 5 and set(snap.array.tolist()) == {5.0}
            with pytest.raises(SlotBusy):
                outbox.begin()  # and no push starts while it reads
        push(outbox, sender, 6)
    asyncio.run(go())
    alloc.close()


def test_a_reader_in_a_loop_does_not_starve_a_push(segment):
    """One slot, a reader that takes a snapshot again as soon as it lets go: a waiting push
    still gets the slot (new snapshots wait for it), within about one read."""
    alloc, ctx = target(segment, 1)
    outbox, sender = source(alloc)

    async def go():
        reading = True

        async def reader():
            while reading:
                async with ctx.reading("data"):
                    await asyncio.sleep(0.005)  # a read that takes a while
        task = asyncio.create_task(reader())
        await asyncio.sleep(0.05)
        for version in (1, 2, 3):
            slot = await outbox.claim(2.0)  # SlotBusy if the reader starved it
            sender.send(slot, np.full(1024, float(version)))
            outbox.publish(version, slot)
            await asyncio.sleep(0.02)
        reading = False
        await task
        async with ctx.reading("data") as snap:
            assert snap.version == 3 and snap.intact
    asyncio.run(go())
    alloc.close()


def test_a_torn_slot_is_detected_by_its_sequence(segment):
    """A source that failed mid-copy leaves its slot marked: any snapshot of it says not intact."""
    alloc, ctx = target(segment, 1)
    outbox, sender = source(alloc)
    push(outbox, sender, 1)

    async def go():
        slot = outbox.begin()
        sender.send(slot, np.full(1024, 2.0))
        outbox.abandon(slot)  # the copy failed after writing (or its process died): no publish
        async with ctx.reading("data") as snap:
            assert snap.version == 1 and not snap.intact
        push(outbox, sender, 3)
        async with ctx.reading("data") as snap:
            assert snap.version == 3 and snap.intact
        outbox.abandon(outbox.begin(), written=False)  # claimed, then given up before any copy
        async with ctx.reading("data") as snap:
            assert snap.version == 3 and snap.intact  # nothing was written: the slot is whole
    asyncio.run(go())
    alloc.close()


def test_a_closing_target_waits_for_the_copy_in_progress(segment):
    alloc, _ctx = target(segment, 2)
    outbox, sender = source(alloc)
    slot = outbox.begin()  # the source is copying
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (alloc.close(), closed.set()))
    closer.start()
    time.sleep(0.3)
    assert not closed.is_set() and outbox.closing  # memory still there: the copy goes on safely
    sender.send(slot, np.full(1024, 1.0))
    with pytest.raises(TargetGone, match="closing"):
        outbox.publish(1, slot)  # the copy ends (the slot is let go), but no one is there to read it
    assert closed.wait(5)
    closer.join()
    with pytest.raises(TargetGone):
        outbox.check()


def _hold_and_die(segment: str, ready, slots: int) -> None:
    """A reader (another process) takes a snapshot and is killed holding it."""
    alloc = Allocation(Buffer(shape=[1024], dtype="float64"), slots, segment)
    ctx = Context("d", "dst", 0, 1, _owners={"data": alloc})

    async def hold():
        async with ctx.reading("data"):
            ready.set()
            await asyncio.sleep(60)
    asyncio.run(hold())


def test_a_killed_reader_never_leaves_its_slot_held(segment):
    spawn = mp.get_context("spawn")
    ready = spawn.Event()
    proc = spawn.Process(target=_hold_and_die, args=(segment, ready, 1))
    proc.start()
    assert ready.wait(30)
    outbox = Outbox(segment)
    with pytest.raises(SlotBusy):
        outbox.begin()
    proc.kill()
    proc.join()
    with pytest.raises(TargetGone, match="exited"):
        outbox.check()  # checked before any copy: no write into a dead target's memory
    assert outbox.begin() == 0  # the kernel dropped the dead reader's lock
