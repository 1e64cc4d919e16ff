"""Shared memory that another local user cannot hijack (no Ray): oobspec's files in /dev/shm carry
the user's uid, and every existing file oobspec opens or removes there (a segment, a `.ctl`
control block, a `.bell` doorbell) must be this user's own, of the right kind, writable by it
alone; anything else is a one-line ShmOwnerError and is left as it is.

Another user is simulated by chown-ing planted files to another uid: that needs root (as these
tests run here and in CI); elsewhere they skip."""
from __future__ import annotations

import os
import stat
import uuid

import numpy as np
import pytest

from oobspec.errors import OobError
from oobspec.models import Buffer
from oobspec.replica.buffers import Allocation
from oobspec.transports import shm
from oobspec.transports.base import ShmOwnerError
from oobspec.transports.inbox import MAGIC, Outbox

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")]

OTHER = 65534 if os.geteuid() != 65534 else 65533  # "another local user" (nobody)


def on_disk(name: str, uid: int | None = None) -> str:
    """Where the file oobspec calls `name` lives for user `uid` (shm.path_of: for this user)."""
    path = shm.path_of(name)
    return path if uid is None else path.replace(f"u{os.geteuid()}_", f"u{uid}_", 1)


@pytest.fixture
def seg():
    """A fresh segment name; whatever this user's oobspec left under it is cleaned up after."""
    name = f"oob-own{uuid.uuid4().hex[:10]}-"
    yield name + "data"
    shm.cleanup(name)


@pytest.fixture
def plant():
    """plant(path, kind, uid, mode): a file oobspec did not make, as another user would leave it
    (kind: file, fifo, or link to `to`); removed after the test."""
    made = []

    def make(path: str, kind: str = "file", uid: int = OTHER, mode: int = 0o600, to: str = "") -> os.stat_result:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "link":
            os.symlink(to, path)
        else:
            with open(path, "wb") as f:
                f.write(MAGIC.to_bytes(8, "little") + bytes(4088))  # even a valid-looking control block
        made.append(path)
        if kind != "link":
            os.chmod(path, mode)
        if uid != os.geteuid():
            try:
                os.chown(path, uid, -1, follow_symlinks=False)
            except PermissionError:
                pytest.skip("cannot chown a file to another uid here (needs root): no other user to simulate")
        return os.lstat(path)

    yield make
    for path in made:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def untouched(path: str, before: os.stat_result) -> bool:
    after = os.lstat(path)
    return (after.st_ino, after.st_uid, after.st_mode, after.st_size) == (before.st_ino, before.st_uid,
                                                                          before.st_mode, before.st_size)


def one_line_refusal(exc: BaseException, path: str, *words: str) -> None:
    text = str(exc)
    assert isinstance(exc, ShmOwnerError) and isinstance(exc, OobError), repr(exc)
    assert "\n" not in text and path in text and "remove" in text, text
    assert all(w in text for w in words), text


def test_files_carry_the_uid_are_private_and_another_users_same_name_is_not_in_the_way(seg, plant):
    # Another user's deployment of the same name: its files carry its uid.
    theirs = {suffix: plant(on_disk(seg + suffix, OTHER), "fifo" if suffix == ".bell" else "file")
              for suffix in ("", ".ctl", ".bell")}
    target = Allocation(Buffer(shape=[16]), 1, seg)
    try:
        assert not os.path.lexists(os.path.join(shm.SHM_DIR, seg))  # no name without a user
        for suffix, kind in (("", "file"), (".ctl", "file"), (".bell", "fifo")):
            st = os.lstat(on_disk(seg + suffix))
            assert st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0
            assert (stat.S_ISFIFO if kind == "fifo" else stat.S_ISREG)(st.st_mode)
        assert shm.file_name(seg) == os.path.basename(on_disk(seg))
        # The same user's push path is unchanged.
        outbox = Outbox(seg)
        sender = shm.Sender(np.arange(16, dtype=np.float32),
                            {"name": seg, "shape": (16,), "dtype": "<f4", "slots": 1, "stride": target.stride})
        sender.send(outbox.begin())
        outbox.publish(1, 0)
        assert target.inbox.version == 1 and target.array.tolist() == list(range(16))
        sender.close()
        outbox.close()
    finally:
        target.close()
    assert not [s for s in ("", ".ctl", ".bell") if os.path.lexists(on_disk(seg + s))]
    assert all(untouched(on_disk(seg + s, OTHER), st) for s, st in theirs.items())


