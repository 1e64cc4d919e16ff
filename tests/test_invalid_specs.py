"""The invalid-spec corpus: every file in tests/invalid/ names, on its first lines, exactly the
diagnostics (code and line:col) `oob lint` must report for it.

    # expect: OOB301 12:34

Helper classes the specs import live beside them (tests/invalid/fixture_classes.py): the
linter imports from the spec's folder, as the actors will.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import oobspec
from oobspec import lint_file
from oobspec.report import diagnostics

pytestmark = pytest.mark.timeout(30)

CORPUS = Path(__file__).parent / "invalid"
FILES = sorted(CORPUS.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (OOB\d{3}) (\d+):(\d+)\s*$")

# Every rule code the checker emits; the corpus must exercise each one.
ALL_CODES = {
    "OOB100", "OOB101", "OOB102", "OOB103", "OOB110", "OOB111", "OOB120", "OOB121", "OOB122", "OOB123", "OOB130",
    "OOB201", "OOB202", "OOB203", "OOB204", "OOB205", "OOB206", "OOB207",
    "OOB301", "OOB302", "OOB303", "OOB304", "OOB305", "OOB306", "OOB307", "OOB308", "OOB310", "OOB311", "OOB312", "OOB313",
    "OOB401", "OOB402", "OOB403", "OOB404", "OOB405",
    "OOB501", "OOB502", "OOB503", "OOB504",
}
WARNINGS = {"OOB302", "OOB303", "OOB306", "OOB310", "OOB312"}


def expectations(path: Path) -> set[tuple[str, int, int]]:
    found = set()
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        m = EXPECT.match(line)
        if not m:
            break
        found.add((m[1], int(m[2]), int(m[3])))
    return found


def test_corpus_is_large_and_well_formed():
    assert len(FILES) >= 30
    for f in FILES:
        assert re.match(r"^\d\d-[a-z0-9-]+\.yaml$", f.name), f.name
        assert expectations(f), f"{f.name}: first line must be '# expect: CODE LINE:COL'"


def test_corpus_covers_every_code():
    covered = {code for f in FILES for code, _, _ in expectations(f)}
    assert ALL_CODES - covered == set()


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_invalid_spec(path: Path):
    diags = lint_file(path)
    got = {(d.code, d.line, d.col) for d in diags}
    assert got == expectations(path), "\n".join(str(d) for d in diags)
    for d in diags:
        assert d.file == str(path)
        assert d.severity == ("warning" if d.code in WARNINGS else "error"), d
        text = str(d)
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith(f"{path}:{d.line}:{d.col}: {d.code} "), text
        assert "Traceback" not in text
    rendered = diagnostics(diags).splitlines()
    assert len(rendered) == len(diags)


def _one(name: str, code: str):
    diags = [d for d in lint_file(CORPUS / name) if d.code == code]
    assert diags, name
    return diags


def test_duplicate_key_names_the_first_line():
    (d,) = _one("03-duplicate-key.yaml", "OOB101")
    assert "line 5" in d.message and d.line == 8
    (d,) = _one("48-duplicate-key-flow.yaml", "OOB101")
    assert "'cpus'" in d.message and "line 6" in d.message


def test_unknown_key_suggests_the_nearest():
    (d,) = _one("09-unknown-key-typo.yaml", "OOB120")
    assert d.hint == "did you mean 'replicas'?"
    (d,) = _one("10-unknown-server-key.yaml", "OOB120")
    assert d.hint == "did you mean 'port'?"
    (d,) = _one("51-unknown-top-key.yaml", "OOB120")
    assert d.hint == "did you mean 'links'?"
    assert "did you mean 'links'?" in str(d)


def test_route_call_that_is_not_a_method_has_a_hint():
    gett, counter = sorted(_one("39-route-not-a-method.yaml", "OOB502"), key=lambda d: d.line)
    assert gett.hint == "did you mean 'get'?" and "'gett'" in gett.message
    assert "'counter' is not a method" in counter.message


def test_missing_class_suggests_the_nearest():
    stroe, missing = sorted(_one("38-class-does-not-import.yaml", "OOB501"), key=lambda d: d.line)
    assert "did you mean 'Store'" in stroe.message
    assert "no_such_module_xyz" in missing.message


def test_port_clashes_name_both_servers():
    (d,) = _one("25-replica-port-overlap.yaml", "OOB301")
    assert "a.http" in d.message and "b.http" in d.message and "9002" in d.message
    assert "replica" in d.message
    (d,) = _one("26-any-host-overlap.yaml", "OOB301")
    assert "0.0.0.0:7000" in d.message


def test_sandbox_escape_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an escape would `touch oob-pwned` here
    marker = tmp_path / "oob-pwned"
    assert _one("45-sandbox-globals.yaml", "OOB111")
    assert not marker.exists()


def test_no_import_skips_code_checks():
    for name in ("38-class-does-not-import.yaml", "39-route-not-a-method.yaml",
                 "40-proto-does-not-import.yaml", "41-args-do-not-fit.yaml"):
        codes = {d.code for d in lint_file(CORPUS / name, imports=False)}
        assert not codes & {"OOB501", "OOB502", "OOB503", "OOB504"}, name


def test_lint_of_a_spec_built_in_python():
    from oobspec.models import Spec

    spec = Spec.model_validate({"version": 1, "name": "py", "actors": {"a": {
        "class": "decimal:Decimal", "restarts": 1, "servers": [{"name": "h", "port": 80}]}}})
    (d,) = oobspec.lint(spec)
    assert (d.code, d.severity, d.file) == ("OOB302", "warning", "<spec>")
