"""The contract across the Ray boundary: what the driver sends a replica, what a replica
reports back, and the names both sides derive (replicas, stand-ins, segments, URLs).

Defined once, here; apply, the actor, its servers and links, observation and status all use
these types. Nothing here imports ray, or pydantic (a replica with no buffers never does).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Ref:
    """`<actor>.<member>`: a server in `connect`, a buffer in a link's `from` / `to`."""

    actor: str
    member: str

    @classmethod
    def parse(cls, text: str) -> "Ref":
        actor, _, member = text.partition(".")
        return cls(actor, member)

    def __str__(self) -> str:
        return f"{self.actor}.{self.member}"


@dataclass(frozen=True)
class Topology:
    """Where one replica runs: what `auto` transport selection needs to know."""

    node_id: str
    gpu_uuid: str | None = None
    gpu_peers: tuple[str, ...] | None = None  # GPUs its GPU reaches peer-to-peer (None: not known)


def choose_transport(device: str, source: Topology | None, target: Topology | None) -> str | None:
    """`auto` as a pure function of where the two ends run; None when that is not known yet.
    The only place the choice is made (the plan shows it, link wiring and transports use it)."""
    if source is None or target is None:
        return None
    same_node = source.node_id == target.node_id
    if device in ("gpu", "cuda"):
        # Peer GPUs on one node still use IPC (one direct copy, no communicator to set up), if the
        # target's GPU can reach the source's peer-to-peer (it pulls from it); NCCL otherwise.
        peer = (source.gpu_uuid == target.gpu_uuid or target.gpu_peers is None
                or source.gpu_uuid in target.gpu_peers)
        return "cuda_ipc" if same_node and peer else "nccl"
    return "shm" if same_node else "object_store"


# --- names: one place each ---------------------------------------------------------------------


def namespace_of(deployment: str) -> str:
    """The Ray namespace of a deployment."""
    return f"oob-{deployment}"


def replica_name(actor: str, index: int) -> str:
    return f"{actor}-{index}"


SURGE_PREFIX = "_oob-surge-"


def surge_name(actor: str, index: int) -> str:
    """The stand-in that serves a replica's ports while the replica itself is replaced
    (`_oob` names are oob's own bookkeeping, left out of status and plans)."""
    return f"{SURGE_PREFIX}{replica_name(actor, index)}"


def split_name(name: str) -> tuple[str, int]:
    """`web-1` -> ("web", 1); also for a stand-in's name."""
    if name.startswith(SURGE_PREFIX):
        name = name[len(SURGE_PREFIX):]
    actor, _, index = name.rpartition("-")
    return actor, int(index)


def segment_prefix(deployment: str) -> str:
    """Every shm segment of a deployment starts with this, and no other deployment's does:
    '_' cannot occur in deployment names, so "web" never matches "web-2"'s segments."""
    return f"oob-{deployment}-_"


def segment_name(deployment: str, actor: str, replica: int, buffer: str) -> str:
    return f"{segment_prefix(deployment)}{actor}_{replica}_{buffer}"


def host_port(host: str, port: int | str) -> str:
    """HOST:PORT as a URL or a gRPC target writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_url(protocol: str, host: str, port: int | str, tls: bool = False) -> str:
    """`http://HOST:PORT` (`https://` with TLS) for http, `HOST:PORT` for grpc and tcp."""
    if protocol == "http":
        return f"{'https' if tls else 'http'}://{host_port(host, port)}"
    return host_port(host, port)


# --- driver -> replica ----------------------------------------------------------------------


@dataclass(frozen=True)
class RouteConfig:
    method: str
    path: str
    call: str


@dataclass(frozen=True)
class ServerConfig:
    """One server as a replica runs it: the spec's server (`models.HttpServer` / `GrpcServer` /
    `TcpServer`, validated at apply) in plain types, its port resolved. Fields a protocol does
    not have keep their defaults."""

    name: str
    protocol: str  # "http" | "grpc" | "tcp"
    host: str
    port: int
    shared: bool = False
    token_env: str | None = None  # auth: the variable that holds the bearer token
    tls: bool = False  # the PEMs travel in ReplicaConfig.tls
    max_inflight: int = 0
    timeout: float | None = None
    errors: str = "safe"
    error_status: dict[str, int] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()  # http
    max_body: int = 0
    header_timeout: float = 0.0
    service: str | None = None  # grpc
    methods: tuple[str, ...] = ()
    proto: str | None = None

    @classmethod
    def of(cls, server: Any, **changes: Any) -> "ServerConfig":
        """From the spec's server model, read by attribute (this module imports no pydantic)."""
        values = {f.name: getattr(server, f.name) for f in fields(cls) if hasattr(server, f.name)}
        values.update(
            token_env=server.auth.token_env if server.auth else None,
            tls=getattr(server, "tls", None) is not None,
            routes=tuple(RouteConfig(r.method, r.path, r.call) for r in getattr(server, "routes", ())),
            methods=tuple(getattr(server, "methods", ())), error_status=dict(getattr(server, "error_status", {})))
        return cls(**{**values, **changes})


