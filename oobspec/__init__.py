"""oobspec: declare the out-of-band side of Ray actors (servers, wrapped processes, buffer links)."""
from .api import lint, lint_file, load
from .errors import Diagnostic, OobError, SpecError
from .models import Spec

__version__ = "0.1.0"
__all__ = ["Diagnostic", "OobError", "Spec", "SpecError", "context", "deploy", "lint", "lint_file", "load"]


def deploy(spec, **kwargs):
    """Apply a spec on Ray and wait until it is ready; a context manager that deletes it on exit."""
    from .runtime.deploy import deploy as _deploy
    return _deploy(spec, **kwargs)


def context():
    """Inside an actor: this replica's endpoints of its peers, its buffers and link push."""
    from .runtime.context import current
    return current()
