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

from ..models import Spec
from . import cluster
from .apply import apply_with_errors, handling_signals, preflight, start_embedded

log = logging.getLogger("oobspec")


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def apply_cli(spec: Spec, address: str | None, timeout: float) -> None:
    from rich.console import Console
    console = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=True)
    progress = lambda msg: console.print(f"[dim]·[/dim] {msg}")  # noqa: E731
    explicit = address or os.environ.get("RAY_ADDRESS") or spec.ray.address
    for warning in preflight(spec, explicit):
        console.print(str(warning), markup=False)
    import ray
    if explicit:
        with handling_signals(_interrupt):
            try:
                cluster.connect(explicit, spec.namespace)
                endpoints = apply_with_errors(spec, progress, timeout, detached=True)
            except KeyboardInterrupt:
                console.print("interrupted: what this apply started is removed")
                raise
            finally:
                with handling_signals(signal.SIG_IGN):
                    ray.shutdown()
        out.print(_endpoints(endpoints))
        return
    _foreground(spec, timeout, console, out, progress)


def _foreground(spec: Spec, timeout: float, console, out, progress) -> None:
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
            endpoints = apply_with_errors(spec, progress, timeout, detached=False)
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
                registry.unlink(missing_ok=True)
    console.print("stopped")
    if interrupted:
        raise KeyboardInterrupt


def _endpoints(endpoints: dict) -> str:
    from ..report import endpoints_text
    return endpoints_text(endpoints)
