"""Importing user code by "module:Name", as lint and the actors both do. Kept light: the
actors import this, so it must not pull in pydantic, jinja2 or yaml."""
from __future__ import annotations

import difflib
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


def local_modules() -> list[str]:
    """Top-level modules of the user's own code: imported from a folder (the spec's, the current
    one, a script's, PYTHONPATH), not from the standard library or an installed distribution.
    Other processes (a worker, the `oob` CLI, a script elsewhere) may not be able to import them."""
    import sysconfig
    from importlib.metadata import packages_distributions
    installed = set(packages_distributions()) | set(sys.stdlib_module_names) | {"oobspec", "__main__"}
    system = tuple(str(Path(p).resolve()) + "/" for p in {sysconfig.get_paths()["stdlib"], sys.prefix, sys.base_prefix})
    found = set()
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        path = getattr(module, "__file__", None)
        if not path or top in found or top in installed or top not in sys.modules:
            continue
        path = str(Path(path).resolve())
        if "-packages/" not in path and not path.startswith(system):
            found.add(top)
    return sorted(found)


def ship_by_value() -> list[str]:
    """Make Ray pickle the user's own modules by value, so the actor class (and with it the
    handle's method signatures) loads in any process without importing the user's module."""
    from ray import cloudpickle
    names = local_modules()
    for name in names:
        cloudpickle.register_pickle_by_value(sys.modules[name])
    return names
