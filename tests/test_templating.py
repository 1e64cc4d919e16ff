"""Phase 2: Jinja2 per value in the parsed tree — typed results, `when`, values, sandbox."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import oobspec
from conftest import oob, user_env, with_examples
from oobspec.errors import SpecError, UsageError
from oobspec.loader import YamlFloat, loads
from oobspec.render import load_values, merge, parse_set, render, to_yaml

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    with_examples(tmp_path, text)
    return path


def rendered(text: str, values: dict | None = None, environ: dict | None = None):
    return render(loads(textwrap.dedent(text), "t.yaml"), values, environ if environ is not None else {}).data


def render_error(text: str, values: dict | None = None, environ: dict | None = None) -> list:
    with pytest.raises(SpecError) as info:
        rendered(text, values, environ)
    return info.value.diagnostics


# --- typed results --------------------------------------------------------------------------------


def test_one_expression_takes_the_type_of_its_result():
    data = rendered("""\
        n: "{{ n }}"
        s: "{{ s }}"
        lst: "{{ items }}"
        m: "{{ mapping }}"
        f: "{{ ratio }}"
        b: "{{ flag }}"
        none: "{{ nothing }}"
        sum: "{{ n + 1 }}"
        spaced: "  {{ n }}  "
        text_number: "{{ '8080' }}"
        mixed: "port-{{ n }}"
        two: "{{ n }}{{ n }}"
    """, {"n": 2, "s": "hello", "items": [1, "a"], "mapping": {"k": 1}, "ratio": 0.5, "flag": False,
          "nothing": None})
    assert data["n"] == 2 and type(data["n"]) is int
    assert data["s"] == "hello"
    assert data["lst"] == [1, "a"] and data["m"] == {"k": 1}
    assert data["f"] == 0.5 and data["b"] is False and data["none"] is None
    assert data["sum"] == 3 and data["spaced"] == 2
    assert data["text_number"] == 8080  # a string result is read as YAML: "8080" is a number
    assert data["mixed"] == "port-2" and data["two"] == "22"


def test_string_results_stay_strings_where_text_is_wanted(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: "{{ name }}"
        actors:
          a:
            class: m:C
            replicas: "{{ n }}"
            env:
              GREETING: "{{ greeting }}"
              PORT: "{{ port }}"
              PY: "{{ py }}"
              LABEL: "py{{ py }}"
    """)
    spec = oobspec.load(spec, {"name": "demo", "n": "3", "greeting": "hi there", "port": 8080}, sets=["py=3.10"])
    assert spec.name == "demo" and spec.actors["a"].replicas == 3
    assert spec.actors["a"].env == {"GREETING": "hi there", "PORT": "8080", "PY": "3.10", "LABEL": "py3.10"}


def test_list_result_and_default_filter():
    data = rendered("""\
        args: "{{ args | default([1, 2]) }}"
        port: "{{ port | default(8080) }}"
        given: "{{ given | default(1) }}"
        host: "{{ host | default('127.0.0.1') }}"
    """, {"given": 5})
    assert data == {"args": [1, 2], "port": 8080, "given": 5, "host": "127.0.0.1"}


@pytest.mark.parametrize("expr, kind", [("range(3)", "range"), ("lipsum", "function"), ("cycler", "type"),
                                        ("dict", "type"), ("''.upper", "builtin_function_or_method")])
def test_non_data_results_are_refused(expr, kind):
    (d,) = render_error(f'a: "{{{{ {expr} }}}}"')
    assert (d.code, d.line, d.col) == ("OOB110", 1, 4)
    assert d.message == (f"template result is a {kind}, not YAML data "
                         "(a string, number, boolean, null, list or mapping)")


def test_tuples_become_lists():
    assert rendered('a: "{{ (1, 2) }}"') == {"a": [1, 2]}


def test_templates_in_keys_are_not_evaluated():
    assert rendered("'{{ k }}': 1") == {"{{ k }}": 1}


