"""Every call oobspec makes into Ray's non-public API, in one place, each a one-line wrapper.

Tested with Ray 2.50-2.60 (pyproject: ray>=2.50). A Ray upgrade that moves one of these breaks
here and nowhere else. Both sides use it: the control side (the `oob` CLI) and the replicas.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

KV_NAMESPACE = "oobspec"  # the cluster KV namespace of every record oobspec keeps


def kv_get(key: str) -> bytes | None:
    from ray.experimental import internal_kv
    return internal_kv._internal_kv_get(key.encode(), namespace=KV_NAMESPACE)


def kv_put(key: str, value: bytes) -> None:
    from ray.experimental import internal_kv
    internal_kv._internal_kv_put(key.encode(), value, overwrite=True, namespace=KV_NAMESPACE)


def kv_del(key: str) -> None:
    from ray.experimental import internal_kv
    internal_kv._internal_kv_del(key.encode(), namespace=KV_NAMESPACE)


def kv_keys(prefix: str) -> list[str]:
    from ray.experimental import internal_kv
    return [k.decode() for k in internal_kv._internal_kv_list(prefix.encode(), namespace=KV_NAMESPACE)]


def reload_config() -> None:
    """Ray caches its config (token auth among it) at import; read the environment again."""
    from ray._raylet import Config
    Config.initialize("")


def actor_table() -> list[bytes]:
    """Every actor the GCS knows (dead ones included), serialized `ActorTableData`."""
    from ray._private.state import state
    return list(state._connect_and_get_accessor().get_actor_table(None, None))


def session_dir() -> str:
    """This node's Ray session folder (its `logs/` hold the workers' output)."""
    import ray
    return ray._private.worker._global_node.get_session_dir_path()


def walk_upload(folder: Path, excludes: list[str], visit: Callable[[Path], None]) -> None:
    """Visit every file the upload of `folder` takes, with Ray's own exclusion rules."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    _dir_travel(folder, [_get_excludes(folder, excludes)], visit, include_gitignore=True)


def upload_working_dir(env: dict, scratch: str) -> dict:
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    return upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)


def upload_py_modules(env: dict, scratch: str) -> dict:
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    return upload_py_modules_if_needed(env, include_gitignore=True, scratch_dir=scratch)
