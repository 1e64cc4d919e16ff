"""Phase 1: the positioned YAML loader (YAML 1.2 core scalars, no tags, caps, positions)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oobspec
from oobspec.api import lint_file
from oobspec.checks import check, validate
from oobspec.errors import SpecError
from oobspec.loader import (
    MAX_BYTES,
    MAX_DEPTH,
    Document,
    YamlFloat,
    load_file,
    loads,
    resolve_plain,
    scalar_text,
)
from oobspec.render import render, to_yaml

pytestmark = pytest.mark.timeout(30)


def codes(exc: SpecError) -> list[str]:
    return [d.code for d in exc.diagnostics]


def refused(text, code: str):
    with pytest.raises(SpecError) as info:
        loads(text, "t.yaml")
    assert codes(info.value) == [code], info.value
    return info.value.diagnostics[0]


# --- YAML 1.2 scalars ---------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "y", "n", "On", "YES", "No"])
def test_yaml11_booleans_stay_strings(word):
    assert loads(f"a: {word}").data == {"a": word}


@pytest.mark.parametrize("text, value", [
    ("true", True), ("false", False), ("True", True), ("FALSE", False),
    ("1", 1), ("-7", -7), ("+3", 3), ("0o17", 15), ("0x1F", 31),
    ("~", None), ("null", None), ("", None),
    ("1.5", 1.5), ("1e3", 1000.0), (".5", 0.5),
])
def test_yaml12_core_scalars(text, value):
    got = loads(f"a: {text}").data["a"]
    assert got == value and type(got) in (type(value), YamlFloat)
    if isinstance(value, bool):
        assert isinstance(got, bool)


def test_special_floats_and_sexagesimal():
    data = loads("a: .inf\nb: -.inf\nc: .nan\nd: 1:30\ne: 0b101\nf: 1_000").data
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])
    # YAML 1.1 sexagesimal, binary and underscore numbers are plain strings in YAML 1.2
    assert data["d"] == "1:30" and data["e"] == "0b101" and data["f"] == "1_000"


def test_float_keeps_its_text():
    value = loads("python: 3.10").data["python"]
    assert isinstance(value, YamlFloat) and value == 3.1
    assert scalar_text(value) == "3.10" and str(value) == "3.10"
    assert scalar_text(True) == "true" and scalar_text(7) == "7"
    assert resolve_plain("3.10").text == "3.10"


def test_quoted_scalars_stay_strings():
    data = loads("a: '1'\nb: \"true\"\nc: 'null'\nd: !!str 5\ne: !!int '5'\nf: !!float 2").data
    assert data == {"a": "1", "b": "true", "c": "null", "d": "5", "e": 5, "f": 2.0}


def test_wrong_explicit_core_tag_is_refused():
    refused("a: !!int five", "OOB100")


def test_env_value_310_stays_310_and_version_is_int(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nname: s\nactors:\n  a:\n    class: m:C\n"
                    "    env: {PY: 3.10, FLAG: on, N: 12, OFF: no, T: true}\n")
    loaded = oobspec.load(spec)
    assert loaded.version == 1 and isinstance(loads(spec.read_text()).data["version"], int)
    assert loaded.actors["a"].env == {"PY": "3.10", "FLAG": "on", "N": "12", "OFF": "no", "T": "true"}


# --- refused documents --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['true']",
    "a: !!python/name:os.system",
    "a: !!binary aGVsbG8=",
    "a: !custom 1",
    "a: !!set {x}",
    "--- !!omap\n- a: 1",
])
def test_tags_are_refused(text):
    refused(text, "OOB102")


def test_python_tag_never_constructs(tmp_path):
    marker = tmp_path / "pwned"
    d = refused(f"a: !!python/object/apply:os.system ['touch {marker}']", "OOB102")
    assert not marker.exists()
    assert (d.line, d.col) == (1, 4)


def billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused():
    d = refused(billion_laughs(), "OOB103")
    assert "alias" in d.message


def test_small_aliases_are_fine():
    data = loads("base: &b {cpus: 1}\na: *b\nb: *b\n").data
    assert data["a"] == data["b"] == {"cpus": 1}


def test_unknown_alias():
    d = refused("a: *nope", "OOB100")
    assert (d.line, d.col) == (1, 4)


def test_deep_nesting_is_refused():
    refused("a: " + "[" * 100 + "]" * 100, "OOB103")
    refused("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 80)), "OOB103")
    # within the cap is fine: the root mapping plus 63 lists
    assert loads("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)).data


def test_deep_nesting_through_aliases_is_refused():
    lines = [f"x{i}: &a{i} " + "[" * 40 + (f"*a{i - 1}" if i else "1") + "]" * 40 for i in range(5)]
    refused("\n".join(lines), "OOB103")


def test_size_cap(tmp_path):
    big = "a: " + "x" * (MAX_BYTES + 10)
    refused(big, "OOB103")
    refused(big.encode(), "OOB103")
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert codes(info.value) == ["OOB103"]


def test_duplicate_keys_name_both_lines():
    d = refused("actors:\n  a: 1\n  b: 2\n  a: 3\n", "OOB101")
    assert (d.line, d.col) == (4, 3)
    assert "'a'" in d.message and "line 2" in d.message


def test_duplicate_keys_after_typing():
    # 1 and "1" are different YAML values but the same key once keys are text
    d = refused("m:\n  1: a\n  '1': b\n", "OOB101")
    assert d.line == 3


def test_multi_document_refused():
    d = refused("a: 1\n---\nb: 2\n", "OOB100")
    assert d.line == 2 and "document" in d.message


def test_single_explicit_document_is_fine():
    assert loads("---\na: 1\n...\n").data == {"a": 1}


def test_non_utf8_refused(tmp_path):
    refused(b"a: caf\xe9\n", "OOB100")
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert codes(info.value) == ["OOB100"] and "UTF-8" in info.value.diagnostics[0].message


def test_utf8_with_bom_and_unicode():
    assert loads("\ufeffa: café\n".encode("utf-8")).data == {"a": "café"}


def test_syntax_error_position():
    d = refused("a: [1, 2\nb: 3\n", "OOB100")
    assert d.line == 2
    d = refused("a: 'unterminated\n", "OOB100")
    assert d.message.startswith("invalid YAML")


def test_complex_keys_refused():
    refused("? [a, b]\n: 1\n", "OOB100")
    refused("? {a: 1}\n: 1\n", "OOB100")


def test_missing_unreadable_and_directory(tmp_path):
    for path in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(SpecError) as info:
            load_file(path)
        assert codes(info.value) == ["OOB100"]


# --- merge keys and positions -------------------------------------------------------------------


def test_merge_keys():
    text = """\
