"""Evaluate a base model or an HRPO checkpoint on the paper's benchmarks.

    python -m hrpo.eval --task gsm8k --checkpoint runs/gsm8k/checkpoint --data-root data/ --output-dir evals/gsm8k
    python -m hrpo.eval --task all --checkpoint ... --data-root data/ --output-dir evals/all
    python -m hrpo.eval --compare evals/base evals/hrpo --png comparison.png

`--protocol paper` (default) is the protocol of the code behind the paper's numbers: its
system prompt, the task's user turn, greedy decoding with hybrid latents on, 512 new tokens
(1024 for MATH and MATH-500), and the answer read from the text after the LAST marker by
our answer readers. `--protocol official` decodes the same way but scores exactly as the
paper's own eval_*.py scripts do, their bugs included (the numbers to quote beside the
paper's table); `--protocol strict` scores with the training reward (exactly one marker).
docs/evaluation-protocols.md compares the three. The output folder
holds results.json (per benchmark: metric, n, protocol, model, checkpoint, decoding, seconds)
and samples.jsonl (one line per example, appended as each batch finishes: an interrupted
evaluation resumes where it stopped and never recomputes a finished example).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hrpo.core.distributed import init_group, shard
from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.core.program import add_runtime_arguments, run_program
from hrpo.core.prompts import ANSWER_MARKER, SYSTEM_PROMPT
from hrpo.engine.rollout import ColdStop, SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import (
    build_policy,
    eos_token_ids,
    load_base_model,
    resolve_device,
    resolve_dtype,
)
from hrpo.tasks import PROTOCOLS, get_task, load_examples
from hrpo.tasks.retrieval import attach_contexts
from hrpo.training.checkpoint import complete_checkpoints, load_checkpoint, read_checkpoint_meta
from hrpo.training.config import HelpFormatter, config_for
from hrpo.training.evaluation import scored_batches, summarise
from hrpo.training.runs import MANIFEST, RunDir, check_writable, write_json
from hrpo_kernels.latent_input import MODES, LatentParams

# The table of the paper, in its order, with its best reported number per row (percent).
BENCHMARKS = ("gsm8k", "math", "math500", "mmlu-stem", "arc-c", "nq", "triviaqa", "hotpotqa", "2wiki", "bamboogle")
PAPER_BEST = {
    "gsm8k": 83.5,
    "math": 58.6,
    "math500": 60.2,
    "mmlu-stem": 59.0,
    "arc-c": 82.0,
    "nq": 37.8,
    "triviaqa": 59.3,
    "hotpotqa": 31.6,
    "2wiki": 31.8,
    "bamboogle": 29.6,
}
# Where each benchmark's evaluation file lies in a data folder laid out like the project's
# shared data (`--data-root`); without it, the task's hub dataset is read.
DATA_LAYOUT = {
    "gsm8k": "gsm8k/test.jsonl",
    "math": "math/test.jsonl",
    "math500": "math/math500.jsonl",
    "mmlu-stem": "mmlu_stem/test.jsonl",
    "arc-c": "arc_challenge/test.jsonl",
    "nq": "nq/nq_open_dev.jsonl",
    "triviaqa": "triviaqa/llm_foundry_triviaqa_sm_sub.jsonl",
    "hotpotqa": "hotpotqa/ircot_dev_subsampled.jsonl",
    "2wiki": "2wikimultihopqa/dev_questions_answers.jsonl",
    "bamboogle": "bamboogle/test.jsonl",
}


def select(n_total: int, limit: int | None, seed: int) -> list[int]:
    """The indices evaluated: all, or `limit` of them drawn with `seed` (kept in file order),
    the same subset on every run with the same seed."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), limit))


# ---------------------------------------------------------------- the command line


