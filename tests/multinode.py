"""A multi-node Ray cluster on this one machine: a head and workers, each node its own
`ray start --block` in its own process group, on its own loopback address (127.0.0.2+; never
127.0.0.1, which Ray rewrites to the host's address). A test kills one node (SIGKILL to its
process group) to simulate a node failure and adds another on a new address.

    cluster = LocalCluster()
    cluster.start()                       # head 127.0.0.2 (zone=a), 127.0.0.3 (zone=b), 127.0.0.4 (zone=c)
    cluster.address                       # "127.0.0.2:PORT", for `oob ... --address`
    cluster.nodes                         # {ip: Node}, the nodes this object started and has not killed
    cluster.kill("127.0.0.4")             # SIGKILL its process group
    cluster.add("127.0.0.5", {"zone": "c"})  # or cluster.add(cluster.next_ip(), ...)
    cluster.wait_nodes(3, timeout=60)     # Ray's alive nodes, once there are exactly 3
    cluster.shutdown()                    # every process group it started; its temp dirs

Every node is started with token auth on (`RAY_AUTH_MODE=token`, the token in
~/.ray/auth_token, as `ray start --head` in Ray 2.60 does by default): a worker joining with the
mode unset is refused. Never `ray stop`: other Ray clusters may run on this machine.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
HEAD = "127.0.0.2"
WORKERS = {"127.0.0.3": {"zone": "b"}, "127.0.0.4": {"zone": "c"}}
HEAD_LABELS = {"zone": "a"}


# Ports the tests pick: below the kernel's ephemeral range (32768+, what every bind to port 0
# and every outgoing connection of Ray's many processes draws from) and above Ray's worker ports
# (10002-19999). A port picked from the ephemeral range was seen taken by the time a replica
# bound it (Address already in use).
TEST_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port nothing on this machine listens on (Ray binds some of its ports on 0.0.0.0), and
    its next one too (replica i binds port + i)."""
    while True:
        port = random.choice(TEST_PORTS)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", port))
                b.bind(("0.0.0.0", port + 1))
            return port
        except OSError:
            continue


def node_env(**extra: str) -> dict:
    """The environment every node and every client of the cluster runs with."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


@dataclass
class Node:
    ip: str
    labels: dict[str, str]
    head: bool
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        return self.proc.poll() is None


_NODES_SCRIPT = r"""
import json, sys, time
import ray
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.time() + timeout
while True:
    nodes = [dict(ip=n["NodeManagerAddress"], node_id=n["NodeID"], alive=n["Alive"],
                  labels={k: v for k, v in n.get("Labels", {}).items() if not k.startswith("ray.io/")},
                  cpus=n["Resources"].get("CPU", 0)) for n in ray.nodes()]
    if want < 0 or sum(n["alive"] for n in nodes) == want or time.time() > deadline:
        break
    time.sleep(0.5)
