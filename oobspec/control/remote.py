"""Clusters that are not this machine: the user's code and oobspec itself travel with the actors.

A class's module already travels by value inside the pickled class; what the actors import
at run time (the spec's folder: helpers, generated protos) and oobspec's own package are
uploaded once to the cluster (Ray's GCS package store, what `working_dir` and `py_modules`
do) and named by URI in each actor's runtime_env. Local clusters keep the no-runtime_env
fast path.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from .. import ray_private
from ..errors import OobError

UPLOAD_CAP = int(os.environ.get("OOB_UPLOAD_CAP_MB", "100")) * 1024**2
EXCLUDES = [".git", "__pycache__", ".venv", "venv", "*.pyc", ".pytest_cache", ".hypothesis"]
IGNORE_FILE = ".oobignore"
OUTSIDE, LOOP = "outside", "loop"


def listed(folder: Path) -> list[str]:
    """What never travels by rule: VCS and caches, plus the lines of the folder's `.oobignore`
    (gitignore syntax; `.gitignore` and `.rayignore` are honoured too)."""
    extra = []
    ignore = folder / IGNORE_FILE
    if ignore.is_file():
        extra = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return EXCLUDES + extra


def excludes(folder: Path) -> list[str]:
    """What never travels: what `listed` says, and every symlink that leaves the folder or loops
    (Ray's upload follows every link it meets; these patterns keep it from them)."""
    return scan(folder).excludes


class Skipped(NamedTuple):
    """A symlink that does not travel: its path in the folder, where it leads, and why."""

    path: str
    target: str
    why: str  # OUTSIDE or LOOP

    def warning(self) -> str:
        reason = "it leads out of the spec's folder" if self.why == OUTSIDE else "a symlink loop"
        return f"warning: not uploading {self.path} -> {self.target}: {reason}"


@dataclass
class Upload:
    """The spec's folder as it would travel."""

    folder: Path
    files: int = 0
    bytes: int = 0
    largest: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # symlinks left behind, by path
    excludes: list[str] = field(default_factory=list)  # what the upload is told to leave out

    def describe(self) -> str:
        from ..report import size
        return f"{self.folder} ({self.files} file{'s' if self.files != 1 else ''}, {size(self.bytes)})"

    def warnings(self) -> list[str]:
        """One line per symlink left behind."""
        return [s.warning() for s in self.skipped]


class _LinkGuard:
    """Asked about every path the upload walk meets, before Ray follows it: refuses (and names)
    a symlink that leaves the folder, one that cannot be resolved for a loop, and one to a
    folder that the walk is already inside (followed, it would be walked again and again)."""

    def __init__(self, folder: Path):
        self.folder, self.found = folder, []

    def __call__(self, path: Path) -> bool:
        if not path.is_symlink():
            return False
        target, why = self._judge(path)
        if why:
            self.found.append(Skipped(path.relative_to(self.folder).as_posix(), target, why))
        return why is not None

    def _judge(self, path: Path) -> tuple[str, str | None]:
        try:
            real = Path(os.path.realpath(path, strict=True))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return os.readlink(path), LOOP
            real = Path(os.path.realpath(path))  # dangling: nothing travels, but say where it points
        if real != self.folder and self.folder not in real.parents:
            return str(real), OUTSIDE
        if real.is_dir():
            walked = [Path(os.path.realpath(p)) for p in path.parents if p == self.folder or self.folder in p.parents]
            if any(real == p or real in p.parents for p in walked):
                return str(real), LOOP
        return str(real), None


def _pattern(relative: str) -> str:
    """A gitignore pattern that matches exactly this path from the folder's root, nothing else."""
    def escape(name: str) -> str:
        return "".join("\\" + c if c in "[]!*#?\\" else f"[{c}]" if c.isspace() else c for c in name)
    return "/" + "/".join(escape(part) for part in relative.split("/"))


def scan(folder: Path) -> Upload:
    """Walk the folder with the same exclusion rules the upload applies; symlinks that leave it
    or loop are left out, named in `skipped` and listed in `excludes`."""
    folder = folder.resolve()
    up = Upload(folder)
    sizes: list[tuple[str, int]] = []
    guard = _LinkGuard(folder)

    def count(path: Path) -> None:
        if path.is_file():
            n = path.stat().st_size
            up.files += 1
            up.bytes += n
            sizes.append((str(path.relative_to(folder)), n))
    rules = listed(folder)
    ray_private.walk_upload(folder, rules, count, skip=guard)
    up.largest = sorted(sizes, key=lambda x: -x[1])[:3]
    up.skipped = sorted(guard.found)
    up.excludes = rules + [_pattern(s.path) for s in up.skipped]  # last: no `!` line undoes them
    return up


def check_cap(up: Upload, cap: int = UPLOAD_CAP) -> None:
    if up.bytes > cap:
        from ..report import size
        largest = ", ".join(f"{name} ({size(n)})" for name, n in up.largest)
        raise OobError(f"the spec's folder {up.folder} is {size(up.bytes)}, over the {size(cap)} upload cap "
                       f"(OOB_UPLOAD_CAP_MB); largest: {largest}; list what need not travel in {IGNORE_FILE}")


def package_env(folder: Path, warn: Callable[[str], None] | None = None) -> dict:
    """Upload the spec's folder and oobspec to the connected cluster; a runtime_env naming them.
    Each symlink left behind is one line to `warn` (default: stderr)."""
    import tempfile

    up = scan(folder)
    check_cap(up)
    for line in up.warnings():
        (warn or _stderr)(line)
    _no_pin()
    env = {"working_dir": str(up.folder), "excludes": up.excludes}
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
