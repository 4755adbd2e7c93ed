"""HRPO training: `python -m hrpo.train` (no arguments: the embedded model and task on CPU).

Each device step samples `batch_size` completions (`batch_size / group_size` prompts, each
`group_size` times) with the hybrid rollout, scores them, and takes the GRPO gradient of
the teacher-forced hybrid forward; the optimizer steps every `grad_accum` device steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import TrainConfig, add_config_args, config_for
from .eval import decode_completions, evaluate
from .loading import build_policy, eos_token_ids, load_base_model, resolve_device, resolve_dtype
from .loss import grpo_loss, group_advantages
from .marker import MarkerMatcher
from .model import HybridModel, ModelError
from .plots import plot_curves
from .prompts import SYSTEM_PROMPT, encode_prompts
from .engine import make_engine
from .rollout import SamplingConfig
from .runs import prepare_run_dir, write_json
from .tasks import load_examples


def make_optimizer(hm: HybridModel, cfg: TrainConfig, total_steps: int):
    """AdamW over three groups (LoRA, gate linears, Lambda) and a warm-up + cosine schedule."""
    groups = hm.gate.param_groups()
    lora = [p for n, p in hm.model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": lora, "lr": cfg.lr_lora, "name": "lora"},
        {"params": groups["gate"], "lr": cfg.lr_gate, "name": "gate"},
        {"params": groups["lambda"], "lr": cfg.lr_lambda, "name": "lambda"},
    ]
    opt = torch.optim.AdamW(
        param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def heldout_sources(cfg: TrainConfig) -> str | None:
    source = cfg.eval_data or cfg.data
    if source is not None and cfg.eval_data is None and Path(source).is_file():
        raise ValueError(f"--data {source} is one file; pass --eval-data with a held-out split")
    return source


def train(cfg: TrainConfig, reward_fn=None, progress: bool = True) -> dict:
    """Run HRPO (or plain GRPO with cfg.hybrid False); returns the summary it writes."""
    if cfg.batch_size % cfg.group_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of group_size {cfg.group_size}")
    from .rewards import get_reward_fn

    reward_fn = reward_fn or get_reward_fn(cfg.task)
    run_dir = prepare_run_dir(cfg.output_dir, cfg.overwrite)
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_base_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    hm = build_policy(model, cfg)

    system = SYSTEM_PROMPT if cfg.system_prompt else None
    train_ex = load_examples(cfg, "train", cfg.data, cfg.train_limit)
    eval_ex = load_examples(cfg, "test", heldout_sources(cfg), cfg.eval_limit)
    train_prompts = encode_prompts(tokenizer, train_ex, cfg.max_prompt_length, system)
    matcher = MarkerMatcher(tokenizer, cfg.marker, model.config.vocab_size)
    eos = eos_token_ids(model, tokenizer)
    sampling = SamplingConfig(cfg.max_completion_length, cfg.temperature, cfg.top_k, greedy=False, hybrid=cfg.hybrid)
    greedy = dataclasses.replace(sampling, greedy=True)
    engine = make_engine(hm, matcher, eos, tokenizer.pad_token_id, kind=cfg.engine)

    def heldout(when: str) -> tuple[dict, dict]:
        """Greedy accuracy (the headline) and accuracy when sampling as in training."""
        runs = [evaluate(hm.eval(), tokenizer, eval_ex, reward_fn, how, matcher, eos, cfg.max_prompt_length,
                         system, cfg.eval_batch_size, cfg.seed, progress, engine) for how in (greedy, sampling)]
        print(f"held-out accuracy {when} training: {runs[0]['accuracy']:.3f} greedy, "
              f"{runs[1]['accuracy']:.3f} sampled (T={cfg.temperature}), {runs[0]['n']} examples")
        return runs[0], runs[1]

    before, before_sampled = heldout("before")

    prompts_per_step = cfg.batch_size // cfg.group_size
    order = [i for _ in range(cfg.epochs) for i in random.sample(range(len(train_ex)), len(train_ex))]
    device_steps = len(order) // prompts_per_step
    if cfg.max_steps is not None:
        device_steps = min(device_steps, cfg.max_steps * cfg.grad_accum)
    if device_steps == 0:
        raise ValueError(f"{len(train_ex)} training examples make no step of {prompts_per_step} prompts")
    opt_steps = math.ceil(device_steps * cfg.num_iterations / cfg.grad_accum)
    opt, sched = make_optimizer(hm, cfg, opt_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    metrics_file = (run_dir / "metrics.jsonl").open("w")
    records, micro, start = [], 0, time.perf_counter()
    bar = tqdm(range(device_steps), desc="hrpo" if cfg.hybrid else "grpo", disable=not progress)
    for step in bar:
        idx = order[step * prompts_per_step : (step + 1) * prompts_per_step]
        prompts = [train_prompts[i] for i in idx for _ in range(cfg.group_size)]
        answers = [train_ex[i].answer for i in idx for _ in range(cfg.group_size)]
        hm.eval()
        t0 = time.perf_counter()
        out = engine.generate(prompts, sampling, generator)
        t_rollout = time.perf_counter() - t0
        rewards = torch.tensor(reward_fn(decode_completions(tokenizer, out), answers), dtype=torch.float32, device=device)
        adv = group_advantages(rewards, cfg.group_size)

        hm.train()
        ref = None
        if cfg.beta:
            with torch.no_grad(), hm.adapters_disabled():
                ref = hm.sequence_logprobs(out, cfg.temperature, hybrid=False)
        for _ in range(cfg.num_iterations):
            logp = hm.sequence_logprobs(out, cfg.temperature, hybrid=cfg.hybrid)
            loss, info = grpo_loss(
                logp, adv, out.completion_mask, ref, out.logprobs if cfg.num_iterations > 1 else None,
                cfg.beta, cfg.epsilon, cfg.loss_norm, cfg.max_completion_length,
            )
            (loss / cfg.grad_accum).backward()
            micro += 1
            if micro % cfg.grad_accum == 0:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                info["grad_norm"] = float(grad_norm)
        record = {
            "step": step,
            "reward": float(rewards.mean()),
            "loss": loss.item(),
            "completion_tokens": float(out.lengths.float().mean()),
            "gate_a": float(out.gate_mean.nanmean()) if cfg.hybrid else float("nan"),
            "think_frac": float(out.think_mask.sum() / out.completion_mask.sum().clamp_min(1)),
            "lr_lora": opt.param_groups[0]["lr"],
            "rollout_s": t_rollout,
            "rollout_tokens_per_s": out.stats["tokens_per_s"],
            "elapsed_s": time.perf_counter() - start,
            **info,
        }
        records.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
    metrics_file.close()

    after, after_sampled = heldout("after")
    save_checkpoint(hm, run_dir / "checkpoint", cfg.model, {"task": cfg.task, "hybrid": cfg.hybrid, "marker": cfg.marker})
    plot_curves(records, run_dir / "curves.png", f"{'HRPO' if cfg.hybrid else 'GRPO'} on {cfg.task}, seed {cfg.seed}")
    summary = {
        "task": cfg.task,
        "hybrid": cfg.hybrid,
        "seed": cfg.seed,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "sampled_accuracy_before": before_sampled["accuracy"],
        "sampled_accuracy_after": after_sampled["accuracy"],
        "eval_examples": after["n"],
        "device_steps": device_steps,
        "optimizer_steps": opt_steps,
        "train_seconds": time.perf_counter() - start,
        "final_gate_a": records[-1]["gate_a"],
    }
    write_json(run_dir / "summary.json", summary)
    write_json(run_dir / "eval_after.json", after)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hrpo.train", description=__doc__)
    p.add_argument("--task", default="arith", help="arith (embedded), gsm8k, math, mmlu, rag-qa")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_for(**vars(args))
        summary = train(cfg)
    except (ValueError, FileExistsError, FileNotFoundError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    print(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} ({gain:+.3f}); run in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