defaults: &defaults
  restarts: -1
  env: {A: "1"}
  replicas: 1
a:
  <<: *defaults
  replicas: 3
b:
  replicas: 2
  <<: *defaults
c:
  <<: [*defaults, {extra: yes}]
"""
    data = loads(text).data
    assert data["a"] == {"restarts": -1, "env": {"A": "1"}, "replicas": 3}
    assert data["b"] == {"replicas": 2, "restarts": -1, "env": {"A": "1"}}
    assert data["c"] == {"restarts": -1, "env": {"A": "1"}, "replicas": 1, "extra": "yes"}
    assert "<<" not in data["a"]


def test_only_a_plain_merge_key_merges():
    text = "base: &b {x: 1}\nquoted:\n  '<<': *b\ntagged:\n  !!str <<: 1\nplain:\n  <<: *b\n  y: 2\nvalue: <<\n"
    assert loads(text).data == {"base": {"x": 1}, "quoted": {"<<": {"x": 1}}, "tagged": {"<<": 1},
                                "plain": {"x": 1, "y": 2}, "value": "<<"}


@pytest.mark.parametrize("text", ["a: !!int [1]", "a: !!str {b: 1}", "a: !!map [1]", "a: !!seq {b: 1}",
                                  "a: !!null []", "!!bool {}"])
def test_core_tag_must_fit_a_collection(text):
    d = refused(text, "OOB100")
    assert "does not fit a" in d.message


def test_fitting_collection_tags_are_fine():
    assert loads("a: !!map {b: 1}\nc: !!seq [1]\nd: ! [2]\n").data == {"a": {"b": 1}, "c": [1], "d": [2]}


def test_merge_of_a_scalar_is_refused():
    refused("a: &x 1\nb:\n  <<: *x\n", "OOB100")


def test_positions_recorded():
    text = "version: 1\nactors:\n  web:\n    servers:\n      - {name: http, port: 8080}\n      - name: rpc\n"
    doc = loads(text, "f.yaml")
    assert doc.file == "f.yaml"
    assert doc.positions[()] == (1, 1)
    assert doc.positions[("version",)] == (1, 10)
    assert doc.key_positions[("version",)] == (1, 1)
    assert doc.key_positions[("actors", "web")] == (3, 3)
    assert doc.positions[("actors", "web")] == (4, 5)
    assert doc.positions[("actors", "web", "servers", 0)] == (5, 9)
    assert doc.positions[("actors", "web", "servers", 0, "port")] == (5, 28)
    assert doc.key_positions[("actors", "web", "servers", 0, "port")] == (5, 22)
    assert doc.positions[("actors", "web", "servers", 1, "name")] == (6, 15)
    # a path that is not in the file falls back to its nearest ancestor
    assert doc.where(("actors", "web", "servers", 1, "port")) == (6, 9)
    assert doc.where(("actors", "web", "nothing"), key=True) == (3, 3)
    d = doc.diag("OOB999", "msg", ("version",))
    assert (d.file, d.line, d.col) == ("f.yaml", 1, 10)


def test_empty_document():
    assert loads("").data is None
    assert loads("# only a comment\n").data is None


# --- fuzzing: only SpecError, never anything else; what parses, parses to the right data ------

# FUZZ_N=3000 for a deeper run (give it --timeout 600 too; the module caps a test at 30 s).
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_N", 150)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
_PYYAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["on", "no", "3.10", "{{ x }}", "{{ env.HOME }}", "*a", "&a", "!!str",
                                           "<<", "{% for %}", "{{ ''.__class__ }}", "{{ 1/0 }}", "1e3", "0o17",
                                           "+.5", ".NaN", "1_000", "~", ""]),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(
                                   ["version", "name", "actors", "class", "servers", "port", "when", "<<",
                                    "links", "from", "to", "buffers", "connect", "replicas", "1", "on", "1e3"])),
                                   children, max_size=5)),
    max_leaves=30,
)
# Random text rarely holds YAML structure; text over YAML's own punctuation often does.
yaml_text = st.one_of(st.text(max_size=400), st.text(alphabet="ab1 :-?[]{},#&*!|>'\"\n", max_size=200))


def _kind(value) -> type:
    return bool if isinstance(value, bool) else float if isinstance(value, float) else type(value)


def same(a, b) -> bool:
    """Equal data, with types told apart (True is not 1, 1.0 is not 1) and NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return _kind(a) is _kind(b) and a == b


