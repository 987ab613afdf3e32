"""The house rules, checked: one typed vocabulary (no head, term, normalizer or severity spelled
as a string outside it), short functions, a public API that lists itself, help on every option,
and a README catalogue that is the rule table's."""

from __future__ import annotations

import ast
from enum import StrEnum
from pathlib import Path

import pytest

import lossdoctor
from lossdoctor import vocab
from lossdoctor.vocab import Head, Normalizer, Severity, Term

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lossdoctor"
VOCAB = {m.value for enum in (Head, Term, Normalizer, Severity) for m in enum}
ANY_MEMBER = {
    m.value
    for enum in vars(vocab).values()
    if isinstance(enum, type) and issubclass(enum, StrEnum)
    for m in enum
}
# levels-table columns and evidence fields (an interface) spelled like two normalizers: allowed as
# names, never compared against (which is what stringly-typed dispatch on a normalizer would do)
COLUMN_NAMES = {"pos", "sampled"}
MAX_FUNCTION_LINES = 40


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _operands(node: ast.Compare):
    """The compared expressions, and the items of a tuple, list or set compared against."""
    for x in (node.left, *node.comparators):
        yield x
        if isinstance(x, (ast.Tuple, ast.List, ast.Set)):
            yield from x.elts


def _compared(tree: ast.AST) -> set[int]:
    """ids of the string constants that are compared against (``x == "a"``, ``x in ("a",)``)."""
    return {
        id(c)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for c in _operands(node)
        if isinstance(c, ast.Constant)
    }


def vocabulary_literals(path: Path) -> list[str]:
    """Where a file spells a head, term, normalizer or severity as a string literal, or compares
    against the value of any vocabulary member (stringly-typed dispatch)."""
    tree = ast.parse(path.read_text())
    skip, compared = _docstrings(tree), _compared(tree)
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in skip
        and (node.value in VOCAB and node.value not in COLUMN_NAMES
             or node.value in ANY_MEMBER and id(node) in compared)
    ]  # fmt: skip


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
        f"{node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]  # fmt: skip


SOURCES = sorted(SRC.rglob("*.py"))


def test_no_vocabulary_string_outside_the_vocabulary_module():
    found = [hit for p in SOURCES if p.name != "vocab.py" for hit in vocabulary_literals(p)]
    assert not found, "\n".join(found)


def test_the_literal_check_catches_a_literal(tmp_path):
    p = ROOT / "tests" / "_probe_literal.py"
    try:
        p.write_text(
            '"""doc mentions rpn"""\nx = {"rpn": 1, "pos": 2, "mmdet": 3}\n'
            'if head == "error" or n in ("sampled",) or mapper == "mmdet":\n    pass\n'
            'if d.get("pos") is None and d.get("mmdet") is None:\n    pass\n'
        )
        found = sorted(h.split(": ")[1] for h in vocabulary_literals(p))
        assert found == ["'error'", "'mmdet'", "'rpn'", "'sampled'"]
    finally:
        p.unlink()


def test_no_function_over_40_lines():
    found = [hit for p in SOURCES for hit in long_functions(p)]
    assert not found, "\n".join(found)


def test_public_api_lists_itself_and_every_name_resolves():
    assert dir(lossdoctor) == list(lossdoctor.__all__)
    for name in lossdoctor.__all__:
        assert getattr(lossdoctor, name) is not None, name
    for needed in (
        "inspect",
        "compare",
        "replay",
        "Report",
        "Batch",
        "HeadWeights",
        "DetectorConfig",
        "LossProfile",
        "TermSpec",
        "Head",
        "Term",
        "Severity",
    ):
        assert needed in lossdoctor.__all__
    with pytest.raises(AttributeError):
        lossdoctor.no_such_name  # noqa: B018


def _commands():
    import typer.main

    from lossdoctor.cli import app

    group = typer.main.get_command(app)
    return group.commands


@pytest.mark.parametrize("name", ["inspect", "compare", "profiles", "check", "explain"])
def test_every_option_and_argument_has_help(name):
    cmd = _commands()[name]
    missing = [p.name for p in cmd.params if not getattr(p, "help", None)]
    assert not missing, f"{name}: no help for {missing}"


def test_readme_catalogue_is_the_rule_table():
    from lossdoctor.report.explain import CATALOGUE_BEGIN, CATALOGUE_END, catalogue_markdown

    text = (ROOT / "docs/report.md").read_text()
    start, end = text.index(CATALOGUE_BEGIN), text.index(CATALOGUE_END) + len(CATALOGUE_END)
    assert text[start:end] == catalogue_markdown(), "run: python scripts/update_readme.py"


def test_readme_coverage_table_is_what_the_zoo_tests_recorded():
    """docs/coverage.md's table and the README's summary are docs/coverage's record of a zoo
    test run, as written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "update_readme", ROOT / "scripts/update_readme.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for doc, begin, end, made in [
        ("docs/coverage.md", script.COVERAGE_BEGIN, script.COVERAGE_END, script.coverage_markdown),
        ("README.md", script.SUMMARY_BEGIN, script.SUMMARY_END, script.coverage_summary),
    ]:
        text = (ROOT / doc).read_text()
        start, stop = text.index(begin), text.index(end) + len(end)
        assert text[start:stop] == made(), f"{doc}: run python scripts/update_readme.py"
    assert all((ROOT / "docs/coverage" / f"{fw}.jsonl").exists() for fw in script.FRAMEWORKS)


def test_the_readmes_report_is_what_inspect_prints_with_no_flag():
    """`lossdoctor inspect fixtures/collapse`, as the README shows it: regenerated, not typed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "update_readme", ROOT / "scripts/update_readme.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.EXCERPT_ARGS == ["inspect", "fixtures/collapse"]
    text = (ROOT / "README.md").read_text()
    start = text.index(script.EXCERPT_BEGIN)
    end = text.index(script.EXCERPT_END) + len(script.EXCERPT_END)
    assert text[start:end] == script.excerpt(), "run: python scripts/update_readme.py"