print("OOB-NODES " + json.dumps(nodes), flush=True)
"""


class LocalCluster:
    def __init__(self, root: Path | str | None = None, num_cpus: int = 4, object_store_mb: int = 256,
                 env: dict | None = None, health_check_ms: tuple[int, int] | None = (1000, 5)):
        """`health_check_ms`: (period, failures) the head's GCS uses to declare a node dead; Ray's
        default (3000, 5) takes ~16 s after a node is killed, (1000, 5) ~8 s. None: Ray's."""
        # Short paths: Ray's unix sockets live under the temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="oobmn-", dir=root or "/tmp"))
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.env = env or node_env()
        self.head_env = dict(self.env)
        if health_check_ms:
            period, failures = health_check_ms
            self.head_env.update(RAY_health_check_period_ms=str(period), RAY_health_check_timeout_ms=str(2 * period),
                                 RAY_health_check_failure_threshold=str(failures))
        self.address = ""
        self.nodes: dict[str, Node] = {}
        self._all: list[Node] = []  # killed ones too: shutdown reaps every group

    # --- nodes -----------------------------------------------------------------------------

    def _start_node(self, ip: str, labels: dict[str, str], head: bool) -> Node:
        if ip in self.nodes:
            raise ValueError(f"a node already runs on {ip}")
        if ip == "127.0.0.1":
            raise ValueError("127.0.0.1 is rewritten by Ray to the host's address: use 127.0.0.2+")
        temp_dir = self.root / ip.replace(".", "_")
        temp_dir.mkdir()
        ports = {name: free_port() for name in ("node-manager", "object-manager", "dashboard-agent-listen",
                                                "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")}
        args = [RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={self.num_cpus}",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}", f"--temp-dir={temp_dir}",
                "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
                f"--node-manager-port={ports['node-manager']}", f"--object-manager-port={ports['object-manager']}",
                f"--dashboard-agent-listen-port={ports['dashboard-agent-listen']}",
                f"--dashboard-agent-grpc-port={ports['dashboard-agent-grpc']}",
                f"--runtime-env-agent-port={ports['runtime-env-agent']}",
                f"--metrics-export-port={ports['metrics-export']}"]
        if labels:
            args.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        if head:
            ports["gcs"], ports["ray-client"] = free_port(), free_port()
            args += ["--head", f"--port={ports['gcs']}", f"--ray-client-server-port={ports['ray-client']}",
                     "--include-dashboard=false"]
        else:
            args.append(f"--address={self.address}")
        log = self.root / f"{ip}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.head_env if head else self.env,
                                    start_new_session=True, cwd=self.root)
        node = Node(ip, dict(labels), head, proc, temp_dir, log, ports)
        self.nodes[ip] = node
        self._all.append(node)
        if head:
            self.address = f"{ip}:{ports['gcs']}"
        return node

    def start(self, head: str = HEAD, workers: dict[str, dict[str, str]] | None = None,
              head_labels: dict[str, str] | None = None, timeout: float = 120) -> "LocalCluster":
        """The head, then the workers at once; returns when Ray reports them all alive."""
        workers = WORKERS if workers is None else workers
        try:
            self._start_node(head, HEAD_LABELS if head_labels is None else head_labels, head=True)
            self._wait_port(head, self.nodes[head].ports["gcs"], timeout)
            for ip, labels in workers.items():
                self._start_node(ip, labels, head=False)
            self.wait_nodes(1 + len(workers), timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def add(self, ip: str, labels: dict[str, str] | None = None, wait: bool = True, timeout: float = 90) -> Node:
        """A new worker on `ip`; with `wait`, returns once Ray reports it alive."""
        node = self._start_node(ip, labels or {}, head=False)
        if wait:
            deadline = time.time() + timeout
            while not any(n["ip"] == ip and n["alive"] for n in self.ray_nodes()):
                self._check(node)
                if time.time() > deadline:
                    raise TimeoutError(f"node {ip} not alive after {timeout:.0f}s\n{self.log_tail(ip)}")
                time.sleep(0.5)
        return node

    def kill(self, ip: str, sig: int = signal.SIGKILL) -> None:
        """The node's whole process group (raylet, its workers, agents) at once: a node failure."""
        node = self.nodes.pop(ip)
        _killpg(node.pgid, sig)
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _killpg(node.pgid, signal.SIGKILL)

    def shutdown(self, grace: float = 3) -> None:
        """Every process group this cluster started (workers, then the head: SIGTERM, and SIGKILL
        after `grace` seconds; a head given SIGTERM takes ~30 s to exit on its own); its temp dirs."""
        for node in sorted(self._all, key=lambda n: n.head):
            if node.proc.poll() is None:
                _killpg(node.pgid, signal.SIGTERM)
        deadline = time.time() + grace
        for node in self._all:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(node.pgid, signal.SIGKILL)  # and stragglers (workers that outlive their raylet)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.nodes.clear()
        self._all.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.nodes else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- what Ray sees ---------------------------------------------------------------------

    def ray_nodes(self, want: int = -1, timeout: float = 0) -> list[dict]:
        """Ray's node table (dead nodes included), from a client process: ip, node_id, alive,
        labels (the user's), cpus. With `want`, polls until exactly that many are alive."""
        out = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, self.address, str(want), str(timeout)],
                             capture_output=True, text=True, timeout=timeout + 60, env=self.env, cwd="/")
        if out.returncode != 0:
            raise RuntimeError(f"ray.nodes() at {self.address} failed:\n{out.stderr[-3000:]}")
        # Ray prints warnings to stdout too ("raylet has lagging heartbeats ..."): take our line.
        line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("OOB-NODES "))
        return json.loads(line.split(" ", 1)[1])

    def alive(self) -> dict[str, dict]:
        """ip -> node, for the nodes Ray reports alive."""
        return {n["ip"]: n for n in self.ray_nodes() if n["alive"]}

    def wait_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        """Ray's alive nodes, once exactly `n` are alive (raises after `timeout`)."""
        deadline = time.time() + timeout
        while True:
            for node in self.nodes.values():
                self._check(node)
            try:
                nodes = self.ray_nodes(want=n, timeout=max(1.0, deadline - time.time()))
            except RuntimeError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
                continue
            alive = [x for x in nodes if x["alive"]]
            if len(alive) == n:
                return alive
            if time.time() > deadline:
                raise TimeoutError(f"{len(alive)} nodes alive, not {n}, after {timeout:.0f}s: "
                                   f"{[x['ip'] for x in alive]}\n" + self.log_tail(*self.nodes))

    def next_ip(self) -> str:
        """The loopback address after every one this cluster has used (killed nodes included)."""
        last = max((tuple(map(int, n.ip.split("."))) for n in self._all), default=(127, 0, 0, 1))
        return ".".join(map(str, last[:3] + (last[3] + 1,)))

    def node_id(self, ip: str) -> str:
        return self.alive()[ip]["node_id"]

    # --- helpers ---------------------------------------------------------------------------

    def log_tail(self, *ips: str, lines: int = 15) -> str:
        parts = []
        for node in self._all:
            if node.ip in ips and node.log.exists():
                text = node.log.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {node.ip} ({'alive' if node.alive() else 'exited'})\n" + "\n".join(text))
        return "\n".join(parts)

    def _check(self, node: Node) -> None:
        if node.proc.poll() is not None:
            raise RuntimeError(f"`ray start` for {node.ip} exited ({node.proc.returncode})\n{self.log_tail(node.ip)}")

    def _wait_port(self, ip: str, port: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check(self.nodes[ip])
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((ip, port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"GCS at {ip}:{port} not up after {timeout:.0f}s\n{self.log_tail(ip)}")


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # python tests/multinode.py: start, show, stop (a manual check)
    started = time.monotonic()
    with LocalCluster() as c:
        print(f"up in {time.monotonic() - started:.1f}s at {c.address}")
        print(json.dumps(c.alive(), indent=1))
