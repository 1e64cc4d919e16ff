"""Reading a replica's own log files (its worker's stdout and stderr), without Ray's marker lines.
The replica reads them for `oob logs -f`; the control side reads the same files of a replica
that cannot answer (stuck in __init__, or dead)."""
from __future__ import annotations

_RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:")


def clean(text: str) -> str:
    """Output without Ray's own marker lines (":job_id:…", ":actor_name:…", ":task_name:…")."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(_RAY_MARKERS))


def read_from(path: str, offset: int, limit: int = 4 * 1024 * 1024) -> tuple[int, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
    return offset + len(data), clean(data.decode("utf-8", "replace"))
