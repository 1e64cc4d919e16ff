"""Clusters that are not this machine: the user's code and oobspec itself travel with the actors.

A class's module already travels by value inside the pickled class; what the actors import
at run time (the spec's folder: helpers, generated protos) and oobspec's own package are
uploaded once to the cluster (Ray's GCS package store, what `working_dir` and `py_modules`
do) and named by URI in each actor's runtime_env. Local clusters keep the no-runtime_env
fast path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import ray_private
from ..errors import OobError

UPLOAD_CAP = int(os.environ.get("OOB_UPLOAD_CAP_MB", "100")) * 1024**2
EXCLUDES = [".git", "__pycache__", ".venv", "venv", "*.pyc", ".pytest_cache", ".hypothesis"]
IGNORE_FILE = ".oobignore"


def excludes(folder: Path) -> list[str]:
    """What never travels: VCS and caches, plus the lines of the folder's `.oobignore`
    (gitignore syntax; `.gitignore` and `.rayignore` are honoured too)."""
    extra = []
    ignore = folder / IGNORE_FILE
    if ignore.is_file():
        extra = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return EXCLUDES + extra


@dataclass
class Upload:
    """The spec's folder as it would travel."""

    folder: Path
    files: int = 0
    bytes: int = 0
    largest: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        from ..report import size
        return f"{self.folder} ({self.files} file{'s' if self.files != 1 else ''}, {size(self.bytes)})"


def scan(folder: Path) -> Upload:
    """Walk the folder with the same exclusion rules the upload applies."""
    folder = folder.resolve()
    up = Upload(folder)
    sizes: list[tuple[str, int]] = []

    def count(path: Path) -> None:
        if path.is_file():
            n = path.stat().st_size
            up.files += 1
            up.bytes += n
            sizes.append((str(path.relative_to(folder)), n))
    ray_private.walk_upload(folder, excludes(folder), count)
    up.largest = sorted(sizes, key=lambda x: -x[1])[:3]
    return up


def check_cap(up: Upload, cap: int = UPLOAD_CAP) -> None:
    if up.bytes > cap:
        from ..report import size
        largest = ", ".join(f"{name} ({size(n)})" for name, n in up.largest)
        raise OobError(f"the spec's folder {up.folder} is {size(up.bytes)}, over the {size(cap)} upload cap "
                       f"(OOB_UPLOAD_CAP_MB); largest: {largest}; list what need not travel in {IGNORE_FILE}")


def package_env(folder: Path) -> dict:
    """Upload the spec's folder and oobspec to the connected cluster; a runtime_env naming them."""
    import tempfile

    check_cap(scan(folder))
    _no_pin()
    env = {"working_dir": str(folder.resolve()), "excludes": excludes(folder)}
    with tempfile.TemporaryDirectory() as scratch:
        env = ray_private.upload_working_dir(env, scratch)
    env.pop("excludes", None)
    return dict(env, **oob_env())


_OOB_ENV: dict | None = None


def oob_env() -> dict:
    """A runtime_env with oobspec's own package, uploaded once per process: what oob's helper
    tasks need on a cluster where oobspec is not installed."""
    global _OOB_ENV
    _no_pin()
    if _OOB_ENV is None:
        import tempfile
        env = {"py_modules": [str(Path(__file__).resolve().parent.parent)], "excludes": EXCLUDES}
        with tempfile.TemporaryDirectory() as scratch:
            env = ray_private.upload_py_modules(env, scratch)
        env.pop("excludes", None)
        _OOB_ENV = env
    return _OOB_ENV


def _no_pin() -> None:
    # Uploading pins the package for a while through Ray Client's PinRuntimeEnvURI, a call that
    # never answers on Ray 2.60's client proxy; the actors that use the package hold it anyway.
    os.environ.setdefault("RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S", "0")
