"""Scoring a policy on examples: what `python -m hrpo.eval` reports and what the trainer checks
on its held-out split before, during and after training.

`scored_batches` generates through the rollout engine batch by batch and scores each
completion; `evaluate` runs them all into one accuracy; `summarise` turns finished samples into
a results row.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from hrpo.core.prompts import Example, encode_prompts
from hrpo.engine.rollout import SamplingConfig
from hrpo.tasks import Task
from hrpo.tasks.reward_guard import score as guarded_score
from hrpo.training.reporting import json_safe


def decode_completions(tokenizer, out) -> list[str]:
    rows = [ids[mask].tolist() for ids, mask in zip(out.completion_ids, out.completion_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


@torch.no_grad()
def scored_batches(
    hm,
    tokenizer,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    engine,
    *,
    max_prompt_length: int,
    system: str | None,
    batch_size: int,
    seed: int,
    protocol: str = "strict",
    reward_fn=None,
    reward_timeout: float = 60.0,
    indices: list[int] | None = None,
):
    """Generate for `examples` batch by batch and yield each batch's samples (one dict per
    example: its index, prompt, completion, extracted answer, golds, correct, completion
    tokens, mean gate coefficient). `correct` is the task's score under `protocol`, or
    `reward_fn`'s reward when one is given (the trainer's held-out check)."""
    indices = list(range(len(examples))) if indices is None else indices
    official = protocol == "official" and reward_fn is None  # samples show the golds the paper's script compares
    messages = [task.render(ex) for ex in examples]
    prompts = encode_prompts(tokenizer, messages, max_prompt_length, system)
    generator = torch.Generator(device=hm.lm_weight.device).manual_seed(seed)
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        out = engine.generate(prompts[lo : lo + batch_size], sampling, generator)
        texts = decode_completions(tokenizer, out)
        if reward_fn is None:
            golds = [task.gold(ex, protocol) for ex in batch]  # official: what the paper's script reads
            correct = [task.reward(t, g, protocol) for t, g in zip(texts, golds)]
        else:
            golds = [ex.answer for ex in batch]
            correct, _ = guarded_score(reward_fn, texts, golds, reward_timeout)
        samples = []
        lengths, gates = out.lengths.tolist(), out.gate_mean.tolist()  # one host read per batch
        for j, (ex, text, ok) in enumerate(zip(batch, texts, correct)):
            extracted = task.answer(text, protocol)
            samples.append(
                json_safe(
                    {
                        "index": indices[lo + j],
                        "prompt": messages[lo + j],
                        "completion": text,
                        "extracted": None if extracted is None else str(extracted),
                        "golds": ex.answer,
                        "correct": float(ok) if math.isfinite(ok) else 0.0,  # a non-finite reward credits nothing
                        **({"official_golds": task.official.golds(golds[j])} if official else {}),
                        **(
                            task.details("" if extracted is None else str(extracted), ex.answer) if task.details else {}
                        ),
                        "completion_tokens": lengths[j],
                        "gate_mean": gates[j],
                    }
                )
            )
        yield samples


def evaluate(
    hm,
    tokenizer,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    engine,
    *,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Accuracy (mean of `correct`), mean completion length, seconds and the samples."""
    samples, start = [], time.perf_counter()
    bar = tqdm(total=len(examples), desc=f"eval {task.name}", disable=not progress, leave=False)
    for batch in scored_batches(hm, tokenizer, task, examples, sampling, engine, **kwargs):
        samples.extend(batch)
        bar.update(len(batch))
    bar.close()
    n = max(len(samples), 1)
    return {
        "accuracy": sum(s["correct"] for s in samples) / n,
        "n": len(samples),
        "mean_completion_tokens": sum(s["completion_tokens"] for s in samples) / n,
        "seconds": time.perf_counter() - start,
        "samples": samples,
    }


def summarise(task: Task, samples: list[dict], settings: dict, seconds: float) -> dict:
    """A benchmark's results row: its metric's mean over `samples` (and mean F1 where the
    samples have one), their count and completion length, the settings and the seconds."""
    n = len(samples)
    value = sum(s["correct"] for s in samples) / n if n else float("nan")
    row = {"metric": task.metric, "value": value, "n": n, **settings, "seconds": seconds}
    if samples and "f1" in samples[0]:
        row["f1"] = sum(s["f1"] for s in samples) / n
    row["mean_completion_tokens"] = sum(s["completion_tokens"] for s in samples) / n if n else None
    return row
