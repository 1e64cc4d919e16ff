"""What travels to a remote cluster is the spec's folder and nothing outside it. Ray's upload
follows every symlink it meets; oobspec leaves behind (and names) each link that leads out of
the folder or loops, and lets the ones that stay inside travel as Ray would."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from conftest import free_port, oob, started_head, user_env, write_in

SECRET = "outside secret\n"


def outside_world(tmp_path: Path) -> Path:
    """A folder beside the user's project, with what must never travel."""
    out = tmp_path / "outside"
    (out / "d").mkdir(parents=True)
    (out / "secret.txt").write_text(SECRET)
    (out / "d" / "inner.txt").write_text(SECRET)
    return out


def linked_project(tmp_path: Path, loops: bool = True) -> Path:
    """The spec's folder: its own files, links that leave it, links that stay inside, and
    (with `loops`) links that lead back into a folder above them or to each other."""
    out = outside_world(tmp_path)
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "sub").mkdir()
    (proj / "app_mod.py").write_text("class Web:\n    pass\n")
    (proj / "data" / "real.txt").write_text("real\n")
    (proj / "lea k[1]-stay.txt").write_text("stays\n")  # a name the link's pattern must not catch
    (proj / "leak.txt").symlink_to(out / "secret.txt")  # absolute, to a file outside
    (proj / "leakdir").symlink_to(Path("..") / "outside" / "d")  # relative, to a folder outside
    (proj / "sub" / "lea k*.txt").symlink_to(Path("..") / ".." / "outside" / "secret.txt")
    (proj / "inside.txt").symlink_to(Path("data") / "real.txt")  # stays inside: travels
    (proj / "alias").symlink_to("data")  # a folder inside: travels too
    if loops:
        (proj / "sub" / "up").symlink_to("..")  # the folder itself, from below
        (proj / "sub" / "up2").symlink_to(Path("..") / "sub")  # its own folder
        (proj / "a").symlink_to("b")
        (proj / "b").symlink_to("a")
    return proj


def outside_links(tmp_path: Path) -> list[tuple[str, str, str]]:
    out = (tmp_path / "outside").resolve()
    return [("leak.txt", str(out / "secret.txt"), "outside"), ("leakdir", str(out / "d"), "outside"),
            ("sub/lea k*.txt", str(out / "secret.txt"), "outside")]


@pytest.mark.timeout(30)
def test_scan_names_links_that_leave_the_folder_or_loop_and_finishes(tmp_path):
    from oobspec.control import remote
    proj = linked_project(tmp_path)
    (proj / ".gitignore").write_text("ignored\n")
    (proj / "ignored").symlink_to(tmp_path / "outside")  # ignored anyway: not named
    up = remote.scan(proj)
    real = proj.resolve()
    assert [tuple(s) for s in up.skipped] == sorted(outside_links(tmp_path) + [
        ("a", "b", "loop"), ("b", "a", "loop"), ("sub/up", str(real), "loop"), ("sub/up2", str(real / "sub"), "loop")])
    assert up.warnings()[0] == "warning: not uploading a -> b: a symlink loop"
    assert f"warning: not uploading leak.txt -> {tmp_path.resolve() / 'outside' / 'secret.txt'}: " \
           "it leads out of the spec's folder" in up.warnings()
    # app_mod.py, .gitignore, lea k[1]-stay.txt, and "real\n" three times: data/, inside.txt, alias/
    assert (up.files, up.bytes) == (6, 20 + 8 + 6 + 3 * 5), up
    assert up.excludes[-len(up.skipped):] == ["/a", "/b", "/leak.txt", "/leakdir", "/sub/lea[ ]k\\*.txt", "/sub/up",
                                              "/sub/up2"]
    assert remote.excludes(proj) == up.excludes


def packaged(uri: str) -> dict[str, bytes]:
    """The files of an uploaded working_dir, as the cluster's package store holds them."""
    from ray.experimental import internal_kv
    data = internal_kv._internal_kv_get(uri)
    assert data, uri
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {info.filename: z.read(info) for info in z.infolist() if not info.is_dir()}


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_upload_leaves_outside_links_behind_and_takes_inside_ones(local_ray, tmp_path, capsys):
    from oobspec.control import remote
    proj = linked_project(tmp_path)
    env = remote.package_env(proj)
    assert env["working_dir"].startswith("gcs://")
    files = packaged(env["working_dir"])
    assert sorted(files) == ["alias/real.txt", "app_mod.py", "data/real.txt", "inside.txt", "lea k[1]-stay.txt"]
    assert files["inside.txt"] == files["alias/real.txt"] == b"real\n"
    assert SECRET.encode() not in files.values()
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning:")] == remote.scan(proj).warnings()
    assert len(err) >= 7 and "warning: not uploading sub/up2 -> " in "\n".join(err)


@pytest.fixture(scope="module")
def head():
    """`ray start --head` of our own with a Ray Client port and the job API; its addresses."""
    gcs, client, dashboard = free_port(), free_port(), free_port()
    with started_head(f"--port={gcs}", f"--ray-client-server-port={client}", f"--dashboard-port={dashboard}",
                      "--dashboard-host=127.0.0.1", ports=(gcs, client, dashboard)):
        for _ in range(3):  # a fresh head's client server can miss oob's 15 s deadline once, on a busy machine
            if oob("list", "--address", f"ray://127.0.0.1:{client}").returncode == 0:
                break
        yield {"client": f"ray://127.0.0.1:{client}", "jobs": f"http://127.0.0.1:{dashboard}"}


SPEC = """
version: 1
name: {name}
actors:
  web:
    class: app_mod:Web
"""


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("via", ["client", "jobs"])
def test_oob_plan_warns_of_each_link_left_behind(head, tmp_path, via):
    proj = linked_project(tmp_path, loops=False)
    spec = write_in(proj, SPEC.format(name=f"links-{via}"))
    out = oob("plan", spec, "--address", head[via], cwd=tmp_path / "outside", env=user_env())
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: not uploading")]
    assert warnings == [f"warning: not uploading {path} -> {target}: it leads out of the spec's folder"
                        for path, target, _why in outside_links(tmp_path)], out.stderr
    if via == "client":  # app_mod.py, spec.yaml, data/real.txt, lea k[1]-stay.txt, inside.txt, alias/real.txt
        assert f"upload: {proj.resolve()} (6 files," in out.stdout, out.stdout
    else:
        assert "· uploading " in out.stderr and "(6 files," in out.stderr, out.stderr
