"""Typed routes: a method's annotations validate and convert its arguments (pydantic), a wrong
one is a 422 in FastAPI's shape, models and dataclasses travel as bodies and results, and every
HTTP server describes itself at GET /-/openapi.json (OpenAPI 3.1), which schemathesis then
tests. One in-process server on 127.0.0.1 for the module (no Ray), real clients."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import json
import os
import threading
from pathlib import Path
from typing import Annotated

import grpc
import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

import oobspec
from conftest import oob, write_in
from oobspec.contract import ServerConfig
from oobspec.models import GrpcServer, HttpServer
from oobspec.replica.grpc_server import start_grpc
from oobspec.replica.http_server import start_http
from oobspec.replica.servers import Signature, dumps

pytestmark = pytest.mark.timeout(30)

TOKEN_ENV, TOKEN = "OOBSPEC_TYPED_TOKEN", "typed-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Color(enum.Enum):
    red = "red"
    blue = "blue"


class Address(BaseModel):
    city: str
    zip: int


class Person(BaseModel):
    name: str
    age: int = 0
    address: Address | None = None


Coordinate = Annotated[float, Field(ge=-1e6, le=1e6)]


@dataclasses.dataclass
class Point:
    x: Coordinate
    y: Coordinate


@dataclasses.dataclass
class Vector:  # a result: any float (its sum past 1e308 would be inf, which JSON cannot say)
    x: float
    y: float


class Shop:
    async def query(self, n: int, x: float = 0.0, flag: bool = False, ids: list[int] | None = None,
                    color: Color = Color.red, day: datetime.date | None = None) -> dict:
        """Query values, converted."""
        values = {"n": n, "x": x, "flag": flag, "ids": ids, "color": color, "day": day}
        return {"values": values, "types": {k: type(v).__name__ for k, v in values.items()}}

    async def item(self, key: int, word: str = "") -> dict:
        return {"key": key, "word": word}

    async def person(self, person: Person) -> Person:  # the one model: the whole body
        return person.model_copy(update={"age": person.age + 1})

    async def shift(self, p: Point, dx: Coordinate = 1.0) -> Vector:  # a dataclass body, dx from the query
        return Vector(p.x + dx, p.y)

    async def pair(self, a: Point, b: Point, scale: Annotated[int, Field(ge=-100, le=100)] = 1) -> list[Vector]:  # two: each its own key
        return [Vector(a.x * scale, a.y * scale), Vector(b.x * scale, b.y * scale)]

    async def plain(self, word, **rest) -> dict:  # unannotated: strings stay strings
        return {"word": word, "rest": rest}

    def text(self, word: str = "hi") -> str:
        return word


ROUTES = [("GET", "/query", "query"), ("GET", "/items/{key}", "item"), ("POST", "/people", "person"),
          ("POST", "/shift", "shift"), ("POST", "/pair", "pair"), ("POST", "/plain", "plain"),
          ("GET", "/text", "text")]


@pytest.fixture(scope="module")
def url():
    """The server, on its own loop in a thread (requests and schemathesis are synchronous)."""
    os.environ[TOKEN_ENV] = TOKEN
    model = HttpServer(name="http", auth={"token_env": TOKEN_ENV},
                       routes=[{"method": m, "path": p, "call": c} for m, p, c in ROUTES])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_http(Shop(), ServerConfig.of(model)), loop).result(10)
    yield f"http://127.0.0.1:{running.port}"
    asyncio.run_coroutine_threadsafe(running.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    del os.environ[TOKEN_ENV]


def get(url: str, path: str, **kw) -> requests.Response:
    return requests.get(url + path, headers=AUTH, timeout=10, **kw)


def post(url: str, path: str, **kw) -> requests.Response:
    return requests.post(url + path, headers=AUTH, timeout=10, **kw)


# --- conversion ---------------------------------------------------------------------------


def test_query_values_convert_as_fastapi_does(url):
    reply = get(url, "/query?n=5&x=2.5&flag=yes&ids=1&ids=2&color=blue&day=2024-02-29")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "values": {"n": 5, "x": 2.5, "flag": True, "ids": [1, 2], "color": "blue", "day": "2024-02-29"},
        "types": {"n": "int", "x": "float", "flag": "bool", "ids": "list", "color": "Color", "day": "date"}}
    assert get(url, "/query?n=1&flag=off&ids=7").json()["values"] == {
        "n": 1, "x": 0.0, "flag": False, "ids": [7], "color": "red", "day": None}
    assert get(url, "/items/42?word=7").json() == {"key": 42, "word": "7"}  # str: as it came


def test_unannotated_and_str_parameters_cost_nothing(url):
    assert Signature.of(Shop().plain).typed is None and Signature.of(Shop().text).typed is None
    assert Signature.of(Shop().item).typed.adapters[0][0] == "key"  # word: str is not checked
    reply = post(url, "/plain?n=1", json={"word": 5, "deep": {"a": [1]}})
    assert reply.json() == {"word": 5, "rest": {"n": "1", "deep": {"a": [1]}}}


def test_a_model_body_and_result(url):
    reply = post(url, "/people", json={"name": "ada", "age": 36, "address": {"city": "London", "zip": "123"}})
    assert (reply.status_code, reply.json()) == (200, {"name": "ada", "age": 37,
                                                       "address": {"city": "London", "zip": 123}})


def test_a_dataclass_body_and_result_and_a_list_of_them(url):
    assert post(url, "/shift?dx=2", json={"x": 1, "y": 2}).json() == {"x": 3.0, "y": 2.0}
    reply = post(url, "/pair", json={"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 4}, "scale": "2"})
    assert reply.json() == [{"x": 2.0, "y": 4.0}, {"x": 6.0, "y": 8.0}]


def test_results_json_cannot_say_are_serialised_by_pydantic():
    value = {"day": datetime.date(2024, 2, 29), "color": Color.blue, "v": Vector(1, 2),
             "people": [Person(name="ada")], "inf": float("inf"), "nan": [float("nan")], "word": "NaN"}
    assert json.loads(dumps(value)) == {"day": "2024-02-29", "color": "blue", "v": {"x": 1, "y": 2},
                                        "people": [{"name": "ada", "age": 0, "address": None}],
                                        "inf": None, "nan": [None], "word": "NaN"}  # strict JSON: no Infinity


# --- 422 ----------------------------------------------------------------------------------


def invalid(reply: requests.Response) -> list[tuple]:
    assert (reply.status_code, reply.headers["Content-Type"]) == (422, "application/json")
    body = reply.json()
    assert set(body) == {"detail", "error", "status"} and body["status"] == 422
    assert body["error"].startswith("invalid arguments: ")
    assert all(set(e) == {"loc", "msg", "type"} for e in body["detail"])
    return [(tuple(e["loc"]), e["type"]) for e in body["detail"]]


def test_a_bad_query_or_path_value_is_a_422_naming_where(url):
    reply = get(url, "/query?n=five&color=green&day=2023-02-29")
    assert invalid(reply) == [(("query", "n"), "int_parsing"), (("query", "color"), "enum"),
                              (("query", "day"), "date_from_datetime_parsing")]
    assert reply.json()["error"].startswith("invalid arguments: query n: Input should be a valid integer")
    assert invalid(get(url, "/items/abc")) == [(("path", "key"), "int_parsing")]
    assert invalid(get(url, "/query?n=1&ids=1&ids=x")) == [(("query", "ids", 1), "int_parsing")]


def test_a_bad_body_field_nested_in_a_model_is_a_422(url):
    reply = post(url, "/people", json={"name": "ada", "address": {"city": "London", "zip": "N1"}})
    assert invalid(reply) == [(("body", "address", "zip"), "int_parsing")]
    assert invalid(post(url, "/pair", json={"a": {"x": 1, "y": 2}, "b": {"x": "far"}})) == [
        (("body", "b", "x"), "float_parsing"), (("body", "b", "y"), "missing")]


def test_a_body_of_the_wrong_type_is_a_422(url):
    assert invalid(post(url, "/people", json=[1, 2])) == [(("body",), "model_type")]
    assert invalid(post(url, "/shift", json="north")) == [(("body",), "dataclass_type")]
    assert invalid(post(url, "/pair", json={"a": [1, 2], "b": {"x": 1, "y": 1}})) == [(("body", "a"), "dataclass_type")]


def test_missing_and_unexpected_arguments_stay_400(url):
    assert (get(url, "/query").status_code, get(url, "/query").json()["error"]) == (400, "missing argument: n")
    assert get(url, "/query?n=1&m=2").json() == {"error": "unexpected argument: m", "status": 400}
    assert post(url, "/people").json() == {"error": "missing argument: person", "status": 400}


def test_grpc_json_mode_validates_too():
    async def go():
        server = await start_grpc(Shop(), ServerConfig.of(GrpcServer(
            name="rpc", protocol="grpc", service="t.Shop", methods=["pair", "item"])), None)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                pair = channel.unary_unary("/t.Shop/pair")
                ok = await pair(json.dumps({"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 4}}).encode())
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await channel.unary_unary("/t.Shop/item")(b'{"key": "k"}')
            return json.loads(ok), bad.value
        finally:
            await server.stop()
    ok, bad = asyncio.run(go())
    assert ok == [{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}]
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.details().startswith("invalid arguments: key: Input should be a valid integer")


# --- OpenAPI ------------------------------------------------------------------------------


def test_openapi_json_is_valid_openapi_31_and_lists_every_route_with_its_auth(url):
    from schemathesis.specs.openapi.definitions import OPENAPI_31
    reply = requests.get(url + "/-/openapi.json", timeout=10)  # no token: it is public
    assert reply.status_code == 200
    doc = reply.json()
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    assert (doc["openapi"], doc["info"]["title"]) == ("3.1.0", "http")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(m, p) for m, p, _ in ROUTES} | {("GET", "/-/healthz"), ("GET", "/-/openapi.json")}
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert doc["security"] == [{"bearer": []}]  # every route ...
    assert doc["paths"]["/-/healthz"]["get"]["security"] == doc["paths"]["/-/openapi.json"]["get"]["security"] == []
    assert all("security" not in op and "401" in op["responses"] for p, ops in doc["paths"].items()
               if not p.startswith("/-/") for op in ops.values())
    query = {p["name"]: p for p in doc["paths"]["/query"]["get"]["parameters"]}
    assert query["n"] == {"name": "n", "in": "query", "required": True, "schema": {"type": "integer"}}
    assert query["ids"]["schema"]["anyOf"][0] == {"type": "array", "items": {"type": "integer"}}
    people = doc["paths"]["/people"]["post"]
    assert people["requestBody"]["content"]["application/json"]["schema"]["properties"]["address"]["anyOf"][0] == {
        "$ref": "#/components/schemas/Address"}
    assert set(people["responses"]) >= {"200", "400", "401", "422", "500"}
    assert people["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ValidationError"}


def test_schemathesis_finds_no_5xx_and_no_schema_violation(url):
    """Every operation, valid and invalid requests: no 5xx, every answer as documented. (Not
    checked: that invalid data is refused. oob does not check `str` parameters, and schemathesis
    counts query keys it generates but that never reach the wire.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection
    schema = schemathesis.openapi.from_url(url + "/-/openapi.json")
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=st.one_of(operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)))
        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(base_url=url, headers=AUTH, excluded_checks=[negative_data_rejection])

        run()
        tested.append(operation.label)
    # (schemathesis leaves out the operation that serves the schema it loaded)
    assert sorted(tested) == sorted([f"{m} {p}" for m, p, _ in ROUTES] + ["GET /-/healthz"])


