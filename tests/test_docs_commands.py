"""Every command the README and docs/ show runs as shown (issue 15).

Shell blocks (```bash, ```sh, ```shell, ```console: only its `$ ` lines) are read command by
command, `\\` continuations joined and comments dropped:
- `python -m hrpo.X ...` (also as torchrun's `-m hrpo.X ...`) parses with program X's own
  argparse parser, the one its main() uses; torchrun's flags parse with torchrun's parser;
- `pytest ...` and `python -m pytest ...` collect: their paths, node ids and options exist;
- `python path.py` and `bash path.sh` name a file of the repository;
- a block whose previous line is `<!-- runs-in-ci -->` also runs for real, command by
  command, in a temporary folder, and each command exits 0 (an hrpo program also says
  something: one that exits 0 silently did not run its main).
Python blocks compile and their imports resolve (a third-party package only when installed); a
marked one also runs in a temporary folder.
Shell variables (`$NODE_RANK`) stand for values the reader supplies and are read as 0.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")
RUNS_IN_CI = "<!-- runs-in-ci -->"
FENCE = re.compile(r"```(\S*)\s*$")
SEPARATORS = ("&&", "||", ";", "|")


@dataclass(frozen=True)
class Block:
    where: str  # page:line of the block's first line
    lang: str
    body: str
    runs: bool  # marked runs-in-ci


@dataclass(frozen=True)
class Command:
    where: str  # page:line of the command's first line
    line: str  # as a shell reads it: continuations joined
    program: str  # hrpo.train, torchrun, pytest, script, or unreadable (shlex could not split it)
    args: tuple[str, ...]


def read_blocks(text: str, page: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with its language and its runs-in-ci mark."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: a code block that never closes")
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(
            Block(
                f"{page}:{i + 2}", opening.group(1).lower(), "\n".join(lines[i + 1 : end]) + "\n", before == RUNS_IN_CI
            )
        )
        i = end + 1
    return blocks


def open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation"
        return True
    return False


def shell_lines(block: Block) -> list[tuple[str, str]]:
    """(where, line) for each command of a shell block: `\\` continuations joined, and a quote
    left open (a JSON body) carried on to the line that closes it. Heredocs are not read."""
    page, first = block.where.rsplit(":", 1)
    out, pending, start = [], "", 0
    for n, line in enumerate(block.body.splitlines()):
        if not pending:
            if block.lang == "console":
                if not line.startswith("$ "):
                    continue  # the command's output
                line = line[2:]
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if open_quote(pending + line):
            pending += line + "\n"
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined and not joined.startswith("#"):
            out.append((f"{page}:{int(first) + start}", joined))
    if pending:
        out.append((f"{page}:{int(first) + start}", pending.strip()))  # unreadable: reported by a test
    return out


def program_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """What one simple command runs, when it is one the docs test checks."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the command
    if not tokens:
        return None
    head, rest = tokens[0], tokens[1:]
    if head in ("python", "python3") and len(rest) >= 2 and rest[0] == "-m":
        module = rest[1]
        return (module, rest[2:]) if module.split(".")[0] in ("hrpo", "pytest") else None
    if head in ("python", "python3", "bash", "sh") and rest and rest[0].endswith((".py", ".sh")):
        return "script", rest
    if head in ("torchrun", "pytest"):
        return head, rest
    return None


