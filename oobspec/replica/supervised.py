"""A program a command actor wraps: started through the launcher, its output sent to the
actor's log, restarted with backoff, stopped with SIGTERM then SIGKILL."""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys

from . import launch


class Supervised:
    """A wrapped program: started, its output sent to the actor's log, restarted, stopped."""

    def __init__(self, argv: list[str], restarts: int, ports: dict[str, int], cwd: str | None = None):
        self.argv, self.restarts, self.ports, self.cwd = argv, restarts, ports, cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.stopping = False
        self.last_exit: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self) -> None:
        self.starts += 1
        program = launch.find_program(self.argv[0], self.cwd)
        # Through the launcher, so the program dies with the actor even when Ray SIGKILLs it.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", launch.__file__, str(os.getpid()), program, *self.argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=self.cwd)
        print(f"[oob] started {self.argv[0]} (pid {self.proc.pid})", flush=True)

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            print(line, flush=True)

    async def _supervise(self) -> None:
        delay = 0.5
        while True:
            await asyncio.gather(self._pump(), self.proc.wait())
            self.last_exit = self.proc.returncode
            if self.stopping:
                return
            used = self.starts - 1
            print(f"[oob] {self.argv[0]} exited with code {self.last_exit}", flush=True)
            if self.restarts != -1 and used >= self.restarts:
                print(f"[oob] not restarting: restarts: {self.restarts} used", flush=True)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            if self.stopping:
                return
            await self._spawn()

    async def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
            except ProcessLookupError:
                pass
        if self._task is not None:
            self._task.cancel()

    def describe(self) -> dict:
        return {"argv": self.argv, "pid": self.proc.pid if self.proc else None, "alive": self.alive,
                "starts": self.starts, "last_exit": self.last_exit}
