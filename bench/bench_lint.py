"""How long `oob lint` takes on a large spec, against parsing the same file with PyYAML.

Generates an N-actor spec (every actor with an HTTP server on its own fixed port, two routes,
a `connect` to the previous actor, env and resources), then times whole processes, so
interpreter start and imports count on both sides:

    python -m oobspec.cli lint --no-import FILE
    python -c "import yaml; yaml.load(open(FILE), Loader=yaml.SafeLoader)"   # pure-Python loader

Median of several runs each. Goal: oob lint within 1.5x of the PyYAML load. Then the same lint
at 250/500/1000/2000 actors, to show that the time per actor stays flat (linear growth).

    .venv/bin/python bench/bench_lint.py [--actors 1000] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_spec(n: int) -> str:
    lines = [
        "# yaml-language-server: $schema=../schemas/oobspec.schema.json",
        "version: 1",
        f"name: bench-{n}",
        "ray:",
        "  runtime_env: {}",
        "actors:",
    ]
    for i in range(n):
        lines += [
            f"  svc-{i}:",
            "    class: examples.counter:Counter",
            f"    kwargs: {{start: {i}}}",
            "    replicas: 1",
            "    restarts: -1",
            "    resources: {cpus: 0.25, memory: 256MiB}",
            "    env:",
            f"      SERVICE_INDEX: \"{i}\"",
            "      LOG_LEVEL: info",
            "      PYTHON_VERSION: 3.10",
        ]
        if i:
            lines += ["    connect:", f"      upstream: svc-{i - 1}.http"]
        lines += [
            "    servers:",
            "      - name: http",
            "        protocol: http",
            "        host: 127.0.0.1",
            f"        port: {20000 + i}",
            "        routes:",
            "          - {method: GET, path: /, call: get}",
            "          - {method: POST, path: /increment, call: increment}",
        ]
    return "\n".join(lines) + "\n"


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return elapsed


def median_time(cmd: list[str], env: dict, runs: int) -> float:
    run(cmd, env)  # warm the page cache and .pyc files
    return statistics.median(run(cmd, env) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="250,500,1000,2000")
    args = parser.parse_args()

    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="oob-bench-") as tmp:
        def spec_file(n: int) -> str:
            path = Path(tmp) / f"bench-{n}.yaml"
            if not path.exists():
                path.write_text(make_spec(n))
            return str(path)

        lint = lambda f: [py, "-m", "oobspec.cli", "lint", "--no-import", f]
        pyyaml = lambda f: [py, "-c", f"import yaml; yaml.load(open({f!r}), Loader=yaml.SafeLoader)"]

        f = spec_file(args.actors)
        size_kib = Path(f).stat().st_size / 1024
        t_lint = median_time(lint(f), env, args.runs)
        t_yaml = median_time(pyyaml(f), env, args.runs)
        print(f"{args.actors} actors ({size_kib:.0f} KiB), median of {args.runs} whole-process runs:")
        print(f"  oob lint --no-import        {t_lint:7.3f} s")
        print(f"  yaml.load(SafeLoader)       {t_yaml:7.3f} s")
        ratio = t_lint / t_yaml
        print(f"  ratio                       {ratio:7.2f}x  (goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")

        print("\ngrowth of oob lint --no-import (median of "
              f"{args.runs}; per actor = (t - t_empty) / actors, t_empty = interpreter + imports):")
        t_empty = median_time([py, "-m", "oobspec.cli", "lint", "--no-import", spec_file(1)], env, args.runs)
        print(f"  {1:>5} actor   {t_empty:7.3f} s")
        for n in [int(x) for x in args.sizes.split(",") if x]:
            t = median_time(lint(spec_file(n)), env, args.runs)
            print(f"  {n:>5} actors  {t:7.3f} s   {(t - t_empty) / n * 1e6:7.0f} us/actor")


if __name__ == "__main__":
    main()
