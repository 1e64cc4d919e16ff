"""The replica's life around the user's class: its `on_start()` / `on_stop()` hooks, and marks
of when its log grew (what `oob logs --since` starts from)."""
from __future__ import annotations

import asyncio
import bisect
import collections
import inspect
import os
import sys
import time
import traceback


async def call_hook(obj, name: str, raising: bool = True) -> None:
    """The user's hook (sync or async) when the class defines one. A failing `on_start` fails
    the replica's start (raised); a failing `on_stop` is printed to the replica's log."""
    hook = getattr(obj, name, None)
    if not callable(hook):
        return
    try:
        result = hook()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        if raising:
            raise
        print(f"[oob] {name}() failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)


def log_files() -> list[str]:
    """This process's stdout and stderr files (a Ray worker's .out and .err), when they are files."""
    return [p for p in (os.path.realpath(f"/proc/self/fd/{fd}") for fd in (1, 2)) if os.path.isfile(p)]


class LogMarks:
    """(time, size of each log file), taken each second the files grew: the sizes at a moment
    are where the output written since then starts (to within a second). The last 3 hours of
    marks are kept (about a megabyte for a replica that writes every second); `--since` further
    back than the oldest mark starts at the beginning of the log."""

    def __init__(self, paths: list[str], keep: int = 10_800):
        self.paths = paths
        self.times: collections.deque[float] = collections.deque(maxlen=keep)
        self.sizes: collections.deque[list[int]] = collections.deque(maxlen=keep)
        self.task: asyncio.Task | None = None

    @classmethod
    def started(cls, paths: list[str]) -> "LogMarks":
        """Marking from now on, on the running event loop (the replica's)."""
        marks = cls(paths)
        marks.mark()
        marks.task = asyncio.get_running_loop().create_task(marks.run())
        return marks

    def _now(self) -> list[int]:
        sizes = []
        for path in self.paths:
            try:
                sizes.append(os.path.getsize(path))
            except OSError:
                sizes.append(0)
        return sizes

    def mark(self) -> None:
        sizes = self._now()
        if not self.sizes or sizes != self.sizes[-1]:
            self.times.append(time.time())
            self.sizes.append(sizes)

    async def run(self, every: float = 1.0) -> None:
        while True:
            self.mark()
            await asyncio.sleep(every)

    def offsets(self, since: float) -> list[int]:
        """Where each file stood at `since` (time.time()); 0 before the first mark."""
        i = bisect.bisect_right(list(self.times), since)
        return list(self.sizes[i - 1]) if i else [0] * len(self.paths)
