"""Importing user code by "module:Name", as lint and the actors both do. Kept light: the
actors import this, so it must not pull in pydantic, jinja2 or yaml."""
from __future__ import annotations

import difflib
import functools
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def suggest(word: str, choices) -> str | None:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


@contextmanager
def import_path(base_dir: Path | None) -> Iterator[None]:
    """Import as the actors will: from the spec's folder, the current folder, then installed packages."""
    extra = [str(p) for p in (base_dir, Path.cwd()) if p is not None]
    saved = list(sys.path)
    sys.path[:0] = [p for p in extra if p not in sys.path[:len(extra)]]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_object(ref: str) -> Any:
    """'module:Name' → the object. Any failure while importing becomes ImportError."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(str(exc)) from None
    except (Exception, SystemExit) as exc:  # the user's module raised (or called exit) while importing
        raise ImportError(f"importing {module_name} raised {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            hint = suggest(part, names)
            raise ImportError(f"module '{module_name}' has no '{part}'" + (f"; {hint}" if hint else ""))
        obj = getattr(obj, part)
    return obj


@functools.cache
def _system_dirs() -> tuple[str, ...]:
    """Where the standard library and installed packages live: code there imports anywhere."""
    import site
    import sysconfig
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() + [site.getusersitepackages()])
    return tuple(str(Path(p).resolve()) + "/" for p in paths if p)


def is_users_file(path: str) -> bool:
    """A module file of the user's own, not of the standard library or an installed package."""
    return not str(Path(path).resolve()).startswith(_system_dirs())


def local_modules() -> list[str]:
    """Top-level modules of the user's own code: files outside the standard library and the
    site-packages folders (the spec's folder, the current one, a script's, PYTHONPATH, an
    editable install). Other processes (a worker, the `oob` CLI, a script elsewhere, a remote
    node) may not be able to import them."""
    found = set()
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        path = getattr(module, "__file__", None)
        if not path or top in found or top in ("oobspec", "__main__") or top not in sys.modules:
            continue
        if is_users_file(path):
            found.add(top)
    return sorted(found)


def ship_by_value(actor_cls: type) -> list[str]:
    """Make Ray pickle the user's own code by value, so the actor class (and with it the handle's
    method signatures) loads in any process without importing the user's module.

    All of the user's modules travel when they can; a module holding what cannot be pickled
    (a lock, a protobuf pool) falls back to the class's own module alone, then to nothing (the
    class by reference: the workers then need the module on their path). Returns what travels."""
    from ray import cloudpickle
    local = local_modules()
    own = actor_cls.__module__.partition(".")[0]
    for names in (local, [own] if own in local else []):
        for name in names:
            cloudpickle.register_pickle_by_value(sys.modules[name])
        try:
            cloudpickle.dumps(actor_cls)
            return names
        except Exception:
            for name in names:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])
    return []