@pytest.mark.parametrize("suffix,kind", [("", "file"), (".ctl", "file"), (".bell", "fifo"), (".bell", "file")])
def test_a_target_whose_name_another_user_holds_is_refused_in_one_line(seg, plant, suffix, kind):
    """The unlink-first path (a restarted target replaces its crashed predecessor's files) never
    removes, nor trips over, another user's file: one line saying whose it is and what to do."""
    path = on_disk(seg + suffix)
    before = plant(path, kind)
    with pytest.raises(ShmOwnerError) as caught:
        Allocation(Buffer(shape=[16]), 1, seg)
    one_line_refusal(caught.value, path, f"belongs to uid {OTHER}", f"uid {os.geteuid()}")
    assert untouched(path, before)


def _drained(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


SOURCE_CASES = {
    "segment of another user": ("", "file", OTHER, 0o600, f"belongs to uid {OTHER}"),
    "control block of another user": (".ctl", "file", OTHER, 0o600, f"belongs to uid {OTHER}"),
    "doorbell of another user": (".bell", "fifo", OTHER, 0o600, f"belongs to uid {OTHER}"),
    "regular file of another user as the doorbell": (".bell", "file", OTHER, 0o600, f"belongs to uid {OTHER}"),
    "regular file as the doorbell": (".bell", "file", None, 0o600, "is a regular file, not a FIFO"),
    "doorbell that is a link to a FIFO": (".bell", "link", None, 0o600, "is a symbolic link, not a FIFO"),
    "segment others may write": ("", "file", None, 0o666, "writable by group or others"),
}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_a_source_maps_only_its_own_users_files(seg, plant, tmp_path, case):
    """A target's file replaced under its name (as another user could plant one before the source
    maps it): the source refuses it, so nobody else receives the pushed data or feeds the push."""
    suffix, kind, uid, mode, words = SOURCE_CASES[case]
    target = Allocation(Buffer(shape=[16]), 1, seg)
    path = on_disk(seg + suffix)
    reader = None
    try:
        os.unlink(path)
        decoy = str(tmp_path / "fifo")
        os.mkfifo(decoy, 0o600)
        before = plant(path, kind, os.geteuid() if uid is None else uid, mode, to=decoy)
        if kind in ("fifo", "link"):  # someone reads it, so a write-open would succeed
            reader = os.open(decoy if kind == "link" else path, os.O_RDONLY | os.O_NONBLOCK)
        with pytest.raises(ShmOwnerError) as caught:
            if suffix == "":
                shm.Sender(np.ones(16, np.float32),
                           {"name": seg, "shape": (16,), "dtype": "<f4", "slots": 1, "stride": target.stride})
            else:
                Outbox(seg)
        one_line_refusal(caught.value, path, words)
        assert untouched(path, before)
        if reader is not None:
            assert _drained(reader) == b""  # never rung
    finally:
        if reader is not None:
            os.close(reader)
        target.close()


def test_cleanup_never_removes_another_users_file(seg, plant, caplog):
    prefix = seg[:-len("data")]
    ours = shm.allocate_shared(prefix + "mine", (4,), "u1")
    foreign = {
        on_disk(prefix + "planted"): None,  # under this user's names, but another user's file
        on_disk(prefix + "theirs", OTHER): None,  # the other user's own deployment of the same name
        os.path.join(shm.SHM_DIR, prefix + "legacy"): None,  # a name without a uid
    }
    for path in foreign:
        foreign[path] = plant(path)
    try:
        assert shm.cleanup(prefix) == [prefix + "mine"]
        assert not os.path.lexists(on_disk(prefix + "mine"))
        assert all(untouched(path, st) for path, st in foreign.items())
        assert f"belongs to uid {OTHER}" in caplog.text  # the one under our names is reported, not removed
    finally:
        ours.close()
