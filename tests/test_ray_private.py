"""Each call oobspec makes into Ray's non-public API (oobspec/ray_private.py), against a real
local Ray: one test per function, so a Ray upgrade that moves one fails here by name."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from oobspec import ray_private

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


@pytest.fixture
def prefix(local_ray):
    """A key prefix of this test's own (the KV outlives a test); its keys are removed at the end."""
    mine = f"oob-test-{uuid.uuid4().hex[:8]}/"
    yield mine
    for key in ray_private.kv_keys(mine):
        ray_private.kv_del(key)


def test_kv_put_and_get_round_trip_bytes_in_oobspecs_namespace(prefix):
    from ray.experimental import internal_kv
    key = prefix + "spec"
    assert ray_private.kv_get(key) is None
    ray_private.kv_put(key, b"\x00first")
    ray_private.kv_put(key, b"\x00second")  # overwrites
    assert ray_private.kv_get(key) == b"\x00second"
    assert internal_kv._internal_kv_get(key.encode(), namespace=ray_private.KV_NAMESPACE) == b"\x00second"
    assert internal_kv._internal_kv_get(key.encode()) is None  # not in the default namespace


def test_kv_keys_lists_by_prefix_only(prefix):
    from ray.experimental import internal_kv
    for key in ("a/1", "a/2", "b/1"):
        ray_private.kv_put(prefix + key, b"x")
    internal_kv._internal_kv_put(f"{prefix}a/3".encode(), b"x", namespace="elsewhere")
    try:
        assert sorted(ray_private.kv_keys(prefix + "a/")) == [prefix + "a/1", prefix + "a/2"]
        assert sorted(ray_private.kv_keys(prefix)) == [prefix + k for k in ("a/1", "a/2", "b/1")]
        assert all(isinstance(k, str) for k in ray_private.kv_keys(prefix))
        assert ray_private.kv_keys(prefix + "none/") == []
    finally:
        internal_kv._internal_kv_del(f"{prefix}a/3".encode(), namespace="elsewhere")


def test_kv_del_removes_one_key(prefix):
    ray_private.kv_put(prefix + "gone", b"1")
    ray_private.kv_put(prefix + "kept", b"2")
    ray_private.kv_del(prefix + "gone")
    ray_private.kv_del(prefix + "never-there")  # no error
    assert ray_private.kv_get(prefix + "gone") is None
    assert ray_private.kv_keys(prefix) == [prefix + "kept"]


def test_reload_config_reads_the_environment_again():
    """In a process of its own: Ray caches its config at import; after reload_config the
    environment's values (token auth among them, the reason it exists) are what Ray says."""
    code = """if True:
        import os
        from ray._raylet import Config, get_authentication_mode
        from oobspec import ray_private
        before = (Config.health_check_period_ms(), get_authentication_mode())
        os.environ["RAY_health_check_period_ms"] = "12345"
        os.environ["RAY_AUTH_MODE"] = "token"
        stale = (Config.health_check_period_ms(), get_authentication_mode())
        ray_private.reload_config()
        print(before == stale, Config.health_check_period_ms(), get_authentication_mode() != before[1])
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_health"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "12345", "True"], out.stdout


def test_actor_table_has_the_actors_as_ActorTableData_dead_ones_too(local_ray):
    import ray
    from ray.core.generated import gcs_pb2

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    name = f"probe-{uuid.uuid4().hex[:8]}"
    probe = Probe.options(name=name, namespace="oob-ray-private").remote()
    pid = ray.get(probe.pid.remote())

    def mine() -> list:
        table = [gcs_pb2.ActorTableData.FromString(raw) for raw in ray_private.actor_table()]
        return [d for d in table if d.name == name and d.ray_namespace == "oob-ray-private"]
    found = mine()
    assert len(found) == 1 and found[0].pid == pid
    assert gcs_pb2.ActorTableData.ActorState.Name(found[0].state) == "ALIVE"
    ray.kill(probe)
    deadline = time.monotonic() + 30
    while gcs_pb2.ActorTableData.ActorState.Name(mine()[0].state) != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gcs_pb2.ActorTableData.ActorState.Name(mine()[0].state) == "DEAD"


def test_session_dir_is_this_nodes_session_with_its_logs(local_ray):
    folder = Path(ray_private.session_dir())
    assert folder.is_dir() and (folder / "logs").is_dir()
    assert folder.name.startswith("session_")
    assert any(p.name.startswith("raylet") for p in (folder / "logs").iterdir())


def test_free_resources_per_node_has_this_nodes_free_cpus(local_ray):
    import ray
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    free = ray_private.free_resources_per_node()
    assert set(free) == {node["NodeID"]}
    assert 0 < free[node["NodeID"]]["CPU"] <= node["Resources"]["CPU"]


def test_walk_upload_visits_what_travels_with_rays_exclusion_rules(tmp_path):
    (tmp_path / "pkg" / "deep").mkdir(parents=True)
    (tmp_path / "cache").mkdir()
    for rel in ("app.py", "pkg/mod.py", "pkg/deep/x.py", "cache/c.bin", "skip.pyc", "git-ignored.txt",
                "pkg/ray-ignored.txt", "refused/r.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / ".gitignore").write_text("git-ignored.txt\n")
    (tmp_path / "pkg" / ".rayignore").write_text("ray-ignored.txt\n")
    visited, asked = [], []

    def skip(path: Path) -> bool:
        asked.append(path.relative_to(tmp_path).as_posix())
        return path.name == "refused"
    ray_private.walk_upload(tmp_path, ["cache/", "*.pyc"], lambda p: visited.append(p), skip=skip)
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in visited)
    # A `dir/` pattern matches what is under the folder, not the folder's own entry (so Ray zips no
    # empty `cache/` either: it is not empty); .gitignore and a subfolder's .rayignore count.
    assert rel == [".", ".gitignore", "app.py", "cache", "pkg", "pkg/.rayignore", "pkg/deep", "pkg/deep/x.py",
                   "pkg/mod.py"]
    # skip is asked only about what the patterns and ignore files let through
    assert sorted(asked) == sorted(rel + ["refused"])
    plain = []
    ray_private.walk_upload(tmp_path, [], lambda p: plain.append(p))
    assert tmp_path / "refused" / "r.txt" in plain and tmp_path / "cache" / "c.bin" in plain


def _package(uri: str) -> list[str]:
    import io
    import zipfile

    from ray.experimental import internal_kv
    with zipfile.ZipFile(io.BytesIO(internal_kv._internal_kv_get(uri))) as z:
        return sorted(n for n in z.namelist() if not n.endswith("/"))


def test_upload_working_dir_returns_a_gcs_uri_of_the_folder(local_ray, tmp_path):
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "big.bin").write_bytes(b"\0" * 100)
    env = ray_private.upload_working_dir({"working_dir": str(tmp_path), "excludes": ["*.bin"]}, str(tmp_path.parent))
    uri = env["working_dir"]
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip")
    assert _package(uri) == ["app.py"]
    again = ray_private.upload_working_dir({"working_dir": str(tmp_path), "excludes": ["*.bin"]}, str(tmp_path.parent))
    assert again["working_dir"] == uri  # content-addressed


def test_upload_py_modules_returns_gcs_uris_of_the_packages(local_ray, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "skip.pyc").write_bytes(b"\0")
    env = ray_private.upload_py_modules({"py_modules": [str(pkg)], "excludes": ["*.pyc"]}, str(tmp_path))
    (uri,) = env["py_modules"]
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip")
    assert _package(uri) == ["mypkg/__init__.py"]
