"""Phase 1 — load: YAML text → plain Python tree + a table of where every node came from.

The tree is built from the parser's event stream rather than PyYAML's constructors so that
we control everything users can be surprised or attacked by: only the YAML 1.2 core scalars
(`on`/`no` stay strings, `3.10` keeps its text), no language tags, duplicate keys refused
with both lines named, and caps on size, nesting depth and alias expansion.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Diagnostic, SpecError
from .scalars import YamlFloat, scalar_text  # noqa: F401 (the loader makes them; models read them)

MAX_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
# Aliases share one Python object, so memory stays small, but every later walk (templating,
# validation) visits each use again: cap the *expanded* size, not the text.
MAX_EXPANDED_NODES = 2_000_000

Path_ = tuple  # a path into the tree: ("actors", "counter", "servers", 0, "port")

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_INT = re.compile(r"[-+]?[0-9]+$")
_INT_OTHER = re.compile(r"0o[0-7]+$|0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INF_NAN = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_ALLOWED_TAGS = {
    None, "!", "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


def one_line(text: str | None) -> str | None:
    """A message is one line: control characters and line breaks from user text are escaped."""
    if text is None or text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def resolve_plain(text: str) -> Any:
    """YAML 1.2 core schema resolution of a plain (unquoted) scalar."""
    if text in _NULLS:
        return None
    if text in _BOOLS:
        return _BOOLS[text]
    if _INT.match(text):
        return int(text)
    if _INT_OTHER.match(text):
        return int(text, 0)
    if _FLOAT.match(text):
        return YamlFloat(float(text), text)
    if text.lower() in _INF_NAN:
        return YamlFloat(_INF_NAN[text.lower()], text)
    return text


@dataclass
class Document:
    """A loaded spec: the tree, and where each path's value (and key) was written."""

    data: Any
    file: str = "<spec>"
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: tuple, key: bool = False) -> tuple[int, int]:
        """Line and column of a path; the nearest recorded ancestor when the path is not there."""
        table = self.key_positions if key else self.positions
        path = tuple(path)
        while path:
            if path in table:
                return table[path]
            if key and path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get((), (1, 1))

    def diag(self, code: str, message: str, path: tuple = (), *, key: bool = False,
             severity: str = "error", hint: str | None = None) -> Diagnostic:
        line, col = self.where(path, key=key)
        return Diagnostic(code, one_line(message), self.file, line, col, severity, one_line(hint))


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.anchors: dict[str, tuple[Any, int, int]] = {}  # anchor -> (value, nodes, nesting height)
        self.expanded = 0

    def fail(self, code: str, message: str, mark) -> SpecError:
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return SpecError([Diagnostic(code, one_line(message), self.doc.file, line, col)])

    def build(self, parser) -> Any:
        """Iterative build over the event stream (no recursion: deep nesting cannot crash us)."""
        # Each frame: [container, path, start_mark, anchor, pending_key, pending_key_mark, size, seen_keys, height]
        stack: list[list] = []
        root: Any = None
        documents = 0

        def attach(value, size, mark, anchor, height=0, merge_key=False):
            nonlocal root
            if anchor:
                self.anchors[anchor] = (value, size, height)
            if not stack:
                root = value
                self.doc.positions[()] = (mark.line + 1, mark.column + 1)
                return
            frame = stack[-1]
            frame[6] += size
            frame[8] = max(frame[8], height + 1)
            container, path = frame[0], frame[1]
            if isinstance(container, list):
                sub = path + (len(container),)
                self.doc.positions.setdefault(sub, (mark.line + 1, mark.column + 1))
                container.append(value)
                return
            if frame[4] is _NO_KEY:
                if not isinstance(value, (str, int, float, bool)) and value is not None:
                    raise self.fail("OOB100", "mapping keys must be plain scalars", mark)
                key = value if isinstance(value, str) else scalar_text(value)
                if key in frame[7]:
                    first = frame[7][key]
                    raise self.fail("OOB101", f"duplicate key '{key}' (first defined at line {first})", mark)
                frame[7][key] = mark.line + 1
                frame[4], frame[5] = _MERGE if merge_key else key, mark
                return
            key, key_mark = frame[4], frame[5]
            frame[4] = _NO_KEY
            if key is _MERGE:
                self._merge(container, value, key_mark)
                return
            sub = path + (key,)
            self.doc.key_positions[sub] = (key_mark.line + 1, key_mark.column + 1)
            self.doc.positions.setdefault(sub, (mark.line + 1, mark.column + 1))
            container[key] = value

        while True:
            event = parser.get_event()
            if event is None or isinstance(event, yaml.StreamEndEvent):
                break
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise self.fail("OOB100", "a spec file holds one YAML document, found a second", event.start_mark)
                continue
            if isinstance(event, (yaml.StreamStartEvent, yaml.DocumentEndEvent)):
                continue
            mark = event.start_mark
            tag = getattr(event, "tag", None)
            if tag not in _ALLOWED_TAGS:
                raise self.fail("OOB102", f"tag '{tag}' is not allowed in a spec (only plain YAML data)", mark)
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in self.anchors:
                    raise self.fail("OOB100", f"unknown alias '*{event.anchor}'", mark)
                value, size, height = self.anchors[event.anchor]
                if len(stack) + height > MAX_DEPTH:  # an alias must not smuggle in deeper nesting
                    raise self.fail("OOB103", f"nesting deeper than {MAX_DEPTH} levels (through aliases)", mark)
                self._count(size, mark)
                attach(value, size, mark, None, height)
            elif isinstance(event, yaml.ScalarEvent):
                self._count(1, mark)
                # Only a plain, untagged `<<` is the merge key; '<<' quoted is an ordinary key.
                merge_key = event.value == "<<" and tag is None and not event.style and event.implicit[0]
                attach(self._scalar(event), 1, mark, event.anchor, merge_key=merge_key)
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
                if tag not in (None, "!", f"tag:yaml.org,2002:{kind}"):
                    raise self.fail("OOB100", f"tag '{tag}' does not fit a {'mapping' if kind == 'map' else 'list'}", mark)
                if len(stack) >= MAX_DEPTH:
                    raise self.fail("OOB103", f"nesting deeper than {MAX_DEPTH} levels", mark)
                self._count(1, mark)
                container: Any = {} if isinstance(event, yaml.MappingStartEvent) else []
                path = self._child_path(stack)
                stack.append([container, path, mark, event.anchor, _NO_KEY, None, 1, {}, 1])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                container, _path, start, anchor, _k, _km, size, _seen, height = stack.pop()
                attach(container, size, start, anchor, height)
        return root

    def _child_path(self, stack) -> tuple:
        if not stack:
            return ()
        container, path, *_rest = stack[-1]
        if isinstance(container, list):
            return path + (len(container),)
        key = stack[-1][4]
        if key is _MERGE:
            return path + ("<<",)
        return path + (key,) if key is not _NO_KEY else path

    def _count(self, size: int, mark) -> None:
        self.expanded += size
        if self.expanded > MAX_EXPANDED_NODES:
            raise self.fail("OOB103", f"aliases expand to more than {MAX_EXPANDED_NODES:,} nodes "
                            "(a 'billion laughs' document?)", mark)

    def _scalar(self, event) -> Any:
        tag, value = event.tag, event.value
        if tag in (None, "!") and not event.style and event.implicit[0]:
            return resolve_plain(value)
        if tag in (None, "!", "tag:yaml.org,2002:str"):
            return value
        resolved = resolve_plain(value)
        wanted = {"tag:yaml.org,2002:int": int, "tag:yaml.org,2002:float": float,
                  "tag:yaml.org,2002:bool": bool, "tag:yaml.org,2002:null": type(None)}.get(tag)
        if wanted is float and isinstance(resolved, int) and not isinstance(resolved, bool):
            return YamlFloat(float(resolved), value)
        if wanted is None or not isinstance(resolved, wanted) or (wanted is int and isinstance(resolved, bool)):
            raise self.fail("OOB100", f"'{value}' is not a valid {tag.rsplit(':', 1)[-1]}", event.start_mark)
        return resolved

    def _merge(self, container: dict, value, mark) -> None:
        sources = value if isinstance(value, list) else [value]
        for source in sources:
            if not isinstance(source, dict):
                raise self.fail("OOB100", "'<<' merges mappings only", mark)
            for k, v in source.items():
                container.setdefault(k, v)