def add_latent_arguments(p: argparse.ArgumentParser) -> None:
    """--latent-mode and its numbers (hrpo_kernels/latent_input.py, docs/latent-modes.md)."""
    p.add_argument(
        "--latent-mode",
        choices=MODES,
        help="what a thinking position's input is: hrpo (the gate's blend of the token and h_hat), soft "
        "(Soft Thinking's p @ E), moi (Mixture of Inputs), soft-noise (soft tokens: p @ E plus "
        "Gaussian noise), gumbel-soft (SofT-GRPO's Gumbel-Softmax mixture); None: the checkpoint's "
        "(soft-noise for --method soft-tokens), else hrpo",
    )
    p.add_argument(
        "--latent-temperature",
        type=float,
        help="temperature of the mixture's distribution; None: --temperature (fuzzy tokens: small)",
    )
    p.add_argument("--latent-top-p", type=float, default=1.0, help="nucleus of the mixture (1: off)")
    p.add_argument("--moi-beta", type=float, default=1.0, help="Mixture of Inputs' concentration beta")
    p.add_argument(
        "--noise-std",
        type=float,
        help="soft-noise's standard deviation (embedding units); None: the checkpoint's, else 0.1",
    )
    p.add_argument(
        "--gumbel-tau", type=float, help="gumbel-soft's Gumbel-Softmax temperature; None: the checkpoint's, else 0.1"
    )


def add_cold_stop_arguments(p: argparse.ArgumentParser) -> None:
    """--cold-stop-entropy / --cold-stop-steps (hrpo.engine.rollout.ColdStop; the server takes a
    per-request `cold_stop` instead)."""
    p.add_argument(
        "--cold-stop-entropy",
        type=float,
        help="Soft Thinking's cold stop: end thinking (write the answer marker) once the mixture's entropy "
        "(nats) stays below this for --cold-stop-steps consecutive steps; None: off",
    )
    p.add_argument("--cold-stop-steps", type=int, help="the cold stop's count of consecutive low-entropy steps")


def cold_stop(args) -> ColdStop | None:
    """The ColdStop of --cold-stop-entropy / --cold-stop-steps (None: off); a bad value or a
    decoding it cannot apply to is a one-line ConfigError."""
    tau, k = args.cold_stop_entropy, args.cold_stop_steps
    if tau is None and k is None:
        return None
    if tau is None or k is None:
        raise ConfigError("--cold-stop-entropy and --cold-stop-steps go together (give both, or neither)")
    if args.hybrid is False:
        raise ConfigError("--cold-stop-entropy: the cold stop ends thinking, and --no-hybrid decodes without it")
    if args.latent_mode == "gumbel-soft":
        raise ConfigError("--cold-stop-entropy: gumbel-soft's pass mixes noisy weights, not p, so it has no cold stop")
    try:
        return ColdStop(tau, k)
    except ValueError as err:
        raise ConfigError(f"--cold-stop-entropy {tau} --cold-stop-steps {k}: {err}") from None


def latent_params(args) -> LatentParams:
    """The LatentParams of add_latent_arguments' flags; a bad value is a one-line ConfigError."""
    try:
        return LatentParams(
            args.latent_mode, args.latent_temperature, args.latent_top_p, args.moi_beta, args.noise_std, args.gumbel_tau
        )
    except ValueError as err:
        raise ConfigError(f"--latent-mode {args.latent_mode}: {err}") from None


