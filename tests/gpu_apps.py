"""Actor classes for the GPU link tests: every push is distinct (a seed) and is queued behind a
long kernel on the source's stream, so a copy that does not wait for the caller's work, or a
reader whose slot is overwritten, shows in a checksum."""
import asyncio
import os

import oobspec

_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
"""
_kernel = None


def spin(ms: float, stream=None) -> None:
    """Queue a kernel that keeps the GPU busy `ms` milliseconds on `stream` (default: current)."""
    import cupy as cp
    global _kernel
    if _kernel is None:
        _kernel = cp.RawKernel(_SPIN, "spin")
    with stream or cp.cuda.get_current_stream():
        _kernel((1,), (1,), (cp.uint64(int(ms * 1e6)),))


def fill(a, seed: int, stream=None) -> None:
    """Seeded pseudo-random words, queued on `stream` (default: current), not synchronised."""
    import cupy as cp
    with stream or cp.cuda.get_current_stream():
        x = cp.arange(a.nbytes // 4, dtype=cp.uint64)
        a.view(cp.uint32).reshape(-1)[...] = ((x * 2654435761 + seed * 40503) >> 7).astype(cp.uint32)


def checksum(a) -> int:
    import cupy as cp
    w = a.view(cp.uint32).reshape(-1)
    return int(w.sum(dtype=cp.uint64)) ^ int((w[::4097].astype(cp.uint64) * 31).sum())


class GpuStamper:
    async def push_seeded(self, seed: int, spin_ms: float = 200, side_stream: bool = False) -> dict:
        """Spin, fill with `seed`, push: nothing synchronised before the push returns."""
        ctx = oobspec.context()
        buf = ctx.buffers["data"]
        if side_stream:  # the training step's own torch stream, current while it pushes
            import cupy as cp
            import torch
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                queue = cp.cuda.ExternalStream(side.cuda_stream)  # deprecated in cupy 14, still works
                spin(spin_ms, queue)
                fill(buf, seed, queue)
                pushed = await self._push(ctx)
        else:
            spin(spin_ms)
            fill(buf, seed)
            pushed = await self._push(ctx)
        return dict(pushed, checksum=checksum(buf))

    @staticmethod
    async def _push(ctx) -> dict:
        try:
            return await ctx.push("data")
        except oobspec.OobError as exc:
            return {"error": str(exc)}

    async def push_many(self, seeds: list, pause: float = 0.01) -> list:
        out = []
        for seed in seeds:
            out.append(await self.push_seeded(seed, spin_ms=1))
            await asyncio.sleep(pause)
        return out


class GpuReader:
    async def next(self, after: int) -> list:
        """Asleep until a version newer than `after`; its version and checksum, read in a snapshot."""
        ctx = oobspec.context()
        await ctx.updated("data", after=after, timeout=60)
        async with ctx.reading("data") as snap:
            return [snap.version, checksum(snap.array)]

    async def hold(self, seconds: float) -> dict:
        ctx = oobspec.context()
        async with ctx.reading("data") as snap:
            first = [snap.version, checksum(snap.array)]
            await asyncio.sleep(seconds)
            return {"first": first, "last": [snap.version, checksum(snap.array)], "intact": snap.intact}

    async def pid(self) -> int:
        return os.getpid()