def test_ci_runs_the_readmes_test_commands():
    """CI runs what the README tells a newcomer to run: the default suite, then the framework
    tests of the frameworks that install from the package index (the script's default)."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    default = 'python3 -m pip install -e ".[test,ray]" && python3 -m pytest -q'
    assert default in readme
    assert "python3 -m pytest -q" in ci and 'python3 -m pip install -e ".[test,ray]"' in ci
    assert "```\nbash scripts/test-frameworks.sh\n```" in readme
    script = (ROOT / "scripts" / "test-frameworks.sh").read_text()
    assert "[ $# -gt 0 ] || set -- torchvision mmdet" in script
    assert "bash scripts/test-frameworks.sh torchvision mmdet" in ci


def test_the_readme_stays_short_and_its_links_resolve():
    """The README is the two commands, the report, the recipes, the commands and the mixed
    precision excerpt (at most 20 KB); the rest is in docs/, and every relative link of the
    README and docs/ names a file there."""
    import re

    readme = ROOT / "README.md"
    assert len(readme.read_bytes()) <= 20_000
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_tensor_shapes_in_docstrings_use_the_glossarys_letters():
    """Every ``Tensor[...]`` of the replay and the diagnosis is spelled with the letters the
    replay's glossary (``lossdoctor/replay/__init__.py``) defines, digits and arithmetic."""
    import re

    glossary = (SRC / "replay" / "__init__.py").read_text()
    defined = set(re.findall(r"``([^`]+)``", glossary))
    letters = {x for d in defined for x in re.split(r"[,\s*+=()]+", d) if x}
    unknown = {}
    for path in [*(SRC / "replay").rglob("*.py"), *(SRC / "diagnose").rglob("*.py")]:
        for shape in re.findall(r"Tensor\[([^\]]*)\]", path.read_text()):
            for token in re.split(r"[,\s*+/()\-]+", shape):
                name = token.lstrip("0123456789")
                if name and name != "..." and name not in letters:
                    unknown.setdefault(name, set()).add(path.name)
    assert not unknown, unknown


def test_the_cli_builds_one_options_object_and_imports_no_diagnosis():
    """Each replaying command builds one ReplayOptions for the library (no ``locals()`` dicts),
    and the CLI reaches the diagnosis only through the library."""
    text = (SRC / "cli.py").read_text()
    assert "locals()" not in text
    assert ".diagnose" not in text, "the CLI calls api, report and scan, not diagnose"
    assert text.count("ReplayOptions(") == 3  # inspect, compare, scan


# the modules that turn typed records into the JSON/CSV forms and back (the edge)
SERIALIZATION = {SRC / "report" / "serialize.py", SRC / "scan" / "results.py"}
# mappings that are keyed by strings by nature, not rows: the environment
KEYED_BY_NATURE = {"os.environ"}


def string_keyed(path: Path) -> list[str]:
    """Where a file reads a value by a string key: ``x["key"]`` or ``x.get("key")``."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target, key = node.value, node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args):  # fmt: skip
            target, key = node.func.value, node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            if ast.unparse(target) not in KEYED_BY_NATURE:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_report_and_scan_read_rows_by_attribute_not_by_key():
    """Above diagnose/, rows, findings and meta are typed records: only the serialization
    modules read or write them as dicts."""
    files = [p for d in ("report", "scan") for p in sorted((SRC / d).glob("*.py"))]
    found = [hit for p in files if p not in SERIALIZATION for hit in string_keyed(p)]
    assert not found, "\n".join(found)


def test_the_key_check_catches_a_keyed_read(tmp_path):
    p = ROOT / "tests" / "_probe_keyed.py"
    try:
        p.write_text('a = row["pos"]\nb = meta.get("run")\nc = os.environ.get("COLUMNS")\n'
                     'd = rows[0]\ne = {"k": 1}\n')  # fmt: skip
        assert [h.split(": ")[1] for h in string_keyed(p)] == ["row['pos']", "meta.get('run')"]
    finally:
        p.unlink()


def test_findings_are_made_in_diagnose_and_only_arranged_in_report():
    """The report layer runs no rule and rebuilds no finding: rules (the rank rules too), their
    checks and framing live in diagnose/ (``explain`` only prints the table); one Finding type
    goes from check to report."""
    banned = {"RULES", "RANK_RULES", "to_finding", "frame", "Hit", "FindingRow"}
    found = []
    for p in sorted((SRC / "report").glob("*.py")) + sorted((SRC / "scan").glob("*.py")):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            found += [f"{p.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in banned]
    assert not found, "\n".join(found)
    from lossdoctor.diagnose import ranks

    assert all(r.code.startswith("rank-") for r in ranks.RANK_RULES)
    dataclass_names = [
        node.name
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ClassDef) and "Finding" in node.name
    ]
    assert sorted(dataclass_names) == ["DumpFindingRow", "Finding", "FindingGroup"]
