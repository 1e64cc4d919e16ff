"""Phase 3: the models are the only source of truth; the committed JSON Schema must match them,
document every field, and the example specs must use it and lint clean."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import oobspec
from oobspec.models import Spec, json_schema, memory_bytes

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "oobspec.schema.json"
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
EXAMPLES = [p for p in SPECS if not p.name.endswith(".values.yaml")]
VALUES = {"web.yaml": [ROOT / "specs" / "web.values.yaml"]}
REGENERATE = ".venv/bin/oob schema > schemas/oobspec.schema.json"


def test_committed_schema_is_current():
    current = json.dumps(json_schema(), indent=2) + "\n"
    assert SCHEMA.read_text() == current, f"schemas/oobspec.schema.json is stale; regenerate it with: {REGENERATE}"


def _properties(schema: dict):
    yield "Spec", schema.get("properties", {})
    for name, definition in schema.get("$defs", {}).items():
        yield name, definition.get("properties", {})


def test_every_field_has_a_description():
    schema = json.loads(SCHEMA.read_text())
    missing = [f"{model}.{field}" for model, props in _properties(schema) for field, p in props.items()
               if not p.get("description")]
    assert missing == []
    assert schema["title"] == "oobspec"
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) == {"version", "name", "actors"}
    assert schema["additionalProperties"] is False


def test_schema_uses_yaml_names():
    schema = json_schema()
    actor = schema["$defs"]["Actor"]["properties"]
    link = schema["$defs"]["Link"]["properties"]
    assert "class" in actor and "class_" not in actor
    assert "from" in link and "from_" not in link


def test_every_model_forbids_unknown_keys():
    schema = json_schema()
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


def test_examples_are_there():
    assert {p.name for p in EXAMPLES} >= {"counter.yaml", "cpu-link.yaml", "gpu-link.yaml", "grpc.yaml",
                                           "process.yaml", "web.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_starts_with_schema_comment(path):
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(r"# yaml-language-server: \$schema=\.\./schemas/oobspec\.schema\.json", first), first
    assert (path.parent / "../schemas/oobspec.schema.json").resolve() == SCHEMA.resolve()


@pytest.mark.parametrize("imports", [True, False], ids=["imports", "no-import"])
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_lints_clean(path, imports):
    diags = oobspec.lint_file(path, value_files=VALUES.get(path.name, ()), imports=imports)
    assert diags == [], "\n".join(map(str, diags))


def test_web_example_needs_its_values():
    codes = {d.code for d in oobspec.lint_file(ROOT / "specs" / "web.yaml")}
    assert codes == {"OOB110"}


def test_validated_example_shapes():
    spec = oobspec.load(ROOT / "specs" / "counter.yaml")
    assert isinstance(spec, Spec) and spec.namespace == "oob-counter"
    counter = spec.actors["counter"]
    assert counter.class_ == "examples.counter:Counter" and counter.replicas == 1 and counter.restarts == -1
    (http,) = counter.servers
    assert (http.protocol, http.host, http.port) == ("http", "127.0.0.1", 8080)
    assert [(r.method, r.path, r.call) for r in http.routes] == [("GET", "/", "get"), ("POST", "/increment", "increment")]
    web = oobspec.load(ROOT / "specs" / "web.yaml", value_files=VALUES["web.yaml"])
    assert [s.name for s in web.actors["frontend"].servers] == ["http"]
    assert web.actors["frontend"].servers[0].auth is None
    assert web.actors["backend"].servers[0].protocol == "grpc"
    link = oobspec.load(ROOT / "specs" / "cpu-link.yaml").links[0]
    assert (link.from_, link.to, link.transport) == ("trainer.weights", ["server.weights"], "auto")


@pytest.mark.parametrize("text, n", [("512MiB", 512 * 1024**2), ("2GB", 2 * 10**9), ("1.5Gi", int(1.5 * 1024**3)),
                                     ("100", 100), (4096, 4096), (None, None), (" 3 KiB ", 3072)])
def test_memory_sizes(text, n):
    assert memory_bytes(text) == n


def test_defaults():
    spec = Spec.model_validate({"version": 1, "name": "d", "actors": {"a": {"command": ["true"]}}})
    a = spec.actors["a"]
    assert (a.replicas, a.restarts, a.args, a.kwargs, a.env, a.connect, a.servers, a.buffers) == \
        (1, 0, [], {}, {}, {}, [], {})
    assert (a.resources.cpus, a.resources.gpus, a.resources.memory) == (None, 0, None)
    assert spec.ray.address is None and spec.links == []
