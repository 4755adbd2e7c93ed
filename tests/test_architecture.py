"""The structure the code promises: no import hidden inside a function (where it could dodge a
cycle that import-linter would otherwise see), and docs/architecture.md's layer list equal to the
import-linter contract in pyproject.toml."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hrpo", "hrpo_kernels")

# Third-party modules a function may import, each optional or heavy, so importing it at the top
# would make a plain install fail or every program start slower. A name covers its submodules.
HEAVY_OR_OPTIONAL = {
    "matplotlib": "pictures only (plots.py, eval's figure, inspect's chart); ~1 s to import",
    "peft": "LoRA is attached only when asked for; a large import",
    "transformers": "the dense retrieval encoder, and the GGUF reader's progress bar (loading.py)",
    "datasets": "the `hub` extra: reading a hub dataset",
    "pyarrow": "the `parquet` extra: reading .parquet records",
    "safetensors": "the dense index's embeddings; safetensors.torch imports torch (BM25 runs without)",
    "math_verify": "the MATH grader: pulls sympy and an antlr parser, ~1 s",
    "torch.utils.tensorboard": "the `tensorboard` extra",
    "triton": "the `gpu` extra: absent from a CPU install",
    "flash_attn": "optional, never a dependency: used when a GPU host has it",
    "torch.distributed": "DTensor / FSDP parts, needed only with several processes",
    "torch.utils.cpp_extension": "the JIT build of hrpo_kernels/csrc (pulls setuptools and ninja)",
    "resource": "standard library on Unix only: peak memory where the platform has it",
}
# One file may import a module the list above leaves out (or, for a lazy attribute, one of the
# project's own), for the reason given.
FILE_EXCEPTIONS = {
    (
        "hrpo/tasks/retrieval.py",
        "torch",
    ): "the dense encoder; BM25 retrieval (python -m hrpo.retrieve) runs without torch",
    (
        "hrpo/__init__.py",
        "hrpo.serve",
    ): "PEP 562 lazy attribute: hrpo.generate / hrpo.LLM on first use, so `import hrpo` pulls no torch",
}


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module is None:  # from . import gate
        return ["." * node.level + alias.name for alias in node.names]
    return ["." * node.level + node.module]


def _allowed(module: str, path: str) -> bool:
    if (path, module) in FILE_EXCEPTIONS:
        return True
    if module.startswith(".") or module.split(".")[0] in PACKAGES:
        return False  # the project's own modules: always at the top
    return any(module == name or module.startswith(name + ".") for name in HEAVY_OR_OPTIONAL)


def function_imports(source: str, path: str) -> list[str]:
    """`path:line: import X` for every import inside a function body (at any depth) that the
    allow-lists above do not permit."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(
                    f"{path}:{child.lineno}: import {m}" for m in _imported_modules(child) if not _allowed(m, path)
                )
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source, filename=path), False)
    return found


def test_no_import_hidden_in_a_function():
    sources = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert len(sources) > 40, f"only {len(sources)} sources found under {ROOT}"
    found = [hit for p in sources for hit in function_imports(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "imports inside functions (move them to the top, or justify in HEAVY_OR_OPTIONAL):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    from hrpo.core import marker\n", ["x.py:2: import hrpo.core"]),
        ("class A:\n    def m(self):\n        if True:\n            from . import gate\n", ["x.py:4: import .gate"]),
        (
            "def f():\n    def g():\n        import hrpo_kernels, json\n",
            ["x.py:3: import hrpo_kernels", "x.py:3: import json"],
        ),
        ("def f():\n    import torch\n", ["x.py:2: import torch"]),
        ("def f():\n    import matplotlib.pyplot\n    from torch.distributed.tensor import DTensor\n", []),
        ("import hrpo.core\nfrom . import gate\n\nclass A:\n    import json\n", []),  # module and class level
    ],
)
def test_function_imports_finds_what_it_should(source, expected):
    assert function_imports(source, "x.py") == expected


def test_file_exception_is_for_that_file_only():
    source = "def f():\n    import torch\n"
    assert function_imports(source, "hrpo/tasks/retrieval.py") == []
    assert function_imports(source, "hrpo/tasks/qa.py") == ["hrpo/tasks/qa.py:2: import torch"]
    lazy = "def __getattr__(name):\n    import hrpo.serve\n"
    assert function_imports(lazy, "hrpo/__init__.py") == []
    assert function_imports(lazy, "hrpo/eval.py") == ["hrpo/eval.py:2: import hrpo.serve"]


def contract_layers(pyproject: str) -> list[set[str]]:
    """The layers contract over hrpo, bottom up, each layer a set of full module names;
    hrpo_kernels at the bottom when a contract forbids it to import hrpo."""
    contracts = tomllib.loads(pyproject)["tool"]["importlinter"]["contracts"]
    (layered,) = [c for c in contracts if c["type"] == "layers"]
    (container,) = layered["containers"]
    layers = [
        {f"{container}.{tail.strip().strip('()')}" for tail in re.split(r"[|:]", layer)}
        for layer in reversed(layered["layers"])
    ]
    below = [
        c
        for c in contracts
        if c["type"] == "forbidden" and c["source_modules"] == ["hrpo_kernels"] and container in c["forbidden_modules"]
    ]
    return [{"hrpo_kernels"}] + layers if below else layers


def doc_layers(markdown: str) -> list[set[str]]:
    """The numbered list under '## Layers' in docs/architecture.md, bottom up: each item's
    backquoted module names."""
    section = re.search(r"^## Layers\n(.*?)(?=^## )", markdown, re.S | re.M)
    assert section, "docs/architecture.md has no '## Layers' section"
    items = re.findall(r"^\d+\. (.*)$", section.group(1), re.M)
    return [set(re.findall(r"`(hrpo[\w.]*)`", item)) for item in items]


def test_architecture_doc_lists_the_contract_layers():
    doc = doc_layers((ROOT / "docs" / "architecture.md").read_text())
    contract = contract_layers((ROOT / "pyproject.toml").read_text())
    assert len(contract) == 7, contract  # kernels, core, model, engine|tasks, training, two program layers
    assert doc == contract, f"docs/architecture.md layers {doc}\n!= pyproject.toml contract {contract}"


def test_layer_parsers_on_a_small_example():
    pyproject = """
[[tool.importlinter.contracts]]
type = "layers"
containers = ["hrpo"]
layers = ["a | (b)", "c : d", "e"]
[[tool.importlinter.contracts]]
type = "forbidden"
source_modules = ["hrpo_kernels"]
forbidden_modules = ["hrpo"]
"""
    assert contract_layers(pyproject) == [{"hrpo_kernels"}, {"hrpo.e"}, {"hrpo.c", "hrpo.d"}, {"hrpo.a", "hrpo.b"}]
    markdown = (
        "## Layers\nBottom up.\n\n1. `hrpo_kernels`: x\n2. `hrpo.e` (uses `torch`)\n3. `hrpo.c`, `hrpo.d`\n\n"
        "## Next\n4. `hrpo.z`\n"
    )
    assert doc_layers(markdown) == [{"hrpo_kernels"}, {"hrpo.e"}, {"hrpo.c", "hrpo.d"}]
