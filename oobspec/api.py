"""The pipeline in order: load → render → validate → check. `oobspec.load` and `oobspec.lint`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checks import check, validate
from .errors import Diagnostic, SpecError
from .loader import Document, load_file
from .models import Spec
from .render import load_values, render


@dataclass
class Source:
    """Where a Spec came from, kept beside it for lint positions and imports."""

    path: Path | None
    document: Document  # the rendered document, positions included

    @property
    def base_dir(self) -> Path:
        return self.path.parent.resolve() if self.path else Path.cwd()


def load(path: str | os.PathLike, values: dict | None = None, *, value_files=(), sets=(),
         environ: dict | None = None) -> Spec:
    """Load, render and validate a spec file. Raises SpecError listing every problem found."""
    raw = load_file(path)
    context = load_values(value_files, sets, values)
    doc = render(raw, context, environ)
    spec = validate(doc)
    spec._source = Source(Path(path), doc)
    return spec


def lint(spec: Spec, imports: bool = True, *, address: str | None = None) -> list[Diagnostic]:
    """Cross-reference, port, link and (with imports) code checks of a loaded spec. `address`:
    where it will run, when not the spec's own ray.address (a remote one adds its checks)."""
    from .addresses import remote_address
    source: Source | None = spec._source
    doc = source.document if source else Document(spec.model_dump(by_alias=True))
    return check(spec, doc, source.base_dir if source else None, imports,
                 remote=remote_address(address or spec.ray.address))


def lint_file(path: str | os.PathLike, values: dict | None = None, *, value_files=(), sets=(),
              imports: bool = True) -> list[Diagnostic]:
    """Every problem in one spec file, whatever phase finds it."""
    try:
        spec = load(path, values, value_files=value_files, sets=sets)
    except SpecError as exc:
        return exc.diagnostics
    return lint(spec, imports)
