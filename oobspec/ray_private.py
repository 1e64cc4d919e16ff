"""Every call oobspec makes into Ray's non-public API, in one place, each a thin wrapper.

Tested with Ray 2.60 only, by tests/test_ray_private.py: one test per function against a real
local Ray (the KV round trip with keys by prefix and delete, reload_config, an actor of the test
found in actor_table's ActorTableData, the session folder and its logs/, walk_upload's files and
excludes, both uploads returning gcs:// URIs, free resources per node). A Ray upgrade that moves one of these breaks here
and in that test, nowhere else. Both sides use it: the control side (the `oob` CLI) and the
replicas.
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


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """node id -> the resources free on it now (one none of is free is left out)."""
    from ray._private.state import available_resources_per_node
    return available_resources_per_node()


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


def walk_upload(folder: Path, excludes: list[str], visit: Callable[[Path], None],
                skip: Callable[[Path], bool] | None = None) -> None:
    """Visit every path the upload of `folder` takes, with Ray's own exclusion rules (the
    patterns, `.gitignore` and `.rayignore`); then `skip(path)`, only about what those let
    through: a path it refuses is neither visited nor, for a folder, entered."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    rules = [_get_excludes(folder, excludes)]
    if skip is not None:  # asked last: _dir_travel appends the ignore files' rules to this list
        rules.append(lambda path: any(rule(path) for rule in rules[2:]) or skip(path))
    _dir_travel(folder, rules, visit, include_gitignore=True)


def upload_working_dir(env: dict, scratch: str) -> dict:
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    return upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)


def upload_py_modules(env: dict, scratch: str) -> dict:
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    return upload_py_modules_if_needed(env, include_gitignore=True, scratch_dir=scratch)
