"""One error hierarchy: every problem a user can cause is an OobError, printed as one line."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from http import HTTPStatus


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a spec, pinned to the place in the file that causes it."""

    code: str
    message: str
    file: str = "<spec>"
    line: int = 1
    col: int = 1
    severity: str = "error"  # error | warning
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.code} {self.message}"
        if self.severity == "warning":
            text = f"{self.file}:{self.line}:{self.col}: {self.code} warning: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


def first_line(text: str, default: str = "") -> str:
    """The first non-empty line of a message (what a one-line error shows)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), default)


def last_line(text: str, default: str = "") -> str:
    """The last non-empty line (of a traceback: the exception itself)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else default


def status_phrase(status: int) -> str:
    """An HTTP status's reason phrase ("Not Found"); "Error" for one without a name (499)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class OobError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line and exits 1."""

    exit_code = 1


class UsageError(OobError):
    exit_code = 2


class SpecError(OobError):
    """The spec cannot be loaded or rendered; carries every diagnostic found."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class ClusterError(OobError):
    """The cluster is not in the state the command needs (nothing deployed, actor failed...)."""


class ApplyError(ClusterError):
    def __init__(self, message: str, log_tail: str = ""):
        self.log_tail = log_tail
        super().__init__(message)


class HTTPError(Exception):
    """Raised by a served method to answer with `status` (400-599) and `message`: HTTP sends that
    status and `{"error": message, "status": status}`, gRPC the matching code (404: NOT_FOUND...).
    Not an OobError: it is the user's code that raises it, inside a request."""

    def __init__(self, status: int, message: str | None = None):
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"an HTTPError's status is 400-599, not {status!r}")
        status = int(status)  # HTTPStatus.NOT_FOUND: 404
        if message is None:
            message = status_phrase(status)
        super().__init__(status, str(message))  # args as given: it pickles (a Ray error carries it)
        self.status, self.message = status, str(message)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"
