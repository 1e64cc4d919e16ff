"""Finding the cluster (a flag, RAY_ADDRESS, a foreground apply's registry, a local cluster)
and connecting to it within one deadline, whatever answers at the address."""
from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from .. import ray_private
from ..addresses import address_kind, explicit_address
from ..errors import ClusterError, first_line
from . import registry

PROBE_TIMEOUT = 5.0
# A GCS that answers the probe is Ray; ray.init may still take long on a loaded cluster (Ray
# Client starts a server process per connection), but never forever.
CONNECT_TIMEOUT = float(os.environ.get("OOB_CONNECT_TIMEOUT", "60"))
GCS_CALLS = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.InternalKVGcsService/GetInternalConfig")


def register_embedded(name: str, address: str) -> Path | None:
    """A foreground apply says where its private Ray is, so `oob status NAME` can find it."""
    return registry.register(name, address)


def unregister_embedded(path: Path | None) -> None:
    registry.unregister(path)


def foreground_owner(name: str) -> dict | None:
    """The foreground apply of this deployment running on this machine: {pid, address}."""
    path = registry.entry_path(name)
    entry = registry.read(path) if path else None
    if entry is None:
        return None
    try:
        os.kill(entry["pid"], 0)
    except OSError:
        return None
    return entry if _reachable(entry["address"]) else None


def _embedded_address(name: str) -> str | None:
    entry = foreground_owner(name)
    return entry["address"] if entry else None


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def local_cluster() -> str | None:
    """The cluster `ray status` would find on this machine (no ray import: plan stays light)."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        owner = current.stat().st_uid
        address = current.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return None
    if owner not in (os.getuid(), 0):  # Ray's own file, planted by another user: not a cluster of yours
        registry.warn(f"ignoring {current}: written by uid {owner}, not by you or root")
        return None
    return address if _reachable(address) else None


def find_address(name: str, address: str | None, spec_address: str | None = None) -> str | None:
    """Explicit flag, RAY_ADDRESS, the spec's ray.address, a foreground apply's Ray, a local cluster."""
    explicit = explicit_address(address, spec_address)
    if explicit:
        return explicit
    return _embedded_address(name) or local_cluster()


def addresses(address: str | None) -> list[str]:
    """The clusters `oob list` looks at: the one named, else every foreground apply's Ray on
    this machine and the local cluster."""
    explicit = explicit_address(address)
    if explicit:
        return [explicit]
    found = [_embedded_address(name) for name in registry.entries()]
    found.append(local_cluster())
    return list(dict.fromkeys(a for a in found if a))


def use_token_if_any(address: str) -> None:
    # Ray 2.60 turns token auth on for `ray start --head` (and for a local ray.init); a client
    # given an explicit address is refused unless it is in token mode with the token.
    if address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        token_mode()


def token_mode() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it so this process sees token mode
        ray_private.reload_config()
    except Exception:
        pass


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cannot connect to Ray at {address}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def probe_tcp(address: str, timeout: float = PROBE_TIMEOUT) -> tuple[str, int]:
    """Something accepts connections at the address within `timeout`, or one line says why."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.timeout:
        raise ClusterError(f"cannot connect to Ray at {address}: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise ClusterError(f"cannot connect to Ray at {address}: {exc.strerror or exc}") from None
    return host, port


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail in seconds, with one line, where Ray would retry for minutes: nothing listening,
    a host that does not answer, a port that is not gRPC, or a gRPC server that is not Ray's
    GCS (Ray would wait for it without end)."""
    import grpc
    host, port = probe_tcp(address, timeout)
    from ..contract import host_port
    channel = grpc.insecure_channel(host_port(host, port))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        if address_kind(address) != "client":  # ray://: Ray Client's server, not the GCS itself
            _ask_gcs(channel, address, timeout)
    except grpc.FutureTimeoutError:
        raise ClusterError(f"cannot connect to Ray at {address}: something answers there, but not Ray "
                           "(no gRPC)") from None
    finally:
        channel.close()


def _ask_gcs(channel, address: str, timeout: float) -> None:
    """Two calls every Ray driver makes first: a server that is not Ray's GCS fails them at once
    (UNIMPLEMENTED) or leaves them unanswered, where `ray.init` would wait without end."""
    import grpc
    for method in GCS_CALLS:
        call = channel.unary_unary(method)  # bytes in, bytes out: an empty request is valid protobuf
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ClusterError(f"cannot connect to Ray at {address}: a gRPC server answers there, but not "
                                   "Ray's GCS") from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ClusterError(f"cannot connect to Ray at {address}: its GCS does not answer within "
                                   f"{timeout:.0f}s") from None
            # Anything else (token auth refusing an anonymous call, say) is Ray answering.


def connect(address: str, namespace: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect this process to Ray: what is not Ray is one error line within seconds (the probe);
    a Ray that does not finish the connection within `timeout` seconds (OOB_CONNECT_TIMEOUT) is
    one line too, never a hang (`ray.init` itself has no deadline)."""
    import ray
    if ray.is_initialized():
        return
    deadline = time.monotonic() + timeout
    if address == "auto":
        address = local_cluster() or ""
        if not address:
            raise ClusterError("no Ray cluster is running on this machine (address 'auto'): start one with "
                               "`ray start --head`, or pass --address")
    probe(address, min(PROBE_TIMEOUT, timeout))
    use_token_if_any(address)
    client = address_kind(address) == "client"
    extra = {} if client else {"configure_logging": True}
    for attempt in range(3):
        try:
            within(deadline, lambda: ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                                              log_to_driver=False, **extra),
                   f"cannot connect to Ray at {address}: Ray did not finish the connection within "
                   f"{timeout:.0f}s (OOB_CONNECT_TIMEOUT)")
            break
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # Ray Client's proxy sometimes refuses a connection that follows another at once.
            if client and "Initialization failure" in str(exc) and attempt < 2:
                time.sleep(1.0)
                continue
            raise ClusterError(f"cannot connect to Ray at {address}: {first_line(str(exc))}") from None
    end_on_sigterm()


def _not_our_thread_warning(record: logging.LogRecord) -> bool:
    # ray.init runs in a thread of its own (to keep its deadline), where Ray cannot set its SIGTERM
    # handler and says so; end_on_sigterm sets ours.
    return not record.getMessage().startswith("SIGTERM handler is not set")


logging.getLogger("ray._private.worker").addFilter(_not_our_thread_warning)


class Unresponsive(ClusterError):
    """A call into Ray that did not return by its deadline; it still runs in a thread, so the
    process must not wait for it on the way out (the CLI leaves with os._exit)."""

    hard_exit = True


def within(deadline: float, call, message: str):
    """`call()` in a daemon thread; its result, or Unresponsive(message) once `deadline` passes."""
    done, box = threading.Event(), []

    def run() -> None:
        try:
            box.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            box.append((False, exc))
        done.set()

    threading.Thread(target=run, name="oob-connect", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise Unresponsive(message)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def end_on_sigterm() -> None:
    """Ray's core worker installs a SIGTERM handler of its own (it dumps a C++ stack trace) over
    the Python one; in the main thread, give SIGTERM back to the Python handler set before
    connecting (the CLI's: end like Ctrl-C; apply's: stop and clean up; a script's own)."""
    current = signal.getsignal(signal.SIGTERM)
    if callable(current) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, current)


def take_sigterm() -> None:
    """For the CLI: SIGTERM ends any command as Ctrl-C does (exit 130, no traceback)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(_signum, _frame):
    raise KeyboardInterrupt
