"""Policies under each decoding mode: plain tokens, HRPO's gate, and the training-free latent
modes (docs/latent-modes.md), greedy and sampled, with pass@1 and pass@k.

    python scripts/compare_latent_modes.py --task gsm8k --data ../shared/data/gsm8k/test.jsonl \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --policy hrpo=runs/hrpo/final --limit 100 \
        --seeds 0 1 2 --samples 8 --output-dir runs/latent_modes

Each policy (the base model, and every --policy NAME=CHECKPOINT) is evaluated under every
mode: greedy (one completion per question: pass@1 is its accuracy) and sampled (--samples
completions per question at --temperature: pass@k by the unbiased estimator
1 - C(n - c, k) / C(n, k), k = 1, 2, 4, ... up to n), once per seed. Writes
latent_modes.json, latent_modes.md (mean and spread over seeds) and latent_modes.png.
Each row also reports the mean completion length and the mean thinking length (the tokens
before the answer marker: all of them when no marker is written).
`--merge A/latent_modes.json B/latent_modes.json ...` evaluates nothing: it joins the rows of
earlier runs (policies evaluated in separate processes) into one table and plot; with
`--by-method`, the policies NAME-s0, NAME-s1, ... (training seeds) become one row NAME whose
mean and spread are over the training seeds (each seed's value its mean over sampling seeds).
With few questions and a small model the differences between modes are mostly noise: the
table shows the spread over seeds so that one can tell.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

import torch

from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import ANSWER_MARKER, SYSTEM_PROMPT
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.eval import load_policy
from hrpo.model.loading import eos_token_ids, resolve_device
from hrpo.tasks import get_task, load_examples
from hrpo.training.config import config_for
from hrpo.training.evaluation import scored_batches
from hrpo.training.runs import write_json
from hrpo_kernels.latent_input import MODES, LatentParams

DECODINGS = ("plain", *MODES)  # plain: no thinking inputs (hybrid off)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks(n: int) -> list[int]:
    return [k for k in (1, 2, 4, 8, 16, 32) if k <= n]


def thinking_tokens(tokenizer, completion: str) -> int:
    """Tokens of the completion before its first answer marker (the whole text without one);
    the space before the marker goes with the marker, as a byte-level BPE writes " ####"."""
    return len(tokenizer.encode(completion.split(ANSWER_MARKER, 1)[0].rstrip(), add_special_tokens=False))


def run_mode(hm, tokenizer, task, examples, engine, args, decoding: str, greedy: bool, seed: int):
    """pass@k (greedy: k = 1) of one policy under one decoding and seed, and the mean
    completion and thinking lengths in tokens."""
    latent = LatentParams(
        "hrpo" if decoding == "plain" else decoding,
        noise_std=args.noise_std,
        gumbel_tau=args.gumbel_tau,
        beta=args.moi_beta,
    )
    n = 1 if greedy else args.samples
    sampling = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_k, greedy=greedy, hybrid=decoding != "plain", latent=latent
    )
    recipe = config_for(task.name)
    repeated = [ex for ex in examples for _ in range(n)]
    correct: dict[int, int] = {}
    tokens, thinking = [], []
    for batch in scored_batches(
        hm,
        tokenizer,
        task,
        repeated,
        sampling,
        engine,
        max_prompt_length=recipe.max_prompt_length,
        system=SYSTEM_PROMPT if recipe.system_prompt else None,
        batch_size=args.batch_size,
        seed=seed,
        indices=[i for i in range(len(examples)) for _ in range(n)],
    ):
        for s in batch:
            correct[s["index"]] = correct.get(s["index"], 0) + int(s["correct"] > 0)
            tokens.append(s["completion_tokens"])
            thinking.append(thinking_tokens(tokenizer, s["completion"]))
    metrics = {f"pass@{k}": statistics.mean(pass_at_k(n, c, k) for c in correct.values()) for k in ks(n)}
    return metrics, {"tokens": statistics.mean(tokens), "thinking": statistics.mean(thinking)}


def cell(values: list[float]) -> str:
    """Mean ± sample standard deviation; a single run (greedy) has no spread to show."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (policy, decoding, greedy/sampled), mean +- spread over seeds,
    and the mean lengths where the rows have them (runs before lengths were recorded lack them)."""
    metrics = sorted({m for r in rows for m in r["metrics"]}, key=lambda m: int(m.split("@")[1]))
    lengths = [k for k in ("tokens", "thinking") if any(k in r.get("lengths", {}) for r in rows)]
    out = [
        "| policy | decoding | | " + " | ".join(metrics + lengths) + " |",
        "|---|---|---|" + "---|" * len(metrics + lengths),
    ]
    keys = dict.fromkeys((r["policy"], r["decoding"], r["how"]) for r in rows)
    for policy, decoding, how in keys:
        runs = [r for r in rows if (r["policy"], r["decoding"], r["how"]) == (policy, decoding, how)]
        cells = [cell([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in metrics]
        cells += [length_cell([r["lengths"][k] for r in runs if k in r.get("lengths", {})]) for k in lengths]
        out.append(f"| {policy} | {decoding} | {how} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def length_cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.0f}" if values else ""


def by_method(rows: list[dict]) -> list[dict]:
    """One row per (method, decoding, how, training seed): policies NAME-sN pooled under NAME,
    each seed's metrics and lengths averaged over its sampling seeds, so that the table's
    spread is over training seeds. A name without a seed suffix (base) is one seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        method, seed = re.fullmatch(r"(.+?)(?:-s(\d+))?", r["policy"]).groups()
        groups.setdefault((method, r["decoding"], r["how"], seed), []).append(r)
    return [
        {
            "policy": method,
            "decoding": decoding,
            "how": how,
            "seed": seed,
            "metrics": mean_dicts([r["metrics"] for r in runs]),
            "lengths": mean_dicts([r.get("lengths", {}) for r in runs]),
        }
        for (method, decoding, how, seed), runs in groups.items()
    ]


