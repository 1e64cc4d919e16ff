"""shm: a CPU buffer pushed between processes on one node through POSIX shared memory.

The target owns a named segment (and its inbox, `inbox.py`); the source maps it once and
each push is a single copy straight into the mapping (copying into a mapping is several times faster than
copying out of one, so the source writes rather than the target reading).

Every file is /dev/shm/oob-<name>-_u<uid>_<rest> (`file_name`): the deployment's own prefix first,
then the user's uid, so two local users' deployments never share a file; oobspec uses or removes
an existing one only once its open fd says it is this user's own, of the kind oobspec makes, and
writable by this user alone (`open_checked`); anything else is a one-line ShmOwnerError.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from math import prod
from typing import NoReturn

import numpy as np

from .base import ShmOwnerError, TransportError, check_match

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "oob-"
_lingering: list[_Mapping] = []


def _tag() -> str:
    return f"u{os.geteuid()}_"


def file_name(name: str) -> str:
    """The file in /dev/shm of the segment (or `.ctl`, `.bell`) called `name`: the user's uid
    follows the deployment's prefix (`oob-web-_dst_0_data` -> `oob-web-_u1000_dst_0_data`; a name
    not made by contract.segment_name: `oob-x` -> `oob-u1000_x`), so two local users'
    deployments never share, nor see, each other's files."""
    head, sep, rest = name.partition("-_")
    if sep:
        return f"{head}-_{_tag()}{rest}"
    return f"{PREFIX}{_tag()}{name[len(PREFIX):]}"


def _logical(file: str) -> str | None:
    """`file_name`'s inverse for this user's files (None: not one of them)."""
    tag = _tag()
    head, sep, rest = file.partition("-_")
    if sep and rest.startswith(tag):
        return f"{head}-_{rest[len(tag):]}"
    if file.startswith(PREFIX + tag):
        return PREFIX + file[len(PREFIX + tag):]
    return None


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, file_name(name))


_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link",
          stat.S_IFDIR: "a directory"}


def _judge(st: os.stat_result, path: str, fifo: bool | None, strict: bool = True) -> None:
    """Refuse a file oobspec must not use (strict) or remove: another user's, not a regular file
    (fifo False), not a FIFO (fifo True), neither (None), or writable by group or others."""
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ShmOwnerError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {uid}): oobspec neither "
                            "uses nor removes another user's file; have its owner (or root) remove it")
    kind = stat.S_IFMT(st.st_mode)
    allowed = {True: (stat.S_IFIFO,), False: (stat.S_IFREG,), None: (stat.S_IFREG, stat.S_IFIFO)}[fifo]
    if kind not in allowed:
        what, want = _KINDS.get(kind, "a special file"), " or ".join(_KINDS[k] for k in allowed)
        raise ShmOwnerError(f"{path} is {what}, not {want} as oobspec makes it: remove it (rm {path}) and retry")
    if strict and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ShmOwnerError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}; oobspec "
                            f"makes its files 0600): remove it (rm {path}) and retry")