def _settings(args, task: str, data: str | None) -> dict:
    """What makes two evaluations the same: a resumed one must match it exactly."""
    spec = get_task(task)
    return {
        "task": task,
        "protocol": args.protocol,
        "model": args.base_model,
        "checkpoint": args.checkpoint,
        "data": data,
        "corpus": args.corpus,
        "limit": args.limit,
        "seed": args.seed,
        "decoding": {
            "greedy": not args.sample,
            "temperature": args.temperature,
            "top_k": args.top_k,
            **({} if args.top_p == 1 else {"top_p": args.top_p}),  # absent at 1: earlier runs' keys hold
            "max_new_tokens": args.max_new_tokens or spec.max_new_tokens,
            "hybrid": args.hybrid,
            **({} if latent_params(args).is_h_hat else {"latent": vars(latent_params(args))}),
            **({} if cold_stop(args) is None else {"cold_stop": vars(cold_stop(args))}),
        },
        "system_prompt": args.system_prompt,
        "marker": args.marker,  # where thinking ends: another marker blends other positions
    }


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _done(samples_file: Path, task: str, key: str) -> dict[int, dict]:
    """The samples of `task` already finished under the same settings (`key`), by index."""
    done = {}
    if samples_file.is_file():
        for line in samples_file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill: that example is recomputed
                continue
            if rec.get("task") == task and rec.get("key") == key:
                done[rec["index"]] = rec
    return done


def table(rows: dict[str, dict], columns: list[str] | None = None) -> str:
    """Markdown table of results (percent), with the paper's best number per benchmark."""
    lines = [
        "| benchmark | metric | " + " | ".join(columns or ["value", "n"]) + " | paper best |",
        "|---|---|" + "---|" * (len(columns or ["value", "n"]) + 1),
    ]
    for name, row in rows.items():
        cells = (
            [f"{100 * row['value']:.1f}", str(row["n"])]
            if columns is None
            else [
                ("" if row.get(c) is None else row[c] if isinstance(row[c], str) else f"{100 * row[c]:.1f}")
                for c in columns
            ]
        )
        lines.append(f"| {name} | {row['metric']} | " + " | ".join(cells) + f" | {PAPER_BEST.get(name, '')} |")
    return "\n".join(lines)