# --- errors keep their positions ------------------------------------------------------------------


def test_undefined_is_an_error_at_the_scalar():
    diags = render_error("""\
        a: 1
        b:
          c: [x, "{{ missing }}"]
          d: "hello {{ also_missing }}"
    """)
    assert [(d.code, d.line, d.col) for d in diags] == [("OOB110", 3, 10), ("OOB110", 4, 6)]
    assert "'missing' is undefined" in diags[0].message


def test_undefined_attribute_and_filter_errors():
    (d,) = render_error('a: "{{ v.nope }}"', {"v": {"x": 1}})
    assert (d.code, d.message) == ("OOB110", "template error: 'dict object' has no attribute 'nope'")
    (d,) = render_error('a: "{{ 1 / 0 }}"')
    assert (d.code, d.message) == ("OOB110", "template error: ZeroDivisionError: division by zero")
    (d,) = render_error('a: "{{ x | no_such_filter }}"', {"x": 1})
    assert (d.code, d.message) == ("OOB110", "template error: No filter named 'no_such_filter'.")
    (d,) = render_error('a: "{{ unclosed "')
    assert (d.code, d.line, d.col) == ("OOB110", 1, 4)
    assert d.message.startswith("template error: unexpected end of template")


def test_undefined_in_lint_file(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: t
        actors:
          a:
            class: m:C
            replicas: "{{ replica_count }}"
    """)
    (d,) = oobspec.lint_file(spec)
    assert (d.code, d.line, d.col) == ("OOB110", 6, 15)


def test_positions_survive_dropped_items(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: t
        actors:
          a:
            class: m:C
            restarts: 1
            servers:
              - name: off
                when: false
              - name: http
                prot: 1
    """)
    (d,) = oobspec.lint_file(spec, imports=False)
    assert (d.code, d.line, d.col) == ("OOB120", 11, 9)


# --- when -----------------------------------------------------------------------------------------

WHEN_SPEC = """\
    version: 1
    name: t
    actors:
      a:
        class: m:C
        buffers: {w: {shape: [2]}}
        servers:
          - {name: http, when: "{{ http }}"}
          - {name: rpc, protocol: grpc}
      b:
        class: m:C
        when: "{{ with_b }}"
        buffers: {w: {shape: [2]}}
      c:
        class: m:C
        when: true
    links:
      - {name: w, from: a.w, to: [b.w], when: "{{ with_b }}"}
"""


def test_when_false_drops_actors_servers_and_links():
    data = rendered(WHEN_SPEC, {"http": False, "with_b": False})
    assert set(data["actors"]) == {"a", "c"}
    assert [s["name"] for s in data["actors"]["a"]["servers"]] == ["rpc"]
    assert data["links"] == []
    assert "when" not in data["actors"]["c"]


def test_when_true_keeps_them():
    data = rendered(WHEN_SPEC, {"http": True, "with_b": "yes"})
    assert set(data["actors"]) == {"a", "b", "c"}
    assert [s["name"] for s in data["actors"]["a"]["servers"]] == ["http", "rpc"]
    assert len(data["links"]) == 1
    assert all("when" not in x for x in [*data["actors"].values(), *data["links"], *data["actors"]["a"]["servers"]])


@pytest.mark.parametrize("value, kept", [("false", False), ("0", False), ("", False), ("null", False),
                                         ("true", True), ("1", True), ("on", True)])
def test_when_from_environment_text(value, kept):
    data = rendered(WHEN_SPEC.replace("{{ with_b }}", "{{ env.WITH_B }}"), {"http": True}, {"WITH_B": value})
    assert ("b" in data["actors"]) is kept


def test_dropped_actor_templates_are_not_evaluated():
    data = rendered("""\
        actors:
          gone:
            when: false
            replicas: "{{ undefined_here }}"
    """)
    assert data == {"actors": {}}


