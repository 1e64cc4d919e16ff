"""oobspec: declare the out-of-band side of Ray actors (servers, wrapped processes, buffer links).

The spec layer (pydantic, jinja2, yaml) loads on first use, so the actors, which import
oobspec for `context()`, start without it.
"""
from .errors import Diagnostic, HTTPError, OobError, SpecError

__version__ = "0.1.0"
__all__ = ["Diagnostic", "HTTPError", "OobError", "Spec", "SpecError", "context", "deploy", "lint", "lint_file", "load"]


def __getattr__(name: str):
    if name in ("load", "lint", "lint_file"):
        from . import api
        return getattr(api, name)
    if name == "Spec":
        from .models import Spec
        return Spec
    raise AttributeError(f"module 'oobspec' has no attribute '{name}'")


def deploy(spec, **kwargs):
    """Apply a spec on Ray and wait until it is ready; a context manager that deletes it on exit."""
    from .control.deploy import deploy as _deploy
    return _deploy(spec, **kwargs)


def context():
    """Inside an actor: this replica's endpoints of its peers, its buffers and link push."""
    from .replica.context import current
    return current()
