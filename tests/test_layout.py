"""The code's layout, checked: where code runs is its folder, imports have no cycle, a replica
loads neither YAML nor the spec loader, and files and functions stay small enough to read."""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "oobspec"

# Longer than 60 lines, and why they stay whole.
LONG_FUNCTIONS: dict[str, str] = {
    "oobspec.loader.build": "one iterative loop over YAML's event stream with its frame stack in locals: "
                            "no recursion, so no nesting depth can crash the loader; split, the frame "
                            "would travel through every call",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every oobspec module this one imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(name, path, set(known)) for name, path in known.items()}
    # A package's own __init__ re-exporting its modules lazily is not a cycle of code.
    graph = {n: {d for d in deps if not (n.startswith(d + ".") and d in ("oobspec",))} for n, deps in graph.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_replica_side_imports_nothing_of_the_control_side_nor_the_spec_layer():
    known = modules()
    for name, path in known.items():
        if name.startswith(("oobspec.replica", "oobspec.transports")):
            bad = {d for d in imports_of(name, path, set(known))
                   if d.startswith("oobspec.control") or d in ("oobspec.loader", "oobspec.render", "oobspec.checks",
                                                              "oobspec.plan", "oobspec.api")}
            assert not bad, f"{name} imports {sorted(bad)}"
    code = ("import sys, oobspec.replica.actor, oobspec.replica.links\n"
            "print(sorted(m for m in sys.modules if m == 'yaml' or m.startswith(('jinja2', 'oobspec.loader', "
            "'oobspec.control'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_file_over_400_lines_and_no_function_over_60():
    long_files = [f"{p.relative_to(PACKAGE)}: {n}" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 400]
    assert not long_files, long_files
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if length > 60 and key not in LONG_FUNCTIONS:
                    long_functions.append(f"{key}: {length} lines")
    assert not long_functions, long_functions


def test_test_modules_share_helpers_through_conftest_only():
    tests = Path(__file__).resolve().parent
    for path in tests.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                raise AssertionError(f"{path.name} imports {node.module}: shared helpers live in conftest.py")


# Where `.get("…")` may read a dict: data that is not oobspec's own (oobspec's own data is typed).
THIRD_PARTY_DICTS = {
    "render.py": "the user's raw YAML, before validation",
    "models.py": "the user's raw input before validation",
    "schema.py": "the generated JSON Schema",
    "checks.py": "the user's raw input; pydantic's error dicts",
    "transports/cuda_ipc.py": "cupy's device properties",
    "control/apply.py": "ray.nodes()",
    "control/replicas.py": "the user's runtime_env",
    "replica/http_server.py": "request headers",
    "replica/grpc_server.py": "gRPC invocation metadata",
}


def test_no_dict_get_on_oobspecs_own_data():
    found = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any('.get("' in line and "environ" not in line for line in p.read_text().splitlines())}
    assert found <= set(THIRD_PARTY_DICTS), sorted(found - set(THIRD_PARTY_DICTS))