def shape(value) -> str:
    return {dict: "mapping", list: "list", type(None): "null"}.get(type(value), "scalar")


def pyyaml_shape(text: str) -> tuple[str, int]:
    """Root shape and size as PyYAML's parser (the same C parser, no constructors) sees the text."""
    node = yaml.compose(text, Loader=_PYYAML)
    if node is None or node.tag == "tag:yaml.org,2002:null":
        return "null", 0
    kind = {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "scalar")
    return kind, len(node.value) if kind != "scalar" else 0


def check_against_pyyaml(text: str):
    """loads either refuses (SpecError, loader codes only) or reads what PyYAML's parser reads:
    the same root shape (YAML 1.1 and 1.2 differ on scalar types only) and size."""
    try:
        data = loads(text).data
    except SpecError as exc:
        assert all(d.code.startswith("OOB10") for d in exc.diagnostics), exc
        return
    kind, size = pyyaml_shape(text)
    # null is a scalar type too: `! >` is "" in YAML 1.2 (the non-specific tag makes it a string),
    # None to PyYAML
    assert shape(data) == kind or {shape(data), kind} == {"scalar", "null"}, (data, text)
    if kind == "list" or (kind == "mapping" and "<<" not in text):  # merge keys are folded in
        assert len(data) == size, (data, text)


@FUZZ
@given(yaml_text)
def test_fuzz_text_only_spec_errors(text):
    check_against_pyyaml(text)


