"""No function in hrpo/ is over 60 lines unless it says why: `# long: <reason>` on the line
before its `def` (or before its decorators), or in its docstring."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60
REASON = re.compile(r"#\s*long:\s*\S")  # the marker followed by a reason, not an empty one


def long_functions(package: Path, limit: int = LIMIT) -> list[str]:
    """`file:function (n lines)` for every function of `package` longer than `limit` lines
    (from its `def` to its last line) that gives no reason; methods and nested functions are
    named with their enclosing names."""
    found = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for name, node in _functions(ast.parse(source, filename=str(path))):
            length = node.end_lineno - node.lineno + 1
            if length > limit and not _excused(node, lines):
                found.append(f"{path.relative_to(package.parent).as_posix()}:{name} ({length} lines)")
    return found


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def _excused(node: ast.FunctionDef, lines: list[str]) -> bool:
    starts = {node.lineno} | {d.lineno for d in node.decorator_list}
    before = [lines[n - 2] for n in starts if n >= 2]  # the line above the def, or above its first decorator
    return any(REASON.search(line) for line in before) or bool(REASON.search(ast.get_docstring(node) or ""))


def test_no_function_in_hrpo_is_long_without_a_reason():
    assert long_functions(ROOT / "hrpo") == []


def function(name: str, body_lines: int, above: str = "", doc: str = "", decorator: str = "") -> str:
    """Source of a function whose def to last line spans 1 + body_lines lines (+1 for a docstring)."""
    head = ([above] if above else []) + ([decorator] if decorator else []) + [f"def {name}():"]
    body = ([f'    """{doc}"""'] if doc else []) + [f"    x{i} = {i}" for i in range(body_lines)]
    return "\n".join(head + body) + "\n\n\n"


def test_the_check_counts_lines_and_reads_reasons(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text(
        function("at_limit", 59)  # def + 59 = 60 lines: allowed
        + function("over", 60)  # 61 lines
        + function("reasoned", 80, above="# long: a kernel, one launch")
        + function("empty_reason", 80, above="# long:")
        + function("documented", 80, doc="Why. # long: one table, row by row")
        + function("decorated", 70, above="# long: the decode loop as the paper writes it", decorator="@staticmethod")
        + "# long: a blank line away from its def\n\n"
        + function("reason_too_far", 70)
    )
    (pkg / "sub" / "b.py").write_text("class C:\n" + textwrap.indent(function("method", 61), "    "))
    assert long_functions(pkg) == [
        "pkg/a.py:over (61 lines)",
        "pkg/a.py:empty_reason (81 lines)",
        "pkg/a.py:reason_too_far (71 lines)",
        "pkg/sub/b.py:C.method (62 lines)",
    ]
