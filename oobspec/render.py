"""Phase 2 — render: Jinja2 expressions evaluated per value, in the parsed tree.

Rendering the tree rather than the text keeps every error at its true file:line:col, and a
scalar that is one expression and nothing else keeps its result's type (`replicas: "{{ n }}"`
is an int). The environment is sandboxed and an undefined variable is an error.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, Undefined, UndefinedError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import Diagnostic, SpecError, UsageError
from .loader import MAX_DEPTH, Document, YamlFloat, load_file, loads, resolve_plain

_ONE_EXPR = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.S)
_MARKERS = ("{{", "{%", "{#")
# Items that may carry `when:`: path patterns, with None standing for any key or index.
_WHEN_PARENTS = (("actors", None), ("actors", None, "servers", None), ("links", None))

_MAX_SIZE = 1_000_000  # longest string or list `*` may build; `**` exponents are capped alike


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus caps on `**` and `*` so `{{ 9**9**9 }}` cannot hang lint."""

    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context, operator, left, right):
        def number(x):
            return isinstance(x, int) and not isinstance(x, bool)
        if operator == "**" and number(left) and number(right) and abs(left) > 1 and \
                right * abs(left).bit_length() > 100_000:
            raise SecurityError(f"a power with {right * abs(left).bit_length():,} bits is too large for a template")
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and number(n) and len(seq) * n > _MAX_SIZE:
                raise SecurityError(f"a {type(seq).__name__} of {len(seq) * n:,} items is too large for a template")
        return super().call_binop(context, operator, left, right)


_env = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def _is_data(value: Any, depth: int = 0) -> bool:
    """Template results must be YAML data: not functions, classes or other Python objects."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_data(v, depth + 1) for k, v in value.items())
    return False


def _is_when_item(path: tuple) -> bool:
    return any(len(path) == len(p) and all(a is None or a == b for a, b in zip(p, path))
               for p in _WHEN_PARENTS)


class Values(dict):
    """Template values, and the dotted keys `--set` gave (a key that no template reads is a warning)."""

    def __init__(self, data: dict, set_keys: list[str]):
        super().__init__(data)
        self.set_keys = set_keys


def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """`--set a.b=v` pairs → nested dict; v is YAML-typed (`--set n=2` is an int)."""
    result: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE, got '{item}'")
        try:  # the same YAML 1.2 rules as the spec: `on` stays a string, `3.10` keeps its text
            value = loads(raw, "--set").data if raw.strip() else ""
        except SpecError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: '{part}' is already set to a value")
        node[parts[-1]] = value
    return result


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_values(files: list[str] | tuple[str, ...] = (), sets: list[str] | tuple[str, ...] = (),
                values: dict | None = None) -> dict:
    """Values files (later wins), then `values`, then `--set` (wins over all)."""
    result: dict = {}
    for f in files:
        # A values file that is not there is a mistake in the command line, not in the spec.
        if not Path(f).exists():
            raise UsageError(f"--values {f}: no such file")
        if Path(f).is_dir():
            raise UsageError(f"--values {f}: is a directory, not a values file")
        data = load_file(f).data
        if data is None:
            continue
        if not isinstance(data, dict):
            raise SpecError([Diagnostic("OOB110", "a values file must be a mapping", str(f))])
        result = merge(result, data)
    if values:
        result = merge(result, values)
    keys = [item.partition("=")[0].strip() for item in sets]
    return Values(merge(result, parse_set(list(sets))), keys)


class _Renderer:
    def __init__(self, doc: Document, context: dict):
        self.doc = doc
        self.context = context
        self.out = Document(None, doc.file)
        self.problems: list[Diagnostic] = []

    def _fail(self, path: tuple, message: str, code: str = "OOB110") -> None:
        self.problems.append(self.doc.diag(code, message, path))

    def render_scalar(self, value: str, path: tuple) -> Any:
        try:
            match = _ONE_EXPR.match(value)
            if match:
                result = _env.compile_expression(match["expr"], undefined_to_none=False)(**self.context)
                if isinstance(result, str):
                    return resolve_plain(result) if result.strip() == result else result
                if isinstance(result, Undefined):  # a bare undefined name is returned, not raised
                    result._fail_with_undefined_error()
                if not _is_data(result):
                    self._fail(path, f"template result is a {type(result).__name__}, not YAML data "
                               "(a string, number, boolean, null, list or mapping)")
                    return None
                return list(result) if isinstance(result, tuple) else result
            return _env.from_string(value).render(**self.context)
        except SecurityError as exc:
            self._fail(path, f"template refused by the sandbox: {exc}", "OOB111")
        except UndefinedError as exc:
            self._fail(path, f"template error: {exc}")
        except TemplateError as exc:
            self._fail(path, f"template error: {exc.message or exc}")
        except Exception as exc:  # errors raised by filters/tests on user data
            self._fail(path, f"template error: {type(exc).__name__}: {exc}")
        return None

    def walk(self, value: Any, path: tuple, new_path: tuple) -> Any:
        self._record(path, new_path)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "when" and _is_when_item(path):
                    continue
                out[k] = self.walk(v, path + (k,), new_path + (k,))
            return out
        if isinstance(value, list):
            out_list = []
            for i, item in enumerate(value):
                if self._dropped(item, path + (i,)):
                    continue
                out_list.append(self.walk(item, path + (i,), new_path + (len(out_list),)))
            return out_list
        if isinstance(value, str) and any(m in value for m in _MARKERS):
            return self.render_scalar(value, path)
        return value

    def _dropped(self, item: Any, path: tuple) -> bool:
        if not (isinstance(item, dict) and "when" in item and _is_when_item(path)):
            return False
        cond = item["when"]
        if isinstance(cond, str) and any(m in cond for m in _MARKERS):
            cond = self.render_scalar(cond, path + ("when",))
        elif isinstance(cond, str):
            cond = resolve_plain(cond)
        return not cond

    def _record(self, path: tuple, new_path: tuple) -> None:
        if path in self.doc.positions:
            self.out.positions[new_path] = self.doc.positions[path]
        if path in self.doc.key_positions:
            self.out.key_positions[new_path] = self.doc.key_positions[path]

    def render(self) -> Document:
        data = self.doc.data
        if isinstance(data, dict) and isinstance(data.get("actors"), dict):
            # Actors are a mapping, so `when` on them is handled here rather than in walk's list branch.
            actors = {k: v for k, v in data["actors"].items() if not self._dropped(v, ("actors", k))}
            data = {**data, "actors": actors}
        self.out.data = self.walk(data, (), ())
        if self.problems:
            raise SpecError(self.problems)
        return self.out


def render(doc: Document, values: dict | None = None, environ: dict | None = None) -> Document:
    """Evaluate every template in the document; `env` is the environment, the rest are values.
    The rendered document's `warnings` name each `--set` key that no template reads (OOB112)."""
    context = dict(values or {})
    context["env"] = dict(os.environ if environ is None else environ)
    out = _Renderer(doc, context).render()
    out.warnings = unread_sets(doc, getattr(values, "set_keys", []))
    return out