_NO_KEY = object()
_MERGE = object()  # the pending key is the merge key `<<`


def loads(text: str | bytes, file: str = "<spec>") -> Document:
    """Parse one YAML document into a Document. Raises SpecError with positions."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError([Diagnostic("OOB103", f"file is larger than {MAX_BYTES // 1048576} MiB", file)])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError([Diagnostic("OOB100", f"file is not UTF-8 text ({exc.reason})", file)]) from None
    if len(text) > MAX_BYTES:
        raise SpecError([Diagnostic("OOB103", f"file is larger than {MAX_BYTES // 1048576} MiB", file)])
    doc = Document(None, file)
    parser = _Parser(text)
    try:
        doc.data = _Builder(doc).build(parser)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError([Diagnostic("OOB100", one_line(f"invalid YAML: {problem}"), file, line, col)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Diagnostic("OOB100", one_line(f"invalid YAML: {exc}"), file)]) from None
    except RecursionError:
        raise SpecError([Diagnostic("OOB103", "document nests too deeply", file)]) from None
    finally:
        parser.dispose()
    return doc


def load_file(path: str | Path) -> Document:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SpecError([Diagnostic("OOB103", f"file is larger than {MAX_BYTES // 1048576} MiB", str(path))])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([Diagnostic("OOB100", "no such file", str(path))]) from None
    except IsADirectoryError:
        raise SpecError([Diagnostic("OOB100", "is a directory, not a spec file", str(path))]) from None
    except PermissionError:
        raise SpecError([Diagnostic("OOB100", "cannot read the file (permission denied)", str(path))]) from None
    return loads(raw, str(path))