def mean_dicts(dicts: list[dict]) -> dict:
    return {k: statistics.mean(d[k] for d in dicts if k in d) for k in dict.fromkeys(k for d in dicts for k in d)}


def plot(rows: list[dict], path: Path, spread_over: str = "seeds") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    decodings = [d for d in DECODINGS if any(r["decoding"] == d for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, how, metric in ((axes[0], "greedy", "pass@1"), (axes[1], "sampled", None)):
        width = 0.8 / max(len(policies), 1)
        for j, policy in enumerate(policies):
            means, spreads = [], []
            for decoding in decodings:
                runs = [r["metrics"] for r in rows if (r["policy"], r["decoding"], r["how"]) == (policy, decoding, how)]
                m = metric or max((k for r in runs for k in r), key=lambda k: int(k.split("@")[1]), default="pass@1")
                values = [r[m] for r in runs if m in r] or [0.0]
                means.append(statistics.mean(values))
                spreads.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            x = [i + j * width for i in range(len(decodings))]
            ax.bar(x, means, width, yerr=spreads, label=policy, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(decodings))], decodings, rotation=20)
        ax.set_title(f"{how}: {metric or 'pass@k, largest k'}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"accuracy (mean over {spread_over}, bar: spread)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arith")
    p.add_argument("--data", help="the task's evaluation file (None: the embedded task's generator or the hub)")
    p.add_argument("--split", default="test")
    p.add_argument("--model", help="base model (None: the embedded model)")
    p.add_argument("--policy", nargs="*", default=[], metavar="NAME=CHECKPOINT", help="trained policies to compare")
    p.add_argument("--limit", type=int, default=50, help="questions evaluated")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=8, help="sampled completions per question (pass@k up to this)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--gumbel-tau", type=float, default=0.1)
    p.add_argument("--moi-beta", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default="runs/latent_modes")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True, help="evaluate the base model too")
    p.add_argument("--decodings", nargs="+", choices=DECODINGS, default=list(DECODINGS), help="the decodings run")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="join earlier runs' latent_modes.json; evaluate nothing")
    p.add_argument("--by-method", action="store_true", help="with --merge: pool NAME-sN policies over training seeds")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if args.merge:
        rows = merged_rows(args.merge)
        out.mkdir(parents=True, exist_ok=True)
        if args.by_method:
            write_outputs(out, {"merged": args.merge, "rows": by_method(rows)}, "training seeds")
        else:
            write_outputs(out, {"merged": args.merge, "rows": rows})
        return 0
    policies = {"base": None} if args.base else {}
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--policy {spec!r}: expected NAME=CHECKPOINT")
        policies[name] = path
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task)
    examples = load_examples(config_for(args.task), args.split, args.data, limit=args.limit)
    device = resolve_device(args.device)
    rows = []
    for name, checkpoint in policies.items():
        hm, tokenizer, _ = load_policy(checkpoint, args.model, device)
        matcher = MarkerMatcher(tokenizer, vocab_size=hm.config.vocab_size)
        engine = make_engine(hm, matcher, eos_token_ids(hm.causal_lm, tokenizer), tokenizer.pad_token_id)
        for decoding in args.decodings:
            for how in ("greedy", "sampled"):
                for seed in args.seeds if how == "sampled" else args.seeds[:1]:  # greedy: no randomness
                    greedy = how == "greedy"
                    metrics, lengths = run_mode(hm, tokenizer, task, examples, engine, args, decoding, greedy, seed)
                    row = {"policy": name, "decoding": decoding, "how": how, "seed": seed, "metrics": metrics}
                    rows.append({**row, "lengths": lengths})
                    shown = {k: round(v, 3) for k, v in {**metrics, **lengths}.items()}
                    print(name, decoding, how, seed, shown, flush=True)
            write_outputs(out, {"settings": vars(args), "rows": rows}, quiet=True)  # a stopped run keeps its rows
        del hm, engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    write_outputs(out, {"settings": vars(args), "rows": rows})
    return 0


def merged_rows(paths: list[str]) -> list[dict]:
    """The rows of several latent_modes.json files; a policy name may come from one file only,
    so that two runs of the same name are never averaged as if they were seeds of one."""
    rows, owner = [], {}
    for path in paths:
        try:
            file_rows = json.loads(Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge {path}: not a latent_modes.json ({e})") from None
        for name in dict.fromkeys(r["policy"] for r in file_rows):
            if name in owner:
                raise SystemExit(f"--merge {path}: policy {name!r} is also in {owner[name]}; rename one")
            owner[name] = path
        rows += file_rows
    return rows


def write_outputs(out: Path, result: dict, spread_over: str = "seeds", quiet: bool = False) -> None:
    rows = result["rows"]
    write_json(out / "latent_modes.json", result)
    (out / "latent_modes.md").write_text(table(rows) + "\n")
    plot(rows, out / "latent_modes.png", spread_over)
    if not quiet:
        print(table(rows))


if __name__ == "__main__":
    raise SystemExit(main())
