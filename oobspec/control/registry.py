"""Where a foreground `oob apply` says where its private Ray is, so `oob status NAME` finds it.

Only a folder that nobody else can write is trusted: another local user who planted the
folder (or an entry in it) could otherwise steer `oob status NAME` to their own address, and
in token mode the token would go there. The folder is `$XDG_RUNTIME_DIR/oobspec` when that
is usable (per-user, 0700 by the XDG spec), else `<tmp>/oobspec-<uid>`; both are checked for
owner and mode before every use, and so is every entry. What fails the check is ignored with
one warning line.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

_warned: set[str] = set()


def warn(message: str) -> None:
    if message not in _warned:  # once per process, however often a command looks
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _problem(st: os.stat_result, kind: str) -> str | None:
    """Why a file or folder is not this user's alone (None: it is)."""
    want = stat.S_ISDIR if kind == "folder" else stat.S_ISREG
    if not want(st.st_mode):
        return f"not a {'folder' if kind == 'folder' else 'regular file'}"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (0o077 if kind == "folder" else 0o022):
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets other users in"
    return None


def _private(path: Path, create: bool = False) -> bool:
    """`path` is a folder only this user can read and write (made so when `create`)."""
    if create:
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)  # lstat: a symlink planted in its place is not followed
    except OSError:
        return False
    problem = _problem(st, "folder")
    if problem:
        warn(f"ignoring {path}: {problem} (remove it; oob keeps its registry there)")
    return problem is None


def registry_dir(create: bool = False) -> Path | None:
    """The registry folder, or None when none is usable (then nothing is registered or read)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _quiet_private(Path(runtime)):
        path = Path(runtime) / "oobspec"
    else:
        path = Path(tempfile.gettempdir()) / f"oobspec-{os.getuid()}"
    return path if _private(path, create) else None


def _quiet_private(path: Path) -> bool:
    try:
        return _problem(os.stat(path), "folder") is None
    except OSError:
        return False


def read(path: Path) -> dict | None:
    """One entry, if it is this user's own regular file: {address, pid}."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        problem = _problem(os.fstat(fd), "file")
        if problem:
            warn(f"ignoring {path}: {problem}")
            return None
        try:
            entry = json.loads(f.read())
        except ValueError:
            return None
    try:
        well_formed = isinstance(entry["address"], str) and isinstance(entry["pid"], int)
    except (TypeError, KeyError):
        return None
    return entry if well_formed else None


def entries() -> dict[str, Path]:
    """Every registered name and its entry's path."""
    folder = registry_dir()
    return {} if folder is None else {p.stem: p for p in sorted(folder.glob("*.json"))}


def entry_path(name: str) -> Path | None:
    folder = registry_dir()
    return None if folder is None else folder / f"{name}.json"


def register(name: str, address: str) -> Path | None:
    """Write this process's entry (atomically, mode 0600); None when no private folder exists."""
    folder = registry_dir(create=True)
    if folder is None:
        return None
    path = folder / f"{name}.json"
    scratch = folder / f".{name}.{os.getpid()}.tmp"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"address": address, "pid": os.getpid()}))
    os.replace(scratch, path)
    return path


def unregister(path: Path | None) -> None:
    """Remove this process's own entry (never another apply's that took the name since)."""
    if path is None:
        return
    entry = read(path)
    if entry is not None and entry["pid"] == os.getpid():
        try:
            path.unlink()
        except OSError:
            pass