@dataclass(frozen=True)
class LinkRole:
    """One link as a replica takes part in it: as its source, a target, or both."""

    name: str
    source: Ref
    targets: tuple[Ref, ...]
    transport: str
    role: str  # "source" | "target"
    source_buffer: str | None = None  # set on the source
    target_buffer: str | None = None  # set on a target
    buffering: str = "single"  # "double" / "triple": targets hold two / three slots
    timeout: float = 10.0  # seconds a push waits for readers (or an nccl broadcast), a reader for a push


@dataclass
class ReplicaConfig:
    """Everything a replica is started with (the first argument of its `__init__`)."""

    deployment: str
    namespace: str
    actor: str
    replica: int
    replicas: int
    config_hash: str
    code_hash: str = ""
    restarts: int = 0
    command: list[str] | None = None
    cwd: str = "."  # the command's folder, relative to spec_dir
    # The spec's folder as apply saw it; None, or not there on the replica's node: the folder
    # travelled as the actor's working_dir (Ray Client, Ray Jobs), which is its current folder.
    spec_dir: str | None = None
    servers: list[ServerConfig] = field(default_factory=list)  # port: port + replica, or 0
    endpoints: dict[str, list[str]] = field(default_factory=dict)  # connect key -> peers' URLs
    # name -> models.Buffer: only a replica with buffers imports pydantic (a tenth of a second per worker)
    buffers: dict[str, Any] = field(default_factory=dict)
    link_targets: frozenset[str] = frozenset()  # buffers that links write into (shared memory on cpu)
    links: dict[str, LinkRole] = field(default_factory=dict)
    sys_path: list[str] = field(default_factory=list)
    module: str | None = None  # the user's module, imported so its top-level code runs
    secrets: dict[str, str] = field(default_factory=dict)  # auth tokens: never in runtime_env (logged)
    tls: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # server -> (cert, key) PEM, read at apply
    env: dict[str, str] = field(default_factory=dict)  # OOB_* variables
    shared_ports: frozenset[int] = frozenset()  # held by the predecessor: shared, not checked free
    surge: bool = False  # a stand-in: serves the ports during a hand-over, takes no part in links
    # Re-wiring without apply: where each connect key points, how many replicas each peer actor
    # has (kept current by `_oob_update`), and the actors that connect to this one (told when it
    # (re)starts, so they read its new endpoints from the cluster's KV).
    connect: dict[str, Ref] = field(default_factory=dict)  # connect key -> <actor>.<server>
    peer_replicas: dict[str, int] = field(default_factory=dict)  # peer actor -> its replica count
    watchers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return surge_name(self.actor, self.replica) if self.surge else replica_name(self.actor, self.replica)

    def server(self, name: str) -> ServerConfig:
        return next(s for s in self.servers if s.name == name)


@dataclass(frozen=True)
class Descriptor:
    """A link target's receiving end: what its source needs to reach it. Apply hands it over
    and records it in the cluster's KV, so a source that Ray restarts wires itself again."""

    shape: tuple[int, ...]
    dtype: str  # numpy's dtype.str
    segment: str | None = None  # its inbox (and, on cpu, its memory), by name
    slots: int = 1
    stride: int = 0  # bytes from one slot to the next
    device_uuid: str | None = None  # cuda_ipc: the GPU its memory is on

    def wire(self) -> dict:
        """The dict the transports take (`name`: the shm segment)."""
        return {"shape": self.shape, "dtype": self.dtype, "name": self.segment, "segment": self.segment,
                "slots": self.slots, "stride": self.stride, "device_uuid": self.device_uuid}


