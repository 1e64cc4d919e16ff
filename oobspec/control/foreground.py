"""`oob apply` as the CLI runs it: console output, signals, the embedded Ray's lifetime.

Ctrl-C (or SIGTERM) at any moment stops the apply: during start-up it removes what this apply
started and exits 130; once running in the foreground it tears everything down and exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from ..addresses import explicit_address
from ..errors import ClusterError
from ..models import Spec
from . import cluster
from .apply import apply_with_errors, handling_signals, preflight, start_embedded

log = logging.getLogger("oobspec")


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def apply_cli(spec: Spec, address: str | None, timeout: float, atomic: bool = False) -> None:
    from rich.console import Console

    from .jobs import WARNED_ENV
    # No wrapping at the console's width (80 in a pipe or a CI log): a `file:line:col: CODE` line
    # stays one line for grep and CI annotations; a terminal wraps long lines itself.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    progress = lambda msg: console.print(f"[dim]·[/dim] {msg}")  # noqa: E731
    explicit = explicit_address(address, spec.ray.address)
    warnings = preflight(spec, explicit)
    if not os.environ.pop(WARNED_ENV, None):  # a Ray Jobs apply: the user's side printed them
        for warning in warnings:
            console.print(str(warning), markup=False)
    import ray
    if explicit:
        with handling_signals(_interrupt):
            try:
                cluster.connect(explicit, spec.namespace)
                endpoints = apply_with_errors(spec, progress, timeout, detached=True, atomic=atomic)
            except KeyboardInterrupt:
                console.print("interrupted: what this apply started is removed; replicas that already "
                              "replaced running ones keep running (apply again to continue)")
                raise
            finally:
                with handling_signals(signal.SIG_IGN):
                    ray.shutdown()
        out.print(_endpoints(endpoints))
        return
    running = cluster.foreground_owner(spec.name)
    if running is not None:  # one deployment, one owner: touch nothing of the running one
        raise ClusterError(f"'{spec.name}' is already running in the foreground (oob apply, pid {running['pid']}, "
                           f"Ray at {running['address']}): stop it first, or change it with "
                           f"`oob apply --address {running['address']}`")
    _foreground(spec, timeout, console, out, progress, atomic)


def _foreground(spec: Spec, timeout: float, console, out, progress, atomic: bool) -> None:
    import ray
    stop = threading.Event()
    registry = None
    interrupted = False
    try:
        progress("starting a local Ray (embedded; Ctrl-C stops everything)")
        # A Ray half started cannot be torn down cleanly: a signal during ray.init waits for it.
        with handling_signals(lambda *_: stop.set()):
            gcs = start_embedded(spec.namespace)
        registry = cluster.register_embedded(spec.name, gcs)
        with handling_signals(_interrupt):
            if stop.is_set():
                raise KeyboardInterrupt
            endpoints = apply_with_errors(spec, progress, timeout, detached=False, atomic=atomic)
        with handling_signals(lambda *_: stop.set()):
            out.print(_endpoints(endpoints))
            console.print(f"running in the foreground on a local Ray ({gcs}); Ctrl-C to stop")
            sys.stdout.flush()
            while not stop.wait(0.5):
                pass
        console.print("stopping: closing servers, stopping processes")
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: stopping what this apply started")
    finally:
        with handling_signals(signal.SIG_IGN):
            if ray.is_initialized():
                try:
                    cluster.delete_all(spec.name)
                except Exception:
                    log.debug("teardown", exc_info=True)
            ray.shutdown()
            if registry is not None:
                cluster.unregister_embedded(registry)
    console.print("stopped")
    if interrupted:
        raise KeyboardInterrupt


def _endpoints(endpoints: dict) -> str:
    from ..report import endpoints_text
    return endpoints_text(endpoints)