def test_when_on_other_items_is_a_schema_error(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: t
        when: false
        actors: {a: {class: "m:C"}}
    """)
    (d,) = oobspec.lint_file(spec, imports=False)
    assert (d.code, d.line, d.col) == ("OOB120", 3, 1)


# --- values ---------------------------------------------------------------------------------------


def test_values_files_later_wins_deep_merge_and_set_wins(tmp_path):
    one = write(tmp_path, "a: {x: 1, y: 1, deep: {p: 1, q: 1}}\nlist: [1, 2]\nonly_one: 1\n", "one.yaml")
    two = write(tmp_path, "a: {y: 2, deep: {q: 2}}\nlist: [3]\n", "two.yaml")
    values = load_values([one, two])
    assert values == {"a": {"x": 1, "y": 2, "deep": {"p": 1, "q": 2}}, "list": [3], "only_one": 1}
    values = load_values([one, two], ["a.deep.q=3", "a.new=on", "only_one=3.10", "list=[9, x]"], {"a": {"x": 5}})
    assert values["a"] == {"x": 5, "y": 2, "deep": {"p": 1, "q": 3}, "new": "on"}
    assert str(values["only_one"]) == "3.10" and values["list"] == [9, "x"]


def test_set_is_yaml_typed():
    assert parse_set(["n=2", "f=0.5", "b=true", "s=hello", "on=on", "e=", "z=null", "q='2'", "k=a=b"]) == {
        "n": 2, "f": 0.5, "b": True, "s": "hello", "on": "on", "e": "", "z": None, "q": "2", "k": "a=b"}
    assert parse_set(["a.b.c=1", "a.b.d=2"]) == {"a": {"b": {"c": 1, "d": 2}}}


@pytest.mark.parametrize("item", ["novalue", "=1", " =2"])
def test_bad_set_is_a_usage_error(item):
    with pytest.raises(UsageError) as info:
        parse_set([item])
    assert str(info.value) == f"--set takes KEY=VALUE, got '{item}'"


def test_set_over_a_value_is_a_usage_error():
    with pytest.raises(UsageError) as info:
        parse_set(["a=1", "a.b=2"])
    assert str(info.value) == "--set a.b: 'a' is already set to a value"


def test_merge_does_not_mutate():
    base = {"a": {"b": 1}}
    out = merge(base, {"a": {"c": 2}})
    assert base == {"a": {"b": 1}} and out == {"a": {"b": 1, "c": 2}}


def test_values_file_must_be_a_mapping(tmp_path):
    bad = write(tmp_path, "- 1\n", "bad.yaml")
    with pytest.raises(SpecError) as info:
        load_values([bad])
    assert [(d.code, d.message, d.file) for d in info.value.diagnostics] == \
        [("OOB110", "a values file must be a mapping", str(bad))]
    empty = write(tmp_path, "", "empty.yaml")
    assert load_values([empty]) == {}


def test_missing_values_file_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UsageError) as info:
        load_values([missing])
    assert str(info.value) == f"--values {missing}: no such file"
    with pytest.raises(UsageError) as info:
        load_values([tmp_path])
    assert str(info.value) == f"--values {tmp_path}: is a directory, not a values file"
    spec = write(tmp_path, "version: 1\nname: t\nactors: {a: {class: 'm:C'}}\n")
    with pytest.raises(UsageError, match="no such file"):
        oobspec.lint_file(spec, value_files=[missing])


def test_values_through_load(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: "{{ name | default('web') }}"
        actors:
          a:
            class: m:C
            replicas: "{{ a.replicas }}"
    """)
    values = write(tmp_path, "a: {replicas: 2}\n", "values.yaml")
    loaded = oobspec.load(spec, value_files=[values])
    assert (loaded.name, loaded.actors["a"].replicas) == ("web", 2)
    loaded = oobspec.load(spec, value_files=[values], sets=["a.replicas=4", "name=other"])
    assert (loaded.name, loaded.actors["a"].replicas) == ("other", 4)
    loaded = oobspec.load(spec, {"a": {"replicas": 5}}, value_files=[values])
    assert loaded.actors["a"].replicas == 5