@dataclass(frozen=True)
class WiredTarget:
    """One target replica of a link as apply wired it (its Ray handle travels beside it)."""

    key: str  # its replica name
    transport: str
    descriptor: Descriptor | None  # None: nccl (a communicator, no memory to map)

    def record(self) -> dict:
        return {"key": self.key, "transport": self.transport,
                "descriptor": None if self.descriptor is None else {**self.descriptor.__dict__,
                                                                     "shape": list(self.descriptor.shape)}}

    @classmethod
    def from_record(cls, record: dict) -> "WiredTarget":
        d = record["descriptor"]
        return cls(record["key"], record["transport"], None if d is None else Descriptor(**{**d, "shape": tuple(d["shape"])}))


@dataclass(frozen=True)
class PushResult:
    """One push of a link, as its source did it (`ctx.push` and `oob sync` hand it out as a dict)."""

    version: int
    bytes: int  # copied in all, over every target reached
    seconds: float
    gbps: float
    targets: int  # reached
    direct: int  # written by the source itself, no Ray call
    transport: str  # "/"-joined, every transport of the link's targets
    at: float  # time.time() when it finished

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --- replica -> driver -----------------------------------------------------------------------


@dataclass
class ReplicaInfo:
    """What a replica reports (`_oob_info`): identity, versions, where it serves, how it is."""

    actor: str
    replica: int
    config_hash: str
    code_hash: str
    pid: int
    node_id: str
    endpoints: dict[str, str]  # server name -> URL
    error: str | None = None  # its start-up failed (it is kept alive only to report this)
    gpu_uuid: str | None = None
    gpu_peers: tuple[str, ...] | None = None  # the GPUs its GPU reaches peer-to-peer (NVML; None: unknown)
    process: dict | None = None  # a command actor's program: argv, pid, alive, starts, last_exit
    links: dict[str, Any] = field(default_factory=dict)  # link -> push stats
    versions: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    ports: dict[str, int] = field(default_factory=dict)  # server name -> the port it bound
    stats: ReplicaStats | None = None  # its request and push counters (None: metrics off)
    node_address: str = ""  # the address Ray knows its node by

    RECORDED = ("config_hash", "code_hash", "endpoints", "gpu_uuid", "ports")

    def record(self) -> dict:
        """What apply keeps of it in the cluster's KV: enough to plan while it is too busy to answer."""
        return {key: getattr(self, key) for key in self.RECORDED}

    @classmethod
    def from_record(cls, actor: str, replica: int, record: dict, pid: int = 0, node_id: str = "") -> "ReplicaInfo":
        """A replica as apply recorded it (KeyError: a record an older oobspec wrote)."""
        return cls(actor, replica, pid=pid, node_id=node_id, **{key: record[key] for key in cls.RECORDED})


# --- replica -> `oob status --watch` -------------------------------------------------------


@dataclass(frozen=True)
class PushCounts:
    """One link's pushes by its source since the replica started."""

    pushes: int = 0
    bytes: int = 0  # over every target reached
    seconds: float = 0.0  # the pushes' own time


@dataclass(frozen=True)
class ReplicaStats:
    """A replica's counters since it started (`ReplicaInfo.stats`): running totals, so two
    snapshots of one replica give request rates and latency quantiles between them."""

    at: float  # the replica's time.monotonic() when taken
    bounds: tuple[float, ...]  # latency bucket upper bounds, seconds; one more bucket for +Inf
    requests: int = 0
    client_errors: int = 0  # HTTP 4xx, or a gRPC code that is the client's
    server_errors: int = 0  # HTTP 5xx, or a gRPC code that is the server's (INTERNAL, UNAVAILABLE, ...)
    buckets: tuple[int, ...] = ()  # requests per latency bucket (not cumulative), +Inf last
    links: dict[str, PushCounts] = field(default_factory=dict)  # link -> its source's pushes
