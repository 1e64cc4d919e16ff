"""Code versions: a digest of the source an actor's class runs, so that editing it and
re-applying replaces that actor (and `oob plan` says "code changed").

The digest covers the module that defines the class and, following its import statements,
the user's own modules it imports (those found outside the standard library and installed
packages), read as files (finding `a.b` imports the package `a`, as lint does). Installed
packages do not count, editable installs included (oobspec itself, whatever the install):
upgrading them is a deployment of its own.

The digest is over module names and file contents, never paths: it is the same whichever way
`oob` connects (embedded, an address, `ray://`, Ray Jobs, where the spec's folder is unpacked
elsewhere on the cluster).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from .imports import import_path, is_users_file


def _is_users(origin: str | None) -> bool:
    return bool(origin) and origin.endswith(".py") and is_users_file(origin)


@functools.cache
def _installed() -> frozenset[str]:
    """Top-level names that installed distributions provide (editable installs too)."""
    try:
        return frozenset(importlib.metadata.packages_distributions()) | {"oobspec"}
    except Exception:
        return frozenset({"oobspec"})


def _find(name: str) -> str | None:
    if name.partition(".")[0] in _installed():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    return spec.origin if spec and _is_users(spec.origin) else None


def _imports(path: str, package: str) -> set[str]:
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if base)
    return {n for n in names if n}


def code_digest(class_ref: str, base_dir: Path | None) -> str:
    """16 hex digits over the source files the class's module and its local imports are made of."""
    module = class_ref.partition(":")[0]
    with import_path(base_dir):
        files: dict[str, str] = {}
        todo = [(module, _find(module))]
        while todo:
            name, origin = todo.pop()
            if origin is None or origin in files:
                continue
            files[origin] = name
            package = name if origin.endswith("__init__.py") else name.rpartition(".")[0]
            todo += [(n, _find(n)) for n in _imports(origin, package)]
    digest = hashlib.sha256()
    for origin, name in sorted(files.items(), key=lambda item: item[1]):
        digest.update(name.encode() + b"\0")
        digest.update(Path(origin).read_bytes())
    return digest.hexdigest()[:16]