def line_commands(where: str, line: str) -> list[Command]:
    """The checked commands of one shell line (`a && b` holds two); a line shlex cannot read is
    one `unreadable` command."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as err:
        return [Command(where, line, "unreadable", (str(err),))]
    tokens = [re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "0", t) for t in words]
    simple: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            simple.append([])
        else:
            simple[-1].append(token)
    found = [program_of(part) for part in simple]
    return [Command(where, line, f[0], tuple(f[1])) for f in found if f is not None]


def read_commands(block: Block) -> list[Command]:
    return [c for where, line in shell_lines(block) for c in line_commands(where, line)]


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))]


BLOCKS = all_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELLS]
COMMANDS = [c for b in SHELL_BLOCKS for c in read_commands(b)]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


def hrpo_parser(program: str) -> argparse.ArgumentParser:
    """The parser a program's main() uses: build_parser() or parser() in its module, or in the
    `cli` (hrpo.inspect) or guarded `__main__` (hrpo.serve) module of a package."""
    for name in (program, f"{program}.cli", f"{program}.__main__"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        for attr in ("build_parser", "parser"):
            if callable(getattr(module, attr, None)):
                return getattr(module, attr)()
    raise AssertionError(f"{program}: no build_parser() or parser() in it, its cli or its __main__")


def parse_error(parser: argparse.ArgumentParser, args: tuple[str, ...]) -> str | None:
    """argparse's complaint about `args`, or None when it accepts them (--help included)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as stop:
        if stop.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1]
    return None


# --------------------------------------------------------------------------- the extraction


def test_extraction_reads_every_form_the_pages_use():
    """Continuations, comments, a quote open over lines, console prompts and their output, env
    prefixes, `&&`, torchrun, scripts, a runs-in-ci mark and a block that is not shell, on a page
    written by hand."""
    page = """Intro.
<!-- runs-in-ci -->
```bash
# a comment line
python -m hrpo.train --max-steps 2 \\
    --output-dir runs/x   # trailing comment
OMP_NUM_THREADS=1 python -m hrpo.eval --limit 4 && pytest -q tests/test_loss.py
pip install gguf
curl -d '{
  "a": 1
}' http://x
python -m hrpo.retrieve --k 1
```

```console
$ torchrun --nproc-per-node 2 --node-rank $NODE_RANK -m hrpo.train --fsdp
hrpo: 100%
$ bash benchmarks/gpu_check.sh check
```
```python
import hrpo
```
"""
    blocks = read_blocks(page, "page.md")
    assert [(b.where, b.lang, b.runs) for b in blocks] == [
        ("page.md:4", "bash", True),
        ("page.md:16", "console", False),
        ("page.md:21", "python", False),
    ]
    got = [(c.where, c.program, c.args) for b in blocks[:2] for c in read_commands(b)]
    assert got == [
        ("page.md:5", "hrpo.train", ("--max-steps", "2", "--output-dir", "runs/x")),
        ("page.md:7", "hrpo.eval", ("--limit", "4")),
        ("page.md:7", "pytest", ("-q", "tests/test_loss.py")),
        ("page.md:12", "hrpo.retrieve", ("--k", "1")),
        ("page.md:16", "torchrun", ("--nproc-per-node", "2", "--node-rank", "0", "-m", "hrpo.train", "--fsdp")),
        ("page.md:18", "script", ("benchmarks/gpu_check.sh", "check")),
    ]
    joined = "python -m hrpo.train --max-steps 2 " + " " * 5 + "--output-dir runs/x   # trailing comment"
    assert shell_lines(blocks[0])[0] == ("page.md:5", joined)
    assert shell_lines(blocks[0])[3] == ("page.md:9", "curl -d '{\n  \"a\": 1\n}' http://x")


def test_the_readme_shows_the_three_commands_and_runs_a_short_loop():
    readme = [c for c in COMMANDS if c.where.startswith("README.md")]
    assert {"hrpo.train", "hrpo.eval", "pytest"} <= {c.program for c in readme}
    ran = {c.program for b in SHELL_BLOCKS if b.runs and b.where.startswith("README.md") for c in read_commands(b)}
    assert {"hrpo.train", "hrpo.eval", "hrpo.inspect"} <= ran


def test_a_wrong_flag_is_caught():
    """The parse check itself: a flag the program does not have, or a bad choice, is reported."""
    assert parse_error(hrpo_parser("hrpo.train"), ("--max-steps", "2")) is None
    assert "--no-such-flag" in parse_error(hrpo_parser("hrpo.train"), ("--no-such-flag",))
    assert "invalid choice" in parse_error(hrpo_parser("hrpo.eval"), ("--protocol", "loose"))
    assert parse_error(hrpo_parser("hrpo.inspect"), ("--prompt", "2 + 3 =")) is None