def test_env_holds_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OOB_TEST_LEVEL", "debug")
    data = render(loads('a: "{{ env.OOB_TEST_LEVEL }}"'), {}).data  # environ defaults to os.environ
    assert data == {"a": "debug"}
    assert rendered('a: "{{ env.X }}"', environ={"X": "1"}) == {"a": 1}
    (d,) = render_error('a: "{{ env.NOT_SET_ANYWHERE }}"', environ={})
    assert (d.code, d.message) == ("OOB110", "template error: 'dict object' has no attribute 'NOT_SET_ANYWHERE'")
    assert rendered("a: \"{{ env.get('NOPE', 'dflt') }}\"", environ={}) == {"a": "dflt"}


# --- sandbox --------------------------------------------------------------------------------------

def unsafe(attr: str, owner: str) -> tuple[str, str]:
    return "OOB111", f"template refused by the sandbox: access to attribute '{attr}' of '{owner}' object is unsafe."


def too_large(what: str) -> tuple[str, str]:
    return "OOB111", f"template refused by the sandbox: {what} is too large for a template"


# Each escape with the exact refusal the sandbox gives: a plain jinja2.Environment fails every one
# (it runs the escape, returns a non-data object, hangs or runs out of memory instead).
ESCAPES = [
    ("''.__class__.__mro__", unsafe("__class__", "str")),
    ("''.__class__.__mro__[1].__subclasses__()", unsafe("__class__", "str")),
    ("cycler.__init__.__globals__", unsafe("__init__", "type")),
    ("cycler.__init__.__globals__.os.system('touch {marker}')", unsafe("__init__", "type")),
    ("joiner.__init__.__globals__.os.popen('touch {marker}').read()", unsafe("__init__", "type")),
    ("namespace.__init__.__globals__", unsafe("__init__", "type")),
    ("lipsum.__globals__['os'].system('touch {marker}')", unsafe("__globals__", "function")),
    # the sandbox's `range` is its own bounded function, not the builtin type
    ("range.__subclasses__()", ("OOB110", "template error: 'function object' has no attribute '__subclasses__'")),
    ("self.__init__.__globals__", unsafe("__init__", "TemplateReference")),
    ("().__class__.__base__.__subclasses__()", unsafe("__class__", "tuple")),
    ("env.__class__", unsafe("__class__", "dict")),
    ("env.get.__self__", unsafe("__self__", "builtin_function_or_method")),
    ("'{0.__class__}'.format(1)", unsafe("__class__", "int")),
    ("'{c.__init__.__globals__}'.format_map({'c': cycler})", unsafe("__init__", "type")),
    ("config.__class__", unsafe("__class__", "StrictUndefined")),
    ("[].__class__.__base__", unsafe("__class__", "list")),
    ("x.__class__.__base__.__subclasses__()", unsafe("__class__", "list")),
    ("x.append(1)", unsafe("append", "list")),
    ("{}.update({'a': 1})", unsafe("update", "dict")),
    ("9 ** 99999999", too_large("a power with 399,999,996 bits")),
    ("(10 ** 4000) ** 4000", too_large("a power with 53,152,000 bits")),
    ("'x' * 10 ** 9", too_large("a str of 1,000,000,000 items")),
    ("[0] * 10 ** 9", too_large("a list of 1,000,000,000 items")),
    ("range(10 ** 9) | list", ("OOB110", "template error: OverflowError: Range too big. "
                                         "The sandbox blocks ranges larger than MAX_RANGE (100000).")),
]


@pytest.mark.parametrize("expr, refusal", ESCAPES, ids=[e for e, _ in ESCAPES])
def test_sandbox_escapes_are_refused(expr, refusal, tmp_path):
    marker = tmp_path / "pwned"
    text = 'a: "{{ ' + expr.replace("{marker}", str(marker)).replace('"', '\\"') + ' }}"\n'
    diags = render_error(text, {"x": []})
    assert [(d.code, d.message, d.line, d.col) for d in diags] == [(*refusal, 1, 4)]
    assert not marker.exists()