def unread_sets(doc: Document, keys: list[str]) -> list[Diagnostic]:
    """`--set` keys that no template of the document reads (`when:` of items left out included):
    a typo such as `--set inventroy.replicas=3` would otherwise change nothing, silently."""
    if not keys:
        return []
    reads: set[str] = set()
    for text in _templates(doc.data):
        try:
            reads |= _reads(_env.parse(text))
        except TemplateError:
            continue
    out = []
    for key in keys:
        if not any(r == key or key.startswith(r + ".") or r.startswith(key + ".") for r in reads):
            near = difflib.get_close_matches(key, sorted(reads), n=1)
            out.append(doc.diag("OOB112", f"--set {key}: no template in the spec reads it", severity="warning",
                                hint=f"did you mean '{near[0]}'?" if near else None))
    return out


def _templates(value: Any, depth: int = 0) -> list[str]:
    if isinstance(value, str):
        return [value] if any(m in value for m in _MARKERS) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [t for _k, v in items for t in _templates(v, depth + 1)] if depth <= MAX_DEPTH else []


def _reads(template: nodes.Template) -> set[str]:
    """Dotted names a template reads: `a.b`, `a["b"]` and bare `a`, longest chains only."""
    chains = {id(n): _chain(n) for n in template.find_all((nodes.Name, nodes.Getattr, nodes.Getitem))}
    inner = {id(n.node) for n in template.find_all((nodes.Getattr, nodes.Getitem)) if chains[id(n)]}
    return {c for i, c in chains.items() if c and i not in inner}


def _chain(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        key = node.attr
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        key = node.arg.value
    else:
        return None
    base = _chain(node.node)
    return f"{base}.{key}" if base else None


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes a float as the user wrote it (`python: 3.10` stays 3.10), and
    quotes a string our YAML 1.2 loader would read as something else ("1e3", "0o17")."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == "tag:yaml.org,2002:str":
            typed = resolve_plain(value)
            if typed is not value:  # the YAML 1.1 resolvers took it for text; YAML 1.2 does not
                return "tag:yaml.org,2002:" + {bool: "bool", int: "int", YamlFloat: "float"}.get(type(typed), "null")
        return tag


_Dumper.add_representer(YamlFloat, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:float", value.text))
# PyYAML writes NEL, LS and PS raw inside single quotes, where a reader folds them into a space.
_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if any(c in value for c in "\x85\u2028\u2029") else None))


def to_yaml(data: Any) -> str:
    """Rendered spec as YAML text (plain types only; YAML 1.1 look-alikes are quoted)."""
    return yaml.dump(_plain(data), Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not isinstance(value, YamlFloat):
        return float(value)
    return value