def test_every_shell_line_reads():
    unreadable = [f"{c.where}: {c.args[0]}" for c in COMMANDS if c.program == "unreadable"]
    assert not unreadable, unreadable


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_mark_sits_on_a_block_that_can_run(page):
    """A runs-in-ci mark before prose, or before a block of another language, would run nothing."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if line.strip() != RUNS_IN_CI:
            continue
        following = next((x.strip() for x in lines[n + 1 :] if x.strip()), "")
        opening = FENCE.match(following)
        assert opening and opening.group(1).lower() in (*SHELLS, "python"), (
            f"{page.relative_to(ROOT)}:{n + 1}: {RUNS_IN_CI} is not followed by a shell or python block"
        )


# --------------------------------------------------------------------------- every command parses


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.program.startswith("hrpo")], ids=lambda c: c.where)
def test_hrpo_command_parses(cmd):
    error = parse_error(hrpo_parser(cmd.program), cmd.args)
    assert error is None, f"{cmd.where}: `{cmd.line}`: {error}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.program == "torchrun"], ids=lambda c: c.where)
def test_torchrun_command_parses(cmd):
    error = parse_error(torchrun_parser(), cmd.args)
    assert error is None, f"{cmd.where}: `{cmd.line}`: torchrun: {error}"
    launched = torchrun_parser().parse_args(list(cmd.args))
    runs_hrpo = launched.module and launched.training_script.startswith("hrpo.")
    assert runs_hrpo, f"{cmd.where}: torchrun runs no hrpo program"
    error = parse_error(hrpo_parser(launched.training_script), tuple(launched.training_script_args))
    assert error is None, f"{cmd.where}: `{cmd.line}`: {error}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.program == "script"], ids=lambda c: c.where)
def test_script_exists(cmd):
    assert (ROOT / cmd.args[0]).is_file(), f"{cmd.where}: `{cmd.line}`: no file {cmd.args[0]}"


COLLECT = """import sys, pytest
bad = [args for args in {runs!r} if pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args]) != 0]
sys.exit(f"do not collect: {{bad}}" if bad else 0)
"""


def test_pytest_commands_collect():
    """One process collects every distinct pytest command (imports are paid once)."""
    runs = sorted({c.args for c in COMMANDS if c.program == "pytest"})
    assert runs, "the pages show no pytest command"
    script = COLLECT.format(runs=[list(r) for r in runs])
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=run_env(),
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- marked blocks run


def run_env() -> dict[str, str]:
    """The docs' `python` is this interpreter; the checkout is importable; one thread each; no
    pytest options of the run around it (CI's coverage): the commands run as a user runs them."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return {**env, "PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if b.runs], ids=lambda b: b.where)
def test_marked_shell_block_runs(block, tmp_path):
    for where, line in shell_lines(block):
        done = subprocess.run(
            ["bash", "-c", f"set -eo pipefail\n{line}"],
            check=False,
            cwd=tmp_path,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        said = (done.stdout + done.stderr).strip()
        assert done.returncode == 0, f"{where}: `{line}` exited {done.returncode}: {said[-2000:]}"
        runs_hrpo = any(c.program.startswith("hrpo") for c in line_commands(where, line))
        assert not runs_hrpo or said, f"{where}: `{line}` exited 0 without a word: did its main() run?"


def checked(module: str) -> bool:
    """The project's modules always; a third-party one when installed (a page may show a client,
    such as openai, that it asks the reader to install)."""
    top = module.split(".")[0]
    return top in ("hrpo", "hrpo_kernels") or importlib.util.find_spec(top) is not None


def resolve_imports(tree: ast.AST) -> None:
    """Import every module a snippet imports and find every name it takes from one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if checked(alias.name):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and checked(node.module):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or the error naming it


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_python_block(block, tmp_path):
    tree = ast.parse(block.body, filename=block.where)
    resolve_imports(tree)
    if block.runs:
        script = tmp_path / "snippet.py"
        script.write_text(block.body, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)],
            check=False,
            cwd=tmp_path,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{block.where}: {done.stderr.strip()[-2000:]}"
