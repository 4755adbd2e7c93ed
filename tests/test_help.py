"""Every flag of the command lines explained: help text, the default a run really gets, the
choices it accepts, the sections they sit in; what counts a step."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hrpo.core.errors import ConfigError
from hrpo.data import build_parser as data_parser
from hrpo.retrieve import build_parser as retrieve_parser
from hrpo.train import build_parser as train_parser
from hrpo.training.config import GROUPS, TrainConfig, config_for, flag, validate_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE_TASKS = ("arith", "gsm8k", "math", "mmlu", "rag-qa")


def all_actions(parser: argparse.ArgumentParser):
    """(parser, action) for every action, those of subcommands' parsers included."""
    for action in parser._actions:
        yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_actions(sub)


def rendered(parser: argparse.ArgumentParser, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    return parser.format_help()


def option_line(text: str, name: str) -> str:
    """The help's entry for flag `name`: its line and the more indented ones under it, joined."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    found = [" ".join(" ".join(e).split()) for e in entries if re.match(rf"  {name}[ ,]", e[0])]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def shown_default(action: argparse.Action, task: str) -> str:
    """The default the help claims for `task`: one value, or the task's recipe's entry."""
    shown = re.search(r"\(default: (.*)\)$", action.help).group(1)
    per_recipe = re.fullmatch(r"the task's recipe \((.*)\)", shown)
    if per_recipe is None:
        return shown
    entries = dict(entry.split(": ", 1) for entry in per_recipe.group(1).split(", "))
    return next(value for names, value in entries.items() if task in names.split("/"))


def as_typed(value) -> str:
    """A config value as a user would type (or read) it."""
    if isinstance(value, bool):
        return {True: "on", False: "off"}[value]
    if value is None:
        return "none"
    return " ".join(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("parser", [train_parser, data_parser, retrieve_parser], ids=["train", "data", "retrieve"])
def test_every_action_has_help(parser):
    missing = [
        f"{p.prog}: {a.option_strings or a.dest}" for p, a in all_actions(parser()) if not (a.help or "").strip()
    ]
    assert missing == []


def help_sections(text: str) -> dict[str, list[str]]:
    """The sections of a rendered help after its description, in order: title -> the flags
    whose entries it lists (the first spelling of each: --x of `--x, --no-x`)."""
    sections: dict[str, list[str]] = {}
    body = text[text.index("\noptions:\n") + 1 :]
    for line in body.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line.removesuffix(":"), [])
        elif re.match(r"  -", line):
            current.append(line.split()[0].rstrip(","))
    return sections


def test_every_config_field_has_one_flag_in_its_section(monkeypatch):
    """The help lists the sections in the order hrpo.training.config declares them, and each
    field's flag once, under the section its field names."""
    sections = help_sections(rendered(train_parser(), monkeypatch))
    assert list(sections) == ["options", *GROUPS]
    assert sections["options"] == ["-h"]
    fields = dataclasses.fields(TrainConfig)
    listed = [f for flags in sections.values() for f in flags if f != "-h"]
    assert sorted(listed) == sorted(flag(f.name) for f in fields)  # each once
    misplaced = [f.name for f in fields if flag(f.name) not in sections[f.metadata["group"]]]
    assert misplaced == []


def test_help_shows_defaults_choices_and_what_a_step_is(monkeypatch):
    text = rendered(train_parser(), monkeypatch)
    assert option_line(text, "--temperature").endswith("(default: 0.5)")
    assert option_line(text, "--dtype").startswith("--dtype {auto,float32,bfloat16,float16} ")
    assert option_line(text, "--engine").startswith("--engine {fast,reference} ")
    assert option_line(text, "--loss-norm").startswith("--loss-norm {grpo,dr_grpo,dapo} ")
    assert option_line(text, "--report-to").startswith("--report-to {none,tensorboard} ")
    assert "arith,bamboogle,gsm8k,hotpotqa,math,math500," in option_line(text, "--task")
    # Recipes, worked out by hand from the paper's runs and the CPU task's
    assert option_line(text, "--group-size").endswith(
        "(default: the task's recipe (arith/math/mmlu: 8, gsm8k/rag-qa: 4))"
    )
    assert option_line(text, "--lr-lora").endswith(
        "(default: the task's recipe (arith: 0.0005, gsm8k/math/mmlu/rag-qa: 5e-06))"
    )
    assert option_line(text, "--system-prompt").endswith(
        "(default: the task's recipe (arith: off, gsm8k/math/mmlu/rag-qa: on))"
    )
    assert option_line(text, "--hybrid").endswith("(default: on)")
    max_steps = option_line(text, "--max-steps")
    assert "optimizer steps" in max_steps and "max-steps x --grad-accum / --num-iterations device steps" in max_steps
    assert max_steps.endswith("(default: the task's recipe (arith: 150, gsm8k/math/mmlu/rag-qa: none))")
    for name in ("--save-every", "--eval-every", "--grad-accum"):
        assert "optimizer step" in option_line(text, name), name
    description = " ".join(text.split("options:")[0].split())
    assert (
        "A device step rolls out --batch-size completions (over all processes) and runs --num-iterations backward "
        "passes on them; an optimizer step is taken every --grad-accum backward passes"
    ) in description


@pytest.mark.parametrize("task", RECIPE_TASKS)
def test_shown_default_is_what_a_run_gets(task):
    """What the help says each flag defaults to, against the config a command line naming
    only --task resolves to."""
    parser = train_parser()
    resolved = config_for(task)
    for action in parser._actions:
        if action.dest in ("help", "task"):
            continue
        assert shown_default(action, task) == as_typed(getattr(resolved, action.dest)), (task, action.dest)


@pytest.mark.parametrize(
    "name,good,bad",
    [
        ("dtype", "bfloat16", "float8"),
        ("engine", "reference", "vllm"),
        ("loss_norm", "dr_grpo", "mean"),
        ("report_to", "tensorboard", "wandb"),
        ("task", "math500", "gsm9k"),
    ],
)
def test_choices_are_the_values_a_config_accepts(name, good, bad, capsys):
    """The parser refuses what validation would, and lists exactly what validation lets through."""
    parser = train_parser()
    action = next(a for a in parser._actions if a.dest == name)
    assert getattr(parser.parse_args([flag(name), good]), name) == good
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([flag(name), bad])
    assert stop.value.code == 2
    assert f"argument {flag(name)}: invalid choice: '{bad}'" in capsys.readouterr().err
    base = config_for("gsm8k")
    for value in action.choices:
        validate_config(dataclasses.replace(base, **{name: value}))
    with pytest.raises(ConfigError) as err:
        validate_config(dataclasses.replace(base, **{name: bad}))
    accepted = re.fullmatch(rf"{flag(name)} must be one of (.*), got '{bad}'", str(err.value)).group(1)
    assert accepted.split(", ") == list(action.choices)


def test_data_prepare_usage_names_the_command_once():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "hrpo.data", "prepare", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    usage = out.stdout.split("\n\n")[0]
    assert usage.startswith("usage: python -m hrpo.data prepare [-h] --task")
    assert usage.count("prepare") == 1


def test_no_flag_name_is_split_across_lines(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    split = [line for line in train_parser().format_help().splitlines() if re.search(r"\w-$", line)]
    assert split == []
