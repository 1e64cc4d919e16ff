"""Bandwidth of a shm push against one plain np.copyto and against the object_store path.

    .venv/bin/python bench/bench_shm_push.py [--mib 256] [--rounds 10]

Methods run round-robin so drift on a shared machine hits all of them alike; each
figure is the median over rounds. Goals: shm >= 0.7x memcpy, >= 1.5x object_store.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oobspec.transports import object_store, shm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    nbytes = args.mib << 20
    shape = (nbytes // 4,)
    prefix = f"oob-bench-{os.getpid()}-"

    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=False)
    try:
        src = np.random.default_rng(0).random(shape, dtype=np.float32)
        plain = np.zeros(shape, np.float32)  # pre-faulted like the shm target

        target = shm.allocate_shared(prefix + "target", shape, np.float32)
        tx = shm.Sender(src, {"name": target.name, "shape": shape, "dtype": "<f4", "slots": 1, "stride": 0})

        ob_rx = object_store.Receiver(np.zeros(shape, np.float32))
        ob_tx = object_store.Sender(src, ob_rx.descriptor())

        def object_store_push():
            ob_rx.receive(ob_tx.send())

        methods = {
            "memcpy (np.copyto)": lambda: np.copyto(plain, src),
            "shm push": tx.send,
            "object_store": object_store_push,
        }
        times = {k: [] for k in methods}
        for f in methods.values():
            f()  # warm-up
        for _ in range(args.rounds):
            for k, f in methods.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        assert np.array_equal(target.array, src) and np.array_equal(ob_rx.array, src)

        gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        print(f"{args.mib} MiB, median of {args.rounds} rounds, {os.cpu_count()} CPUs")
        for k, v in gbs.items():
            print(f"  {k:<22} {v:6.2f} GB/s")
        print(f"  shm / memcpy           {gbs['shm push'] / gbs['memcpy (np.copyto)']:6.2f}x  (goal >= 0.7)")
        print(f"  shm / object_store     {gbs['shm push'] / gbs['object_store']:6.2f}x  (goal >= 1.5)")
        tx.close()
        target.close()
    finally:
        shm.cleanup(prefix)
        ray.shutdown()


if __name__ == "__main__":
    main()