def test_sandbox_escape_in_statement_block(tmp_path):
    marker = tmp_path / "pwned"
    text = ("a: \"{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
            f"{{{{ c.__init__.__globals__['os'].system('touch {marker}') }}}}{{% endfor %}}\"\n")
    (d,) = render_error(text)
    assert (d.code, d.message) == unsafe("__class__", "str")
    assert not marker.exists()


# --- rendered output ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, values", [
    ("counter.yaml", []), ("cpu-link.yaml", []), ("gpu-link.yaml", []), ("grpc.yaml", []),
    ("process.yaml", []), ("web.yaml", ["web.values.yaml"]),
])
def test_rendered_output_reloads_to_the_same_spec(name, values, tmp_path):
    spec_path = ROOT / "specs" / name
    value_files = [ROOT / "specs" / v for v in values]
    spec = oobspec.load(spec_path, value_files=value_files)
    text = to_yaml(spec._source.document.data)
    assert "{{" not in text
    again_path = tmp_path / name
    again_path.write_text(text)
    again = oobspec.load(again_path)
    assert again.model_dump(by_alias=True) == spec.model_dump(by_alias=True)


def test_rendered_output_keeps_text_that_looks_like_other_types(tmp_path):
    spec = write(tmp_path, """\
        version: 1
        name: t
        actors:
          a:
            class: m:C
            args: ["on", "no", "3.10", 3.10, 1e3, "0x10", yes, ~, "", "{{ '123' }}"]
            env: {PY: 3.10, A: "yes", B: "{{ v }}"}
    """)
    spec = oobspec.load(spec, {"v": "0.50"})
    text = to_yaml(spec._source.document.data)
    (tmp_path / "again.yaml").write_text(text)
    again = oobspec.load(tmp_path / "again.yaml")
    assert again.actors["a"].args == spec.actors["a"].args
    assert again.actors["a"].env == spec.actors["a"].env == {"PY": "3.10", "A": "yes", "B": "0.50"}


def test_rendered_output_keeps_yaml12_numbers_and_odd_line_breaks_as_text():
    # The dumper's own resolvers are YAML 1.1: "1e3" and "0o17" are text there, numbers to our loader.
    data = {"args": ["1e3", "0o17", "+.5", "1e-3", "3.10", "on", "plain"], "breaks": ["a\x85b", "c\u2028d"],
            "floats": [YamlFloat(1000.0, "1e3"), YamlFloat(3.1, "3.10")], "n": 15}
    text = to_yaml(data)
    assert loads(text).data == data
    assert "args: ['1e3', '0o17', '+.5', '1e-3', '3.10', 'on', plain]" in text  # still one flow list
    assert "floats: [1e3, 3.10]" in text  # a float is written as the user wrote it, with no !!float


SECRET_SPEC = """\
    version: 1
    name: secret
    actors:
      a:
        class: examples.counter:Counter
        restarts: 1
        env: {MODE: "{{ mode }}"}
        servers:
          - name: http
            port: 0
            auth: {token_env: OOB_TEST_TOKEN}
"""


def test_auth_token_never_in_render_output(tmp_path):
    spec = write(tmp_path, SECRET_SPEC)
    secret = "s3cr3t-value-9f8e7d"
    env = user_env(OOB_TEST_TOKEN=secret)
    proc = oob("render", spec, "--set", "mode=fast", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert "token_env: OOB_TEST_TOKEN" in proc.stdout and "MODE: fast" in proc.stdout
    proc = oob("lint", "-o", "json", spec, "--set", "mode=x", env=env, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stdout + proc.stderr  # it did lint, cleanly
    assert secret not in proc.stdout + proc.stderr
