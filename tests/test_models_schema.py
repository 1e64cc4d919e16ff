"""Phase 3: the models are the only source of truth; the committed JSON Schema must match them,
document every field, and the example specs must use it and lint clean."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

import oobspec
from oobspec.models import Spec, memory_bytes
from oobspec.schema import json_schema

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "oobspec.schema.json"
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
EXAMPLES = [p for p in SPECS if not p.name.endswith(".values.yaml")]
VALUES = {"web.yaml": [ROOT / "specs" / "web.values.yaml"]}
REGENERATE = ".venv/bin/oob schema > schemas/oobspec.schema.json"
SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/oobspec.schema.json"
# Templates ("{{ n }}" where an int is wanted) only validate once rendered, so they carry no $schema line.
TEMPLATES = [p for p in EXAMPLES if "{{" in p.read_text()]


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
    lines = path.read_text().splitlines()
    if path in TEMPLATES:
        assert not any("$schema=" in line for line in lines), f"{path.name} is a template: it fails the schema raw"
        assert "rendered output validates" in " ".join(lines[:3]), "say why the template has no $schema line"
        return
    assert lines[0] == SCHEMA_COMMENT
    assert (path.parent / "../schemas/oobspec.schema.json").resolve() == SCHEMA.resolve()


def test_web_example_is_the_template():
    assert [p.name for p in TEMPLATES] == ["web.yaml"]


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(data) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(data)]


@pytest.mark.parametrize("path", [p for p in SPECS if p.read_text().startswith(SCHEMA_COMMENT)],
                         ids=lambda p: p.stem)
def test_files_with_the_schema_comment_validate_raw(path):
    # What an editor (yaml-language-server) checks: the file as written, templates unrendered.
    assert _errors(yaml.safe_load(path.read_text())) == []


def test_every_spec_file_carries_the_schema_comment_or_is_a_template_or_values():
    commented = {p for p in SPECS if SCHEMA_COMMENT in p.read_text()}
    values = {p for p in SPECS if p.name.endswith(".values.yaml")}
    assert commented | set(TEMPLATES) | values == set(SPECS)
    assert not commented & set(TEMPLATES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_rendered_example_validates_against_the_schema(path):
    spec = oobspec.load(path, value_files=VALUES.get(path.name, ()))
    assert _errors(spec._source.document.data) == []


def _with_server(server) -> dict:
    return {"version": 1, "name": "t", "actors": {"a": {"class": "m:C", "servers": [server]}}}


@pytest.mark.parametrize("server, at, says", [
    ({"name": "h", "port": "x"}, ["port"], "'x' is not of type 'integer'"),
    ({"name": "h", "protocol": "http", "port": 70000}, ["port"], "70000 is greater than the maximum of 65535"),
    ({"name": "h", "prot": 1}, [], "('prot' was unexpected)"),
    ({"name": "h", "routes": [{"path": "x", "call": "f"}]}, ["routes", 0, "path"], "'x' does not match '^/'"),
    ({"name": "g", "protocol": "grpc", "methodz": []}, [], "('methodz' was unexpected)"),
    ({"name": "g", "protocol": "grpc", "methods": "get"}, ["methods"], "'get' is not of type 'array'"),
    ({"name": "g", "protocol": "grpc", "routes": []}, [], "('routes' was unexpected)"),
    ({"name": "t", "protocol": "tcp", "methods": []}, [], "('methods' was unexpected)"),
    ({"name": "t", "protocol": "tcp", "port": -1}, ["port"], "-1 is less than the minimum of 0"),
    ({"name": "f", "protocol": "ftp"}, ["protocol"], "'ftp' is not one of ['http', 'grpc', 'tcp']"),
    ({"name": "f", "protocol": 1}, ["protocol"], "1 is not one of ['http', 'grpc', 'tcp']"),
    ("http", [], "'http' is not of type 'object'"),
], ids=["http-port-type", "http-port-max", "http-unknown-key", "http-route-path", "grpc-unknown-key",
        "grpc-methods-type", "grpc-http-only-key", "tcp-grpc-only-key", "tcp-port-min", "unknown-protocol",
        "protocol-type", "not-a-mapping"])
def test_schema_errors_in_a_server_name_the_field(server, at, says):
    """The variant is chosen by `protocol` (http when absent), so the error names the wrong field
    instead of "is not valid under any of the given schemas"; and the models refuse it too."""
    data = _with_server(server)
    errors = list(_validator().iter_errors(data))
    assert [(list(e.absolute_path), e.message) for e in errors] == \
        [(["actors", "a", "servers", 0, *at], errors[0].message)], errors
    assert says in errors[0].message
    best = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    assert list(best.absolute_path) == ["actors", "a", "servers", 0, *at]
    with pytest.raises(ValidationError):
        Spec.model_validate(data)


@pytest.mark.parametrize("server", [
    {"name": "h"}, {"name": "h", "protocol": "http", "routes": [{"path": "/", "call": "get"}], "max_body": 10},
    {"name": "g", "protocol": "grpc", "service": "a.B", "methods": ["get"]},
    {"name": "t", "protocol": "tcp", "port": 6379, "auth": {"token_env": "T"}},
])
def test_schema_accepts_each_server_variant(server):
    assert _errors(_with_server(server)) == []
    Spec.model_validate(_with_server(server))


def test_servers_are_chosen_by_protocol_not_one_of():
    schema = json_schema()
    items = schema["$defs"]["Actor"]["properties"]["servers"]["items"]
    assert [(b["if"]["properties"]["protocol"]["const"], b["then"]["$ref"]) for b in items["allOf"]] == [
        ("http", "#/$defs/HttpServer"), ("grpc", "#/$defs/GrpcServer"), ("tcp", "#/$defs/TcpServer")]
    assert "required" not in items["allOf"][0]["if"]  # no protocol: http, as the models default
    assert "oneOf" not in json.dumps(schema)


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