def open_checked(path: str, flags: int, fifo: bool | None = False, strict: bool = True) -> int:
    """os.open(path) without following a link, then judged on the open fd (no race with the path).
    FileNotFoundError, and ENXIO (a FIFO nobody reads), pass through to the caller."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ELOOP):
            raise
        # Not opened, so only said from the path: why it is refused.
        _judge(os.lstat(path), path, fifo, strict)
        raise TransportError(f"cannot open {path}: {exc.strerror}") from None
    try:
        _judge(os.fstat(fd), path, fifo, strict)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_exclusive(path: str, mode: int = 0o600) -> int:
    """A new file at `path`, never an existing one nor through a link: one in the way is refused
    (ShmOwnerError if it is another user's or no file oobspec makes)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except (FileExistsError, PermissionError) as exc:
        in_the_way(path, exc)


def in_the_way(path: str, exc: OSError) -> NoReturn:
    """Creating `path` failed with `exc`: say why in one line."""
    try:
        _judge(os.lstat(path), path, None, strict=False)
    except FileNotFoundError:
        pass
    raise TransportError(f"cannot create {path}: " + ("it already exists" if isinstance(exc, FileExistsError)
                                                      else exc.strerror)) from None


class _Mapping:
    """A /dev/shm file mapped read-write (`buf`, `size` bytes): what SharedMemory gives, opened
    safely and without Python's resource tracker (which unlinks attached segments when a source
    exits; oobspec owns segment lifetime itself: SharedBuffer.close, cleanup(prefix))."""

    def __init__(self, name: str, create: bool = False, size: int = 0):
        self.path = path = path_of(name)
        fd = create_exclusive(path) if create else open_checked(path, os.O_RDWR)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            if create:
                os.unlink(path)
            raise
        self.fd, self.size = fd, size
        self.buf: memoryview | None = memoryview(self._mmap)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()  # BufferError while an array over it lives
            self.buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(name: str, create: bool = False, size: int = 0) -> _Mapping:
    return _Mapping(name, create, size)


def _unlink(name: str) -> bool:
    """Remove the file called `name` if it is there (a crashed predecessor's, of this user):
    another user's, or anything but a regular file or FIFO, is refused (ShmOwnerError)."""
    path = path_of(name)
    try:
        fd = open_checked(path, os.O_RDONLY | os.O_NONBLOCK, None, strict=False)
    except FileNotFoundError:
        return False
    try:
        # Ours: in /dev/shm (sticky) no other user can put another file under its name.
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def unlink_own(path: str, inode: int) -> None:
    """Unlink `path` only if it is still the file we made: a successor of the same name (a
    replica that Ray restarted) may have made a new one already."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _release(shm: _Mapping) -> None:
    try:
        shm.close()
    except BufferError:
        # A caller still holds a view; keep the mapping alive rather than fail. The pages go
        # once the name is unlinked and the process exits.
        _lingering.append(shm)


def _check_name(name: str) -> None:
    if not name.startswith(PREFIX) or "/" in name or len(file_name(name)) > 255:
        raise TransportError(f"shared memory name {name!r} must start with {PREFIX!r} and contain no '/'")


class SharedBuffer:
    """A numpy array over a POSIX shared memory segment named exactly `name`."""

    def __init__(self, name: str, shape, dtype):
        _check_name(name)
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        nbytes = prod(self.shape) * self.dtype.itemsize
        self._shm = _open(name, create=True, size=max(nbytes, 1))
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC
            # instead of SIGBUS-killing whichever process first writes the page.
            os.posix_fallocate(self._shm.fd, 0, self._shm.size)
        except OSError as e:
            self._shm.close()
            os.unlink(self._shm.path)
            raise TransportError(f"cannot reserve {nbytes} bytes of {SHM_DIR} for {name!r}: {e}") from None
        self.array = np.ndarray(self.shape, self.dtype, buffer=self._shm.buf)
        # Fault every page in once here, so no push ever pays for fresh pages.
        np.frombuffer(self._shm.buf, np.uint8).fill(0)

    def close(self, unlink: bool = True) -> None:
        if self._shm is None:
            return
        self.array = None
        inode, path = os.fstat(self._shm.fd).st_ino, self._shm.path
        _release(self._shm)
        self._shm = None
        if unlink:
            unlink_own(path, inode)


def allocate_shared(name: str, shape, dtype) -> SharedBuffer:
    return SharedBuffer(name, shape, dtype)


def cleanup(prefix: str) -> list[str]:
    """Unlink every segment (and control block, doorbell) whose name starts with `prefix`, of this
    user (after delete, Ctrl-C or a crash); returns their names. Another user's file is left."""
    _check_name(prefix)
    try:
        found = sorted(filter(None, (_logical(e.name) for e in os.scandir(SHM_DIR))))
    except FileNotFoundError:
        return []
    removed = []
    for name in (n for n in found if n.startswith(prefix)):
        try:
            if _unlink(name):
                removed.append(name)
        except TransportError as exc:
            log.warning("left in %s: %s", SHM_DIR, exc)
    return removed


class Sender:
    """Source side: maps the target's segment once; send(slot) is one copy into that slot
    (a target with `buffering: double` has two, one after the other)."""

    def __init__(self, array, descriptor: dict):
        name, slots, stride = descriptor["name"], descriptor["slots"], descriptor["stride"]
        check_match(array, descriptor["shape"], descriptor["dtype"], f"shm segment {name}")
        if not isinstance(array, np.ndarray):
            raise TransportError(f"shm segment {name}: source must be a numpy array, got {type(array).__name__}")
        try:
            self._shm = _open(name)
        except FileNotFoundError:
            raise TransportError(f"shm segment {name} does not exist (target closed or not started)") from None
        nbytes = array.nbytes
        stride = max(stride, nbytes)
        if self._shm.size < stride * (slots - 1) + nbytes:
            _release(self._shm)
            raise TransportError(f"shm segment {name} holds {self._shm.size} bytes, {slots} x {nbytes} needed")
        self._src = array
        self._dst = [np.ndarray(array.shape, array.dtype, buffer=self._shm.buf, offset=i * stride)
                     for i in range(slots)]
        if nbytes:
            # Read one byte per page: this maps the target's (already faulted)
            # pages into our page table, writable, without touching its data, so
            # even the first send runs at copy speed.
            np.frombuffer(self._shm.buf, np.uint8, count=stride * (slots - 1) + nbytes)[:: mmap.PAGESIZE].max()

    def send(self, slot: int = 0, source=None) -> None:
        """One copy of `source` (default: the array given at start) into `slot`."""
        # One thread: the copy is memory-bound, and splitting a 256 MiB push over
        # two threads measured slower here (11-12 vs 12-13 GB/s, 2 cores).
        np.copyto(self._dst[slot], self._src if source is None else source)
        return None

    def close(self) -> None:
        if self._shm is None:
            return
        self._src = self._dst = None
        _release(self._shm)  # never unlink: the segment belongs to the target
        self._shm = None
