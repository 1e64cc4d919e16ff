"""`oobspec.deploy(spec)`: apply, wait until ready, delete on exit."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..contract import replica_name
from ..models import Spec
from . import cluster
from . import commands
from .apply import Applier, preflight, start_embedded


class Deployment:
    def __init__(self, spec: Spec, endpoints: dict[str, dict[str, list[str]]]):
        self.spec = spec
        self.name = spec.name
        self.namespace = spec.namespace
        self.endpoints = endpoints

    def handle(self, actor: str, replica: int = 0):
        """The Ray actor handle of one replica: the user's own methods, `.remote()` as usual."""
        return cluster.handle(replica_name(actor, replica), self.namespace)

    def status(self) -> dict:
        return commands.status(self.name, None)

    def sync(self, link: str) -> dict:
        return commands.sync(self.name, link, None)


@contextmanager
def deploy(spec: Spec, *, address: str | None = None, timeout: float = 120.0, progress=None) -> Iterator[Deployment]:
    """Apply `spec`; inside the block the deployment is ready. On exit its actors are deleted.

    Uses the Ray this process is already connected to; otherwise `address` (or the spec's
    ray.address); otherwise starts an embedded local Ray and shuts it down on exit.
    """
    import ray
    preflight(spec)
    started = False
    if not ray.is_initialized():
        target = address or spec.ray.address
        if target:
            cluster.connect(target, spec.namespace)
        else:
            start_embedded(spec.namespace, log_to_driver=False)
        started = True
    try:
        endpoints = Applier(spec, progress or (lambda _m: None), detached=False).run(timeout)
        yield Deployment(spec, endpoints)
    finally:
        try:
            cluster.delete_all(spec.name)
        finally:
            if started:
                ray.shutdown()