@FUZZ
@given(st.one_of(st.binary(max_size=400), yaml_text.map(lambda t: t.encode())))
def test_fuzz_bytes_only_spec_errors(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(SpecError) as info:
            loads(data)
        assert codes(info.value) == ["OOB100"] and "not UTF-8" in info.value.diagnostics[0].message
        return
    check_against_pyyaml(text)


@FUZZ
@given(trees)
def test_fuzz_yaml_structures_round_trip(tree):
    # Every scalar quoted and tagged: the loader must give back exactly the tree.
    tagged = yaml.safe_dump(tree, allow_unicode=True, default_style='"')
    assert same(loads(tagged).data, tree), tagged
    # `oob render` output (plain scalars where YAML 1.2 reads them back as they were) too.
    rendered = to_yaml(tree)
    assert same(loads(rendered).data, tree), rendered


names = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
servers = st.fixed_dictionaries({"name": names}, optional={
    "protocol": st.sampled_from(["http", "grpc", "tcp", "ftp", 1]),
    "port": st.one_of(st.integers(-5, 70000), st.just("{{ port }}"), scalars),
    "host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::", 5]),
    "routes": st.lists(st.fixed_dictionaries({"path": st.sampled_from(["/", "/a/{k}", "x"]), "call": names}), max_size=2),
    "methods": st.lists(names, max_size=2), "service": st.sampled_from(["a.B", None]),
    "when": st.sampled_from([True, False, "{{ flag }}", "{{ nope }}"]),
})
actors = st.fixed_dictionaries({}, optional={
    "class": st.sampled_from(["m:C", "fixture_classes:Plain", "bad", 5]),
    "command": st.lists(st.text(max_size=5), max_size=2),
    "replicas": st.one_of(st.integers(-1, 5), st.just("{{ n }}"), scalars),
    "restarts": st.integers(-2, 3),
    "resources": st.fixed_dictionaries({}, optional={"cpus": scalars, "gpus": st.integers(-1, 2),
                                                     "memory": st.sampled_from(["1GiB", "x", 5, -1])}),
    "env": st.dictionaries(names, scalars, max_size=2),
    "connect": st.dictionaries(st.text(max_size=6), st.sampled_from(["a.http", "b.rpc", "c", "zz.x"]), max_size=2),
    "servers": st.lists(servers, max_size=3),
    "buffers": st.dictionaries(names, st.fixed_dictionaries({"shape": st.lists(st.integers(0, 4), max_size=2)}, optional={
        "dtype": st.sampled_from(["float32", "int8", "foo"]), "device": st.sampled_from(["cpu", "gpu", "tpu"])}), max_size=2),
    "when": st.sampled_from([True, False, "{{ flag }}"]),
    "junk": scalars,
})
specs = st.fixed_dictionaries({"version": st.sampled_from([1, 2, "1"]), "name": st.one_of(names, scalars),
                               "actors": st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c", "Bad"]), actors,
                                                                   max_size=3), trees)},
                              optional={"links": st.lists(st.fixed_dictionaries(
                                  {"name": names, "from": st.sampled_from(["a.w", "b.w", "x"]),
                                   "to": st.one_of(st.sampled_from(["a.w", "b.w"]), st.lists(st.sampled_from(["a.w", "b.w", "q"]), max_size=2))},
                                  optional={"transport": st.sampled_from(["auto", "shm", "nccl", "cuda_ipc", "x"])}), max_size=2),
                                  "ray": st.one_of(trees, st.fixed_dictionaries({}, optional={"placement": st.sampled_from(["PACK", "x"])})),
                                  "extra": trees})


def lint_tree(tree, values: dict) -> list[str]:
    """The codes lint finds in a tree that never went through YAML text."""
    try:
        doc = render(Document(tree), values)
        return [d.code for d in check(validate(doc), doc, None, imports=False)]
    except SpecError as exc:
        return [d.code for d in exc.diagnostics]


def lint_text(text: str, values: dict | None = None) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        diags = lint_file(path, values, imports=False)
    lines = max(1, len(text.splitlines()))
    for d in diags:
        assert d.code.startswith("OOB") and 1 <= d.line <= lines + 1 and d.col >= 1, d
        assert "\n" not in str(d)
    return diags


@FUZZ
@given(st.one_of(specs, trees), st.sampled_from([{}, {"flag": True, "n": 2, "port": 8080}]))
def test_fuzz_lint_file_only_diagnostics(tree, values):
    # Written out and read back, the spec lints as the tree itself does.
    diags = lint_text(to_yaml(tree), values)
    assert sorted(d.code for d in diags) == sorted(lint_tree(tree, values))


@FUZZ
@given(yaml_text)
def test_fuzz_lint_file_text(text):
    diags = lint_text(text)
    try:
        loads(text)
    except SpecError as exc:  # refused by the loader: lint says what the loader says
        assert [(d.code, d.line, d.col, d.message) for d in diags] == \
            [(d.code, d.line, d.col, d.message) for d in exc.diagnostics]
        return
    codes_found = {d.code for d in diags}
    if not codes_found & {"OOB110", "OOB111"}:  # rendered: then a spec that is not a mapping is OOB121
        assert ("OOB121" in codes_found) == (pyyaml_shape(text)[0] != "mapping"), diags