# --- lint -----------------------------------------------------------------------------------


def test_lint_names_a_path_param_the_method_does_not_take(tmp_path: Path):
    (tmp_path / "shop.py").write_text("class Shop:\n    def item(self, key: int):\n        return key\n"
                                      "    def any(self, **kw):\n        return kw\n")
    spec = write_in(tmp_path, "version: 1\nname: shop\nactors:\n  shop:\n    class: shop:Shop\n    restarts: -1\n"
                              "    servers:\n      - name: http\n        routes:\n"
                              "          - {path: \"/items/{id}\", call: item}\n"
                              "          - {path: \"/any/{id}\", call: any}\n"
                              "          - {path: \"/by-key/{key}\", call: item}\n")
    out = oob("lint", str(spec))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.strip() == (f"{spec}:10:20: OOB313 route GET /items/{{id}}: path param 'id' is not a parameter "
                                  "of Shop.item (it takes key) (rename the path param or add a parameter 'id')")


# --- inside a replica -----------------------------------------------------------------------


PROBE = """\
import asyncio
from dataclasses import dataclass, field


@dataclass
class Part:
    name: str
    tags: list[str] = field(default_factory=list)


@dataclass
class Order:
    sku: str
    parts: list[Part]
    count: int = 1


class Probe:
    async def loop(self) -> str:
        return type(asyncio.get_running_loop()).__module__

    async def order(self, shop: str, order: Order) -> Order:
        return order

    async def add(self, a: int, b: int = 0) -> dict:
        return {"sum": a + b}
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_replica_runs_on_uvloop_and_its_openapi_names_the_deployment(local_ray, write_spec):
    """uvloop is a dependency, and Ray runs async actors on it when it is installed."""
    import ray
    path = write_spec("""
        version: 1
        name: typed-loop
        actors:
          probe:
            class: probe:Probe
            servers: [{name: web, port: 0, routes: [{path: /add, call: add},
                                                    {method: POST, path: "/orders/{shop}", call: order}]}]
        """)
    (path.parent / "probe.py").write_text(PROBE)
    with oobspec.deploy(oobspec.load(path)) as d:
        url = d.endpoints["probe"]["web"][0]
        loop = ray.get(d.handle("probe").loop.remote())
        doc = requests.get(url + "/-/openapi.json", timeout=10).json()
        added, bad = (requests.get(url + path, timeout=10) for path in ("/add?a=2&b=3", "/add?a=two"))
        # a dataclass body from the user's own module, which travelled with the actor by value
        ordered, unordered = (requests.post(url + "/orders/s1", json=body, timeout=10)
                              for body in ({"sku": "x", "parts": [{"name": "p"}]}, {"sku": "x", "parts": "none"}))
    assert loop.startswith("uvloop")
    assert doc["info"]["title"] == "typed-loop/probe/web"
    assert (added.status_code, added.json()) == (200, {"sum": 5})
    assert (bad.status_code, bad.json()["detail"][0]["loc"]) == (422, ["query", "a"])
    assert (ordered.status_code, ordered.json()) == (200, {"sku": "x", "parts": [{"name": "p", "tags": []}], "count": 1})
    assert (unordered.status_code, unordered.json()["detail"][0]["loc"]) == (422, ["body", "parts"])