def compare(dirs: list[str], png: str | None, overwrite: bool) -> int:
    """Results of several evaluation folders side by side, printed and drawn (by default into
    the first folder's comparison.png, never the current folder)."""
    results = {}
    for d in dirs:
        file = Path(d) / "results.json"
        try:
            results[Path(d).name or d] = json.loads(file.read_text())["benchmarks"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--compare: cannot read {file} ({type(err).__name__})") from None
    names = [b for b in BENCHMARKS if any(b in r for r in results.values())]
    names += sorted({b for r in results.values() for b in r} - set(names))
    # per benchmark: its metric and, per run, (value, n) or None where the run lacks it
    merged = {
        b: {
            "metric": next(r[b]["metric"] for r in results.values() if b in r),
            **{run: (r[b]["value"], r[b]["n"]) if b in r else None for run, r in results.items()},
        }
        for b in names
    }
    shown = {
        b: {c: f"{100 * v[0]:.1f} (n={v[1]})" if isinstance(v, tuple) else v for c, v in row.items()}
        for b, row in merged.items()
    }
    print(table(shown, list(results)))
    out = check_writable(png or Path(dirs[0]) / "comparison.png", overwrite)
    _plot_comparison(merged, list(results), out)
    print(f"chart: {out}")
    return 0


def _plot_comparison(rows: dict, runs: list[str], path: Path) -> None:
    """Grouped bars (one group per benchmark: each run, then the paper's best), each labelled
    with its value; a zero draws a mark on the axis, a missing result says n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(rows)), 4.2))
    slots = len(runs) + 1  # the paper's mark takes the last slot of each group
    width = 0.8 / slots
    offset = [(k - (slots - 1) / 2) * width for k in range(slots)]  # centred on the group's tick
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        for j, row in enumerate(rows.values()):
            x, color = j + offset[i], colors[i % len(colors)]
            if row[run] is None:
                ax.text(x, 0.5, "n/a", ha="center", va="bottom", fontsize=7, color="gray", rotation=90)
                continue
            value = 100 * row[run][0]
            ax.bar(x, value, width, color=color, label=run if j == 0 else None)
            ax.plot(
                [x - width / 2, x + width / 2],
                [0, 0],
                color=color,
                lw=4,
                solid_capstyle="butt",
                clip_on=False,
                zorder=4,
            )  # a zero bar has no height: this keeps it visible
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    paper = [(j + offset[-1], PAPER_BEST[b]) for j, b in enumerate(rows) if b in PAPER_BEST]
    if paper:
        ax.scatter(*zip(*paper), marker="_", s=250, linewidths=2, color="black", label="paper (best)", zorder=3)
    labels = []
    for b, row in rows.items():
        ns = [str(row[run][1]) for run in runs if row[run] is not None]
        labels.append(f"{b}\nn={ns[0]}" if len(set(ns)) == 1 else f"{b}\nn={' / '.join(ns)}")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    top = max(
        [100 * row[run][0] for row in rows.values() for run in runs if row[run] is not None]
        + [v for _, v in paper]
        + [1.0]
    )
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("accuracy / exact match (%)")
    ax.set_title(f"{' vs '.join(runs)}: score per benchmark (n = examples scored per run)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class DefaultsHelpFormatter(HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """hrpo.train's help layout, with each flag's default after its help."""


def load_policy(checkpoint: str | None, model: str | None, device: torch.device, dtype: str = "auto"):
    """(policy, tokenizer, checkpoint metadata): the base model (the checkpoint's unless
    `model` names one; the embedded model without either) with the checkpoint's adapters and gate
    (hrpo.inspect's and hrpo.serve's loading)."""
    meta = read_checkpoint_meta(checkpoint) if checkpoint else {}
    base, tokenizer = load_base_model(model or meta.get("base_model"), device, resolve_dtype(dtype, device))
    if not checkpoint:
        return HybridModel(base).eval(), tokenizer, meta
    lora = meta["lora"]
    cfg = config_for("arith", lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_targets=tuple(lora["targets"]))
    return load_checkpoint(build_policy(base, cfg), checkpoint).eval(), tokenizer, meta


def resolve_checkpoint(path: str) -> str:
    """--checkpoint as given, or inside a training run's folder: its final `checkpoint`; an
    unfinished run is refused naming its latest resumable checkpoint."""
    root = Path(path)
    if (root / "checkpoint.json").is_file() or not root.is_dir():
        return path
    if (root / "checkpoint" / "checkpoint.json").is_file():
        return str(root / "checkpoint")
    found = complete_checkpoints(root / "checkpoints")
    if found:
        raise ConfigError(
            f"--checkpoint {path} is an unfinished run; pick one of its checkpoints, the latest: "
            f"--checkpoint {found[-1]}"
        )
    return path


def recorded_settings(args, meta: dict) -> None:
    """The decoding settings the user left unset (None) as the checkpoint was trained: hybrid
    latents, their latent mode (and soft-noise's sigma), system prompt, and the answer marker
    that ends thinking (earlier checkpoints record no system prompt: on; no mode: hrpo)."""
    if args.hybrid is None:
        args.hybrid = meta.get("hybrid", True)
    if args.system_prompt is None:
        args.system_prompt = meta.get("system_prompt", True)
    recorded_latent(args, meta)
    cold_stop(args)  # checked before the model loads
    args.marker = meta.get("marker", ANSWER_MARKER)


def recorded_latent(args, meta: dict) -> LatentParams:
    """latent_params(args), --latent-mode, --noise-std and --gumbel-tau left unset (None) as the
    checkpoint was trained (soft-noise and its sigma for --method soft-tokens, gumbel-soft and its
    tau for --method gumbel-soft; no mode recorded: hrpo)."""
    if args.latent_mode is None:
        args.latent_mode = meta.get("latent_mode", "hrpo")
    if args.noise_std is None:
        args.noise_std = meta.get("noise_std", LatentParams.noise_std)
    if args.gumbel_tau is None:
        args.gumbel_tau = meta.get("gumbel_tau", LatentParams.gumbel_tau)
    return latent_params(args)


def describe_policy(verb: str, args, task: str | None) -> str:
    """The one line naming what a command evaluates or inspects."""
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "the base model"
    task_part = f"task {task}, " if task else ""
    return (
        f"{verb} {what} ({task_part}base model {args.base_model or 'embedded'}, "
        f"hybrid {f'on ({args.latent_mode})' if args.hybrid else 'off'}, "
        f"system prompt {'on' if args.system_prompt else 'off'}, "
        f"marker {args.marker!r})"
    )


def _check_args(args) -> None:
    for name in ("limit", "batch_size", "max_new_tokens", "max_prompt_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be a number in (0, inf), got {args.temperature}")
    if args.top_k < 0 or args.seed < 0:
        raise ConfigError(f"--top-k and --seed must be >= 0, got {args.top_k} and {args.seed}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be a number in (0, 1], got {args.top_p}")
    latent_params(args)
    if args.task != "all":
        get_task(args.task)
    if args.data and args.task == "all":
        raise ConfigError("--data names one benchmark's file; with --task all use --data-root")


def _load(task: str, args):
    """(examples, where they came from): --data, else --data-root's layout, else the hub."""
    data = args.data or (
        str(Path(args.data_root) / DATA_LAYOUT[task]) if args.data_root and task in DATA_LAYOUT else None
    )
    examples = load_examples(config_for(task), args.split, data)
    if args.corpus:
        examples = attach_contexts(examples, args.corpus, k=3)
    return examples, data


def run(args) -> int:
    """Evaluate the policy `args` name on each task, continuing an interrupted evaluation in
    the same folder; rank 0 prints the results table."""
    meta = _resolve(args)
    tasks = list(BENCHMARKS) if args.task == "all" else [args.task]
    # An evaluation folder is continued by default: its finished examples are kept.
    resume = (Path(args.output_dir) / MANIFEST).is_file() and not args.overwrite
    out = RunDir(args.output_dir, overwrite=args.overwrite, resume=resume, kind="eval")
    group = init_group(args.device)  # under torchrun each rank evaluates a share; rank 0 writes
    if group.main:
        print(describe_policy("evaluating", args, args.task))
    device = resolve_device(args.device, group.local_rank)
    model, tokenizer = load_base_model(args.base_model, device, resolve_dtype(args.dtype, device))
    hm = _policy(model, meta, args.checkpoint, tasks[0])
    loaded = {t: _load(t, args) for t in tasks}  # every input checked before the folder is touched
    keys = {t: _key(_settings(args, t, loaded[t][1])) for t in tasks}
    if resume:
        _check_earlier(args.output_dir, keys)
    matcher = MarkerMatcher(tokenizer, args.marker, model.config.vocab_size)
    eos = eos_token_ids(model, tokenizer)
    engine = make_engine(hm.eval(), matcher, eos, tokenizer.pad_token_id, kind=args.engine)
    if group.main:
        out.open()
        out.path("results.json"), out.path("samples.jsonl")
    group.sum([0.0])  # the others wait until rank 0 has taken the folder
    results_file = out.root / "results.json"
    results = json.loads(results_file.read_text())["benchmarks"] if results_file.is_file() else {}
    for name in tasks:
        examples, data = loaded[name]
        job = TaskRun(args, name, examples, _settings(args, name, data), keys[name], out.root / "samples.jsonl")
        seconds = job.run(hm, tokenizer, engine, group)
        if group.main:
            earlier = results.get(name, {})
            previous = earlier.get("seconds", 0.0) if earlier.get("key") == keys[name] else 0.0
            results[name] = {**job.summary(previous + seconds), "key": keys[name]}
            write_json(results_file, {"benchmarks": results})
            out.started()
    if group.main:
        print(table({n: results[n] for n in tasks}))
        print(f"results: {results_file}")
    return 0


def _resolve(args) -> dict | None:
    """The checkpoint's metadata (None for the base model), with the settings the user left
    unset filled in from it, and every argument checked."""
    if args.checkpoint:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
    meta = read_checkpoint_meta(args.checkpoint) if args.checkpoint else None
    recorded_settings(args, meta or {})
    args.task = args.task or (meta or {}).get("task") or "gsm8k"
    args.base_model = args.model or (meta["base_model"] if meta else None)
    _check_args(args)
    return meta


def _policy(model, meta: dict | None, checkpoint: str | None, task: str) -> HybridModel:
    """The checkpoint's policy on `model` (LoRA of its recorded shape), or the base model."""
    if not meta:
        return HybridModel(model)
    cfg = config_for(
        task,
        lora_rank=meta["lora"]["rank"],
        lora_alpha=meta["lora"]["alpha"],
        lora_targets=tuple(meta["lora"]["targets"]),
    )
    return load_checkpoint(build_policy(model, cfg), checkpoint)


def _check_earlier(output_dir: str, keys: dict[str, str]) -> None:
    """A continued folder must hold each task evaluated with the same settings, if at all."""
    results_file = Path(output_dir) / "results.json"
    if not results_file.is_file():
        return
    for name, row in json.loads(results_file.read_text()).get("benchmarks", {}).items():
        if name in keys and row.get("key") != keys[name]:
            raise ValueError(
                f"--output-dir {output_dir} holds {name} evaluated with other settings; "
                "choose another folder or pass --overwrite"
            )


class TaskRun:
    """One task's evaluation: the examples chosen (--limit, --seed), those still to score, and
    the finished samples appended to `samples_file` batch by batch."""

    def __init__(self, args, name: str, examples: list, settings: dict, key: str, samples_file: Path):
        self.args, self.name, self.examples, self.settings, self.key = args, name, examples, settings, key
        self.task, self.samples_file = get_task(name), samples_file
        self.chosen = select(len(examples), args.limit, args.seed)
        done = _done(samples_file, name, key)
        self.todo = [i for i in self.chosen if i not in done]
        self.correct = [done[i]["correct"] for i in self.chosen if i in done]

    def run(self, hm, tokenizer, engine, group) -> float:
        """Score this rank's share of the examples still to do; returns the seconds taken."""
        args, recipe = self.args, config_for(self.name)
        sampling = SamplingConfig(
            self.settings["decoding"]["max_new_tokens"],
            args.temperature,
            args.top_k,
            args.top_p,
            greedy=not args.sample,
            hybrid=args.hybrid,
            latent=latent_params(args),
            cold_stop=cold_stop(args),
        )
        system = SYSTEM_PROMPT if args.system_prompt and recipe.system_prompt else None
        bar = tqdm(
            total=len(self.chosen),
            initial=len(self.chosen) - len(self.todo),
            desc=self.name,
            disable=args.quiet or not group.main,
        )
        start = time.perf_counter()
        mine = shard(self.todo, group)
        batches = scored_batches(
            hm,
            tokenizer,
            self.task,
            [self.examples[i] for i in mine],
            sampling,
            engine,
            max_prompt_length=args.max_prompt_length or recipe.max_prompt_length,
            system=system,
            batch_size=args.batch_size,
            seed=args.seed,
            protocol=args.protocol,
            indices=mine,
        )
        # Ranks go batch by batch together (a rank with a shorter share sends empty batches at
        # the end); rank 0 appends every rank's finished samples.
        share = -(-len(self.todo) // group.world)
        rounds = share // args.batch_size + bool(share % args.batch_size)
        with self.samples_file.open("a", encoding="utf-8") if group.main else contextlib.nullcontext() as fh:
            for _ in range(rounds):
                batch = [s for part in group.gather(next(batches, [])) for s in part]
                self._record(batch, fh)
                bar.update(len(batch))
                bar.set_postfix({self.task.metric: f"{sum(self.correct) / max(len(self.correct), 1):.3f}"})
        bar.close()
        return time.perf_counter() - start

    def _record(self, batch: list[dict], fh) -> None:
        """Tag a finished batch with its task and settings and append it (rank 0: `fh`)."""
        for s in batch:
            s.update(task=self.name, key=self.key)
            self.correct.append(s["correct"])
        if fh is not None:
            fh.write("".join(json.dumps(s) + "\n" for s in batch))
            fh.flush()

    def summary(self, seconds: float) -> dict:
        """The results row of every chosen example finished so far (this run's and earlier)."""
        chosen = set(self.chosen)
        finished = [rec for rec in _done(self.samples_file, self.name, self.key).values() if rec["index"] in chosen]
        return summarise(self.task, finished, self.settings, seconds)


# long: one add_argument per flag, in the order --help lists them; split, the command line would be scattered
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hrpo.eval", description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument(
        "--task",
        help=f"one of {', '.join(BENCHMARKS)}, another registered task, or all "
        "(None: the checkpoint's task, else gsm8k)",
    )
    p.add_argument(
        "--checkpoint",
        help="an HRPO checkpoint folder (adapters + gate) or a finished training run's folder; None: the base model",
    )
    p.add_argument(
        "--model", help="base model (hub name or folder); None: the checkpoint's base, else the embedded model"
    )
    p.add_argument("--data", help="one benchmark's evaluation file (or folder, or hub name)")
    p.add_argument(
        "--data-root", help="a folder laid out like the project's shared data: each benchmark's file is found there"
    )
    p.add_argument("--split", default="test", help="split of a folder or hub dataset")
    p.add_argument(
        "--corpus", help="a passage corpus (FlashRAG form); QA records without contexts get their top 3 by BM25"
    )
    p.add_argument("--output-dir", default="evals/run", help="results.json and samples.jsonl (resumed if interrupted)")
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation with other settings in --output-dir")
    p.add_argument(
        "--protocol",
        default="paper",
        choices=PROTOCOLS,
        help="how answers are scored: paper (our readers, last marker), official (the paper's own "
        "eval scripts, bugs included), strict (the training reward: exactly one marker)",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="evaluate this many examples, drawn with --seed (the same subset each time); None: all",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the --limit subset and seeds sampling")
    p.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        help="blend latents into thinking inputs; None: as the checkpoint was trained, else on",
    )
    p.add_argument(
        "--system-prompt",
        action=argparse.BooleanOptionalAction,
        help="the paper's system prompt where the task's recipe uses one (the embedded task is asked "
        "without one); None: as the checkpoint was trained, else on",
    )
    p.add_argument("--sample", action="store_true", help="sample at --temperature / --top-k instead of greedy")
    p.add_argument(
        "--temperature", type=float, default=0.5, help="of sampling (--sample) and of the distribution latents mix"
    )
    p.add_argument("--top-k", type=int, default=50, help="of sampling and of the distribution latents mix (0: all)")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus of sampling and of the latents' mixture, inside the top-k (1: off)",
    )
    add_latent_arguments(p)
    add_cold_stop_arguments(p)
    p.add_argument("--max-new-tokens", type=int, help="None: the protocol's (512; 1024 for math and math500)")
    p.add_argument("--max-prompt-length", type=int, help="None: the task recipe's prompt limit")
    p.add_argument("--batch-size", type=int, default=64, help="examples generated together")
    p.add_argument("--engine", default="fast", choices=("fast", "reference"), help="rollout loop")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_runtime_arguments(p)
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print and draw the results of these evaluation folders")
    p.add_argument("--png", help="the chart --compare draws; None: comparison.png in the first compared folder")
    return p


def main(argv: list[str] | None = None) -> int:
    # finished examples are in samples.jsonl already: a rerun continues
    return run_program(parser(), evaluate_or_compare, argv, stopped="; run the same command again to continue")


def evaluate_or_compare(args) -> int:
    return compare(args.compare, args.png, args.overwrite) if args.compare else run(args)


if __name__ == "__main__":
    sys.exit(main())
