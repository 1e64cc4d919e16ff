"""Phase 3 — validate: the spec's models. One strict base, every field documented.

`oob schema` and schemas/oobspec.schema.json are `Spec.model_json_schema()`: the models are
the only source of truth. Nothing here imports ray.
"""
from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ByteSize, TypeAdapter, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      field_validator, model_validator)

from .contract import namespace_of
from .scalars import scalar_text

NAME_RE = r"^[a-z][a-z0-9-]{0,62}$"
ACTOR_RE = r"^[a-z][a-z0-9-]*$"
REF_RE = r"^[a-z][a-z0-9-]*\.[A-Za-z_][A-Za-z0-9_-]*$"
MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|K|M|G|T|Ki|Mi|Gi|Ti)?\s*$")
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64", "complex64", "complex128")
DTYPE_SIZES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2, "int32": 4,
               "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8, "complex64": 8,
               "complex128": 16}


def _text(value: Any) -> Any:
    # YAML scalars that merely look like numbers or booleans are fine where text is wanted.
    if isinstance(value, (int, float)) and not isinstance(value, str):
        return scalar_text(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]


@functools.cache
def _byte_size() -> TypeAdapter:
    return TypeAdapter(ByteSize)  # built on first use: a replica imports this module and never needs it


def memory_bytes(value: int | str | None) -> int | None:
    """Bytes of a size as MEMORY_RE accepts it (pydantic's ByteSize; Kubernetes' Gi is its GiB)."""
    if value is None or isinstance(value, int):
        return value
    return int(_byte_size().validate_python(value.strip() + ("B" if value.strip().endswith("i") else "")))


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, types are not coerced."""

    # defer_build: validators are built at the first validation (loading a spec), not at import;
    # a replica only unpickles models, and starts that much sooner.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, use_attribute_docstrings=False,
                              defer_build=True)


WhenField = Annotated[
    Union[bool, str, None],
    Field(description="Template condition; a falsy result leaves this item out of the rendered spec. "
          "Evaluated by `oob render`, so it never reaches the runtime."),
]


class RayConfig(Strict):
    address: Annotated[Union[str, None], Field(
        description='Ray cluster to deploy to. null: start an embedded local Ray and run in the '
                    'foreground; "auto": the cluster running on this machine; "ray://host:10001" '
                    'or "host:6379": that cluster (actors are detached). `--address` and '
                    'RAY_ADDRESS win over this.')] = None
    runtime_env: Annotated[dict[str, Any], Field(
        description="Ray runtime_env applied to every actor (merged under each actor's own `env`).")] = {}
    placement: Annotated[Union[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], None], Field(
        description="Put every replica in one placement group with this strategy.")] = None


class Resources(Strict):
    cpus: Annotated[Union[float, None], Field(
        ge=0, description="CPUs held by each replica (Ray num_cpus). Default: Ray's actor default "
                          "(none held once running), so small replicas fit anywhere.")] = None
    gpus: Annotated[float, Field(ge=0, description="GPUs per replica (Ray num_gpus).")] = 0
    memory: Annotated[Union[int, str, None], Field(
        description="Memory per replica for scheduling: bytes, or a size such as 512MiB, 2GB.")] = None
    custom: Annotated[dict[str, float], Field(
        description="Custom Ray resources per replica, e.g. {accelerator_h100: 1}.")] = {}

    @field_validator("memory")
    @classmethod
    def _memory_format(cls, value):
        if isinstance(value, str) and not MEMORY_RE.match(value):
            raise ValueError(f"'{value}' is not a size: use bytes or a number with a unit such as 512MiB or 2GB")
        if isinstance(value, int) and value < 0:
            raise ValueError("memory must not be negative")
        return value


class Auth(Strict):
    token_env: Annotated[str, Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the bearer token. Clients send "
                    "`Authorization: Bearer <token>` (HTTP) or `authorization` metadata (gRPC). "
                    "`oob apply` forwards the variable from its own environment; the value is never printed.")]


class Route(Strict):
    method: Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"], Field(
        description="HTTP method.")] = "GET"
    path: Annotated[str, Field(
        pattern=r"^/", description='URL path; `{name}` segments become keyword arguments, e.g. "/items/{key}".')]
    call: Annotated[str, Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Method of the actor's class to call. Path params, query params and a JSON "
                    "object body become its keyword arguments; the result is JSON (str: text/plain, "
                    "bytes: application/octet-stream).")]


class Tls(Strict):
    cert: Annotated[str, Field(description="PEM certificate (chain) file, relative to the spec's folder.")]
    key: Annotated[str, Field(description="PEM private key file, relative to the spec's folder.")]


class Served(Strict):
    """What HTTP and gRPC servers (run by oob, not by a command) share."""

    tls: Annotated[Union[Tls, None], Field(
        description="Serve TLS (https / a secure gRPC port) with this certificate and key.")] = None
    max_inflight: Annotated[int, Field(
        ge=1, description="Requests handled at once; the one past it gets 503 with Retry-After "
                          "(gRPC RESOURCE_EXHAUSTED) at once, never a wait.")] = 1024
    timeout: Annotated[Union[float, None], Field(
        gt=0, description="Seconds a request may take; past it 504 (gRPC DEADLINE_EXCEEDED). "
                          "null: no limit.")] = None
    errors: Annotated[Literal["safe", "detailed"], Field(
        description="What a method that raises tells the client. safe: a 500 (gRPC INTERNAL) says `internal "
                    "error` and an id, which `oob logs` shows beside the traceback. detailed: the exception's "
                    "type and message too (for development: messages carry paths, queries, keys).")] = "safe"
    error_status: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")], Annotated[int, Field(ge=400, le=599)]], Field(
        description="Exception class name -> HTTP status (400-599), e.g. {KeyError: 404}: an exception of that "
                    "class, or of a class derived from it, answers that status with its message (gRPC: the "
                    "matching code, 404 NOT_FOUND). A method may also raise oobspec.HTTPError(status, message).")] = {}


class ServerBase(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                               description="Server name, unique within the actor; `<actor>.<name>` in `connect`.")]
    host: Annotated[str, Field(description="Address to bind. 0.0.0.0 only on purpose (and with auth); "
                                           "`node`: the address Ray knows the node by.")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="Port to bind; 0 picks a free one. With replicas > 1, "
                                                            "replica i binds port + i (unless shared).")] = 0
    shared: Annotated[bool, Field(description="Every replica on a node binds the same port (SO_REUSEPORT: the "
                                              "kernel spreads new connections); one URL per node. A draining "
                                              "replica's queue moves to the others where "
                                              "net.ipv4.tcp_migrate_req is 1.")] = False
    auth: Annotated[Union[Auth, None], Field(description="Require a bearer token.")] = None
    when: WhenField = None


class HttpServer(Served, ServerBase):
    protocol: Annotated[Literal["http"], Field(description="HTTP/1.1 server inside the actor's event loop.")] = "http"
    routes: Annotated[list[Route], Field(description="HTTP routes, each calling a method of the actor. "
                                                     "GET /-/healthz is always there (no auth): 200 ready, "
                                                     "503 draining.")] = []
    max_body: Annotated[int, Field(ge=1, description="Largest request body accepted, in bytes (larger: 413).")] = 1024**2
    header_timeout: Annotated[float, Field(
        gt=0, description="Seconds a client has to send a request's headers once it connects or "
                          "after its last response; then the connection is closed (a slow client "
                          "cannot hold it forever).")] = 10


class GrpcServer(Served, ServerBase):
    protocol: Annotated[Literal["grpc"], Field(description="grpc.aio server inside the actor.")]
    service: Annotated[Union[str, None], Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$",
        description="Full service name for the JSON mode: methods are /<service>/<call>.")] = None
    methods: Annotated[list[str], Field(
        description="Methods of the actor's class served in the JSON mode: the request is a JSON "
                    "object of keyword arguments, the response the JSON-encoded result.")] = []
    proto: Annotated[Union[str, None], Field(
        pattern=r"^[A-Za-z_][\w.]*:add_\w+Servicer_to_server$",
        description="Generated `module:add_<Service>Servicer_to_server` function: the actor "
                    "instance itself is registered as the servicer.")] = None


class TcpServer(ServerBase):
    protocol: Annotated[Literal["tcp"], Field(
        description="A port the actor (or its wrapped command) listens on; only health-checked by connecting.")]


def _protocol_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("protocol", "http") if isinstance(value.get("protocol", "http"), str) else "http"
    return getattr(value, "protocol", "http")


Server = Annotated[
    Union[Annotated[HttpServer, Tag("http")], Annotated[GrpcServer, Tag("grpc")], Annotated[TcpServer, Tag("tcp")]],
    Discriminator(_protocol_of, custom_error_type="invalid_protocol",
                  custom_error_message="protocol must be one of http, grpc, tcp"),
]


PART_ALIGN = 256  # every part of a layout starts on this many bytes (what GPU kernels and DLPack like)


def storage_dtype(dtype: str) -> str:
    """The numpy dtype that holds `dtype`: numpy has no bfloat16, so its bits live in uint16
    (`ctx.tensor` / `ctx.tensors` give real torch.bfloat16)."""
    return "uint16" if dtype == "bfloat16" else dtype


class Part(Strict):
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, description="The part's shape.")]
    dtype: Annotated[Literal[DTYPES], Field(description="Element type (numpy name, or bfloat16).")] = "float32"

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def __str__(self) -> str:
        return f"{self.dtype}{self.shape}"


class Buffer(Strict):
    shape: Annotated[Union[list[Annotated[int, Field(ge=1)]], None], Field(
        min_length=1, description="Array shape (or `layout`).")] = None
    dtype: Annotated[Literal[DTYPES], Field(
        description="Element type (numpy name, or bfloat16: uint16 bits in numpy, torch.bfloat16 in ctx.tensor).")] = "float32"
    layout: Annotated[Union[dict[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.-]*$")], Part], None], Field(
        min_length=1,
        description="Named parts in one allocation instead of shape/dtype, each {shape, dtype}, "
                    f"{PART_ALIGN}-byte aligned: one copy per push; ctx.views(b) / ctx.tensors(b) give the parts.")] = None
    device: Annotated[Literal["cpu", "gpu"], Field(
        description="cpu: numpy array (in shared memory when it is a link target); gpu: cupy array "
                    "(needs resources.gpus > 0).")] = "cpu"

    @model_validator(mode="after")
    def _shape_or_layout(self):
        if (self.shape is None) == (self.layout is None):
            raise ValueError("set exactly one of 'shape' or 'layout'")
        if self.layout is not None and "dtype" in self.model_fields_set:
            raise ValueError("'dtype' goes on each part of a 'layout'")
        return self

    def parts(self) -> dict[str, tuple[int, Part]]:
        """name -> (byte offset, part), each offset a multiple of PART_ALIGN; {} without a layout."""
        out, offset = {}, 0
        for name, part in (self.layout or {}).items():
            out[name] = (offset, part)
            offset += -(-part.nbytes // PART_ALIGN) * PART_ALIGN
        return out

    @property
    def nbytes(self) -> int:
        if self.layout is not None:
            offset, last = list(self.parts().values())[-1]
            return offset + last.nbytes
        return Part(shape=self.shape, dtype=self.dtype).nbytes

    def storage(self) -> tuple[tuple[int, ...], str]:
        """(shape, numpy dtype) of the array that holds it: a layout is one flat uint8 array."""
        if self.layout is not None:
            return (self.nbytes,), "uint8"
        return tuple(self.shape), storage_dtype(self.dtype)

    def signature(self) -> str:
        """What both ends of a link must agree on, as lint prints it."""
        if self.layout is not None:
            return "{" + ", ".join(f"{n}: {p}" for n, p in self.layout.items()) + "}"
        return f"{self.dtype}{self.shape}"


class Actor(Strict):
    class_: Annotated[Union[str, None], Field(
        alias="class", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='"module:Class", importable from the spec\'s folder, the current folder or '
                    "installed packages. Exactly one of class / command.")] = None
    command: Annotated[Union[list[Text], None], Field(
        min_length=1, description='A program the actor runs and supervises, e.g. ["redis-server", '
                                  '"--port", "{port}"]; {port} is the port of its first server.')] = None
    cwd: Annotated[Union[Text, None], Field(description="Working folder of the command, relative to the spec's folder "
                    "(default: that folder; on a remote cluster, inside the working_dir the folder travels as).")] = None
    args: Annotated[list[Any], Field(description="Positional arguments for __init__.")] = []
    kwargs: Annotated[dict[str, Any], Field(description="Keyword arguments for __init__.")] = {}
    replicas: Annotated[int, Field(ge=1, description="Replica i is the Ray actor <actor>-<i>.")] = 1
    resources: Annotated[Resources, Field(description="Ray resources per replica.")] = Resources.model_construct()
    restarts: Annotated[int, Field(ge=-1, description="Ray max_restarts (-1: forever). For command "
                                                      "actors also how often the command is restarted.")] = 0
    env: Annotated[dict[str, Text], Field(description="Environment variables of the actor process.")] = {}
    connect: Annotated[dict[str, Annotated[str, Field(pattern=REF_RE)]], Field(
        description="Peers this actor needs: KEY: <actor>.<server>. The actor starts after them and "
                    "gets OOB_<KEY>_URL(S) and oobspec.context().endpoints[KEY].")] = {}
    servers: Annotated[list[Server], Field(description="Servers run inside the actor.")] = []
    buffers: Annotated[dict[str, Buffer], Field(
        description="Arrays allocated by the runtime, reached with oobspec.context().buffers[name].")] = {}
    update: Annotated[Literal["rolling", "stop-first"], Field(
        description="How a changed replica is replaced. rolling: its successor starts first and shares "
                    "its ports (SO_REUSEPORT), then it drains; one replica at a time, no downtime. "
                    "stop-first: it stops, then its successor starts (for an actor that must never "
                    "run twice at once, or that has no room for a second copy). Actors that wrap a "
                    "command, bind tcp ports themselves, have no servers, take part in links or use a "
                    "placement group are always replaced stop-first; `oob plan` says so.")] = "rolling"
    drain: Annotated[float, Field(
        ge=0, description="Seconds a replica that is replaced or removed has to finish in-flight "
                          "requests once it stops accepting.")] = 10
    max_per_node: Annotated[Union[int, None], Field(ge=1, description="At most this many replicas on a node (Ray "
                                                    "Serve's max_replicas_per_node); stand-ins do not count.")] = None
    labels: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9]([\w./-]*[A-Za-z0-9])?$")], str], Field(
        description="Ray node labels the replicas' nodes must have (`ray start --labels k=v`; Ray's "
                    "label_selector values: `v`, `!v`, `in(a,b)`, `!in(a,b)`).")] = {}
    no_room: Annotated[Literal["stop-first", "wait"], Field(description="When a rolling stand-in has no room on its "
                                                            "replica's node: replace stop-first, or wait for room.")] = "stop-first"
    when: WhenField = None

    @model_validator(mode="after")
    def _class_or_command(self):
        if (self.class_ is None) == (self.command is None):
            raise ValueError("set exactly one of 'class' or 'command'")
        if self.cwd is not None and self.command is None:
            raise ValueError("'cwd' is the working folder of a 'command'; a class actor has none")
        return self


class Link(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$", description="Link name, used by push and `oob sync`.")]
    from_: Annotated[str, Field(alias="from", pattern=REF_RE, description="Source <actor>.<buffer>.")]
    to: Annotated[list[Annotated[str, Field(pattern=REF_RE)]], Field(
        min_length=1, description="Targets <actor>.<buffer>; every replica of each target receives the data.")]
    transport: Annotated[Literal["auto", "cuda_ipc", "nccl", "shm", "object_store"], Field(
        description="auto: cuda_ipc for gpu buffers on one node (nccl between two GPUs without peer "
                    "access), nccl across nodes; shm for cpu buffers on one node, object_store across "
                    "nodes.")] = "auto"
    buffering: Annotated[Literal["single", "double", "triple"], Field(
        description="single: one copy; a push waits for readers (ctx.reading) and readers for a push. "
                    "double: two copies; a push fills the one that is not current, then flips, so "
                    "ctx.buffers[b] is always a complete version; it waits if a reader holds that one. "
                    "triple: three; a push never waits for one held snapshot.")] = "single"
    timeout: Annotated[float, Field(
        gt=0, description="Seconds a push waits for readers to let go of the slot it needs (and for an "
                          "nccl broadcast to finish), and a reader for a push in progress; then it fails "
                          "naming the target.")] = 10
    when: WhenField = None

    @field_validator("to", mode="before")
    @classmethod
    def _one_target(cls, value):
        return [value] if isinstance(value, str) else value


class Spec(Strict):
    """An oobspec deployment: actors, the servers inside them, wrapped processes and buffer links."""

    version: Annotated[Literal[1], Field(description="Spec format version.")]
    name: Annotated[str, Field(pattern=NAME_RE, description='Deployment name; the Ray namespace is "oob-<name>".')]
    ray: Annotated[RayConfig, Field(description="Where and how to run on Ray.")] = RayConfig.model_construct()
    actors: Annotated[dict[Annotated[str, Field(pattern=ACTOR_RE)], Actor], Field(
        min_length=1, description="Actors by name.")]
    links: Annotated[list[Link], Field(description="Buffer transfer links between actors.")] = []

    # Where the spec came from (rendered document with positions, its folder): set by oobspec.load.
    _source: Any = PrivateAttr(default=None)

    @property
    def namespace(self) -> str:
        return namespace_of(self.name)

    def record(self) -> dict:
        """The spec as the cluster keeps it: what the user set (defaults are not written, so a
        field that may not be set beside another validates again), as JSON."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
