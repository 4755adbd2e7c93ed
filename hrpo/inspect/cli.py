"""The command line of hrpo.inspect (see the package docstring)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hrpo.inspect
from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.core.program import add_runtime_arguments, run_program
from hrpo.core.prompts import SYSTEM_PROMPT, encode_prompts
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.eval import (
    DefaultsHelpFormatter,
    add_cold_stop_arguments,
    add_latent_arguments,
    cold_stop,
    describe_policy,
    latent_params,
    load_policy,
    recorded_settings,
    resolve_checkpoint,
)
from hrpo.inspect.report import aggregates, as_json, chart, html_page, terminal, terminal_aggregates
from hrpo.inspect.trace import Trace, describe, replay
from hrpo.model.loading import eos_token_ids, resolve_device
from hrpo.tasks import get_task
from hrpo.training.checkpoint import read_checkpoint_meta
from hrpo.training.config import config_for
from hrpo.training.runs import check_writable, replace_file, write_json

# Fields of a samples.jsonl line this tool reads (others are ignored): name -> (types, required).
FIELDS = {
    "prompt": ((str,), True),
    "completion": ((str,), True),
    "task": ((str,), False),
    "correct": ((int, float), False),
    "gate_mean": ((int, float, type(None)), False),
    "completion_tokens": ((int,), False),
}
RECORDED = ("correct", "gate_mean", "completion_tokens")  # shown beside the replay


class InputError(ValueError):
    """Bad input to the inspector, in one line."""


def read_samples(path: str, limit: int | None) -> list[tuple[int, dict]]:
    """(line number, record) of the first `limit` samples of an evaluation's samples.jsonl."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--samples {path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for name, (kinds, required) in FIELDS.items():
            if name not in rec:
                if required:
                    raise InputError(f"{where}: field {name!r} missing")
            elif not isinstance(rec[name], kinds) or isinstance(rec[name], bool) and name != "correct":
                raise InputError(
                    f"{where}: field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                    f"got {type(rec[name]).__name__}"
                )
        if "task" in rec:
            try:
                get_task(rec["task"])
            except ValueError as err:
                raise InputError(f"{where}: {err}") from None
        out.append((number, rec))
        if len(out) == limit:
            break
    if not out:
        raise InputError(f"--samples {path}: no samples in the file")
    return out


def _check(args) -> None:
    for name, lo in (("limit", 1), ("max_new_tokens", 1), ("top_k_nearest", 1), ("max_rows", 0), ("top_k", 0)):
        value = getattr(args, name)
        if value is not None and value < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be a number in (0, inf), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be a number in (0, 1], got {args.top_p}")
    if args.limit is not None and not args.samples:
        raise ConfigError("--limit applies to --samples")
    if args.samples and args.cold_stop_entropy is not None:
        raise ConfigError("--cold-stop-entropy applies to generation (--prompt), not to replayed --samples")
    if args.task:
        get_task(args.task)


def _system(task: str, on: bool) -> tuple[str | None, int]:
    """(system prompt, prompt-length limit) under which `task` is asked, as hrpo.eval does."""
    recipe = config_for(task)
    return (SYSTEM_PROMPT if on and recipe.system_prompt else None), recipe.max_prompt_length


def collect(args) -> list[Trace]:
    _check(args)
    samples = read_samples(args.samples, args.limit) if args.samples else None
    if args.checkpoint:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
    meta = read_checkpoint_meta(args.checkpoint) if args.checkpoint else {}
    recorded_settings(args, meta)
    latent = latent_params(args)  # checked before the model loads
    near = dict(k=args.top_k_nearest, top_p=args.top_p)
    args.base_model = args.model or meta.get("base_model")
    default_task = args.task or meta.get("task") or "arith"
    print(describe_policy("inspecting", args, None if samples and not args.task else default_task))
    hm, tokenizer, meta = load_policy(args.checkpoint, args.model, resolve_device(args.device), args.dtype)
    matcher = MarkerMatcher(tokenizer, args.marker, hm.config.vocab_size)
    if samples is None:  # greedy generation, as evaluation decodes
        task = get_task(default_task)
        system, limit = _system(task.name, args.system_prompt)
        prompts = encode_prompts(tokenizer, args.prompt, limit, system)
        engine = make_engine(hm, matcher, eos_token_ids(hm.causal_lm, tokenizer), tokenizer.pad_token_id)
        sampling = SamplingConfig(
            args.max_new_tokens or task.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            greedy=True,
            hybrid=args.hybrid,
            latent=latent,
            cold_stop=cold_stop(args),
        )
        out = engine.generate(prompts, sampling, torch.Generator(device=hm.lm_weight.device).manual_seed(0))
        mixed = [
            replay(hm, p, ids[m].tolist(), matcher, args.temperature, args.top_k, args.hybrid, latent, **near)[1]
            for p, ids, m in zip(prompts, out.completion_ids, out.completion_mask)
        ]  # greedy: the same inputs
        rows = describe(hm, tokenizer, matcher, out, args.top_k_nearest, latent, mixed)
        return [Trace(text, row) for text, row in zip(args.prompt, rows)]
    traces = []
    for number, rec in samples:  # teacher-forced replay of each recorded completion
        system, limit = _system(args.task or rec.get("task") or default_task, args.system_prompt)
        try:
            prompt = encode_prompts(tokenizer, [rec["prompt"]], limit, system)[0]
        except ValueError as err:
            raise InputError(f"{args.samples}:{number}: {err}") from None
        ids = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"][: args.max_new_tokens]
        batch, mixed = replay(hm, prompt, ids, matcher, args.temperature, args.top_k, args.hybrid, latent, **near)
        recorded = {k: rec[k] for k in RECORDED if k in rec}
        rows = describe(hm, tokenizer, matcher, batch, args.top_k_nearest, latent, [mixed])
        traces.append(Trace(rec["prompt"], rows[0], recorded))
    return traces


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hrpo.inspect", description=hrpo.inspect.__doc__, formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        help="an HRPO checkpoint folder (adapters + gate) or a finished training run's "
        "folder; None: the base model alone",
    )
    p.add_argument(
        "--model", help="base model (hub name or folder); None: the checkpoint's base, else the embedded model"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", metavar="TEXT", help="user messages to answer greedily")
    source.add_argument("--samples", metavar="FILE", help="an evaluation's samples.jsonl: replay its completions")
    p.add_argument("--limit", type=int, help="inspect the first N samples of --samples; None: all")
    p.add_argument(
        "--task", help="task whose system prompt and limits apply; None: the sample's, the checkpoint's, else arith"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generate (or replay) at most N tokens; None: the task's "
        "evaluation budget (--samples: the whole completion)",
    )
    p.add_argument("--top-k-nearest", type=int, default=5, help="nearest tokens shown per latent")
    p.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        help="blend latents into thinking inputs (--no-hybrid: plain tokens); None: as the checkpoint "
        "was trained, else on",
    )
    p.add_argument(
        "--system-prompt",
        action=argparse.BooleanOptionalAction,
        help="the paper's system prompt where the task's recipe uses one (as hrpo.eval); None: as the "
        "checkpoint was trained, else on",
    )
    p.add_argument("--temperature", type=float, default=0.5, help="of the distribution h_hat mixes")
    p.add_argument("--top-k", type=int, default=50, help="of the distribution h_hat mixes (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus of the distribution h_hat mixes, inside the top-k (1: off)"
    )
    add_latent_arguments(p)
    add_cold_stop_arguments(p)
    p.add_argument("--max-rows", type=int, default=40, help="positions per sample in the terminal table")
    p.add_argument("--html", help="write a self-contained HTML page here")
    p.add_argument("--json", help="write the aggregates and every position as JSON here")
    p.add_argument("--png", help="write a chart (gate over positions, script shares) here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --html / --json / --png files")
    add_runtime_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_program(parser(), inspect_policy, argv)


def inspect_policy(args) -> int:
    """Collect the traces, then print them and write the files asked for."""
    outputs = {k: check_writable(getattr(args, k), args.overwrite) for k in ("html", "json", "png") if getattr(args, k)}
    traces = collect(args)
    agg = aggregates(traces)
    for i, t in enumerate(traces):
        print(terminal(t, i, args.max_rows) + "\n")
    print(terminal_aggregates(agg))
    png = chart(traces, agg) if "png" in outputs or "html" in outputs else None
    title = f"hrpo.inspect: {args.checkpoint or args.model or 'embedded model'}"
    if "png" in outputs:
        replace_file(outputs["png"], png)
    if "html" in outputs:
        replace_file(outputs["html"], html_page(traces, agg, title, png))
    if "json" in outputs:
        write_json(outputs["json"], as_json(traces, agg))
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return 0
