"""Evaluate a base model or an HRPO checkpoint on a task: `python -m hrpo.eval --help`."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from .marker import MarkerMatcher
from .prompts import SYSTEM_PROMPT, Example, encode_prompts
from .engine import make_engine
from .reward_guard import score
from .rollout import SamplingConfig


@torch.no_grad()
def evaluate(
    hm,
    tokenizer,
    messages: list[str],
    examples: list[Example],
    reward_fn,
    sampling: SamplingConfig,
    matcher: MarkerMatcher,
    eos_ids: list[int],
    max_prompt_length: int,
    system: str | None = SYSTEM_PROMPT,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    engine=None,
    reward_timeout: float = 60.0,
) -> dict:
    """Accuracy (mean reward) and per-sample completions over `examples`, asked as `messages`
    (rollouts by `engine`, default: hrpo.engine.make_engine's for this model)."""
    engine = engine or make_engine(hm, matcher, eos_ids, tokenizer.pad_token_id)
    prompts = encode_prompts(tokenizer, messages, max_prompt_length, system)
    generator = torch.Generator(device=hm.lm_weight.device).manual_seed(seed)
    samples, start = [], time.perf_counter()
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, leave=False)
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        out = engine.generate(prompts[lo : lo + batch_size], sampling, generator)
        texts = decode_completions(tokenizer, out)
        rewards, _ = score(reward_fn, texts, [ex.answer for ex in batch], reward_timeout)
        for ex, text, reward, n in zip(batch, texts, rewards, out.lengths.tolist()):
            samples.append({"question": ex.question, "answer": ex.answer, "completion": text, "reward": reward, "tokens": n})
        bar.update(len(batch))
    bar.close()
    n = max(len(samples), 1)
    return {
        "accuracy": sum(s["reward"] for s in samples) / n,
        "n": len(samples),
        "mean_completion_tokens": sum(s["tokens"] for s in samples) / n,
        "seconds": time.perf_counter() - start,
        "samples": samples,
    }


def decode_completions(tokenizer, out) -> list[str]:
    rows = [ids[mask].tolist() for ids, mask in zip(out.completion_ids, out.completion_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_checkpoint, read_checkpoint_meta
    from .config import config_for
    from .tasks import load_examples, user_messages
    from .loading import build_policy, eos_token_ids, load_base_model, resolve_device, resolve_dtype
    from .model import HybridModel
    from .rewards import get_reward_fn
    from .runs import check_writable, write_json

    p = argparse.ArgumentParser(prog="python -m hrpo.eval", description=__doc__)
    p.add_argument("--task", default="arith")
    p.add_argument("--checkpoint", help="an HRPO checkpoint folder (adapters + gate); default: the base model")
    p.add_argument("--model", help="base model (hub name or folder); default: the checkpoint's base, else the embedded model")
    p.add_argument("--data", help="evaluation data (file, folder or hub name); default: the task's test split")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", default="eval.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sample", action="store_true", help="sample at --temperature / --top-k instead of greedy")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, help="default: the task recipe's completion limit")
    p.add_argument("--max-prompt-length", type=int, help="default: the task recipe's prompt limit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engine", default="fast", choices=("fast", "reference"), help="rollout loop (default: fast)")
    args = p.parse_args(argv)
    try:
        out_path = check_writable(args.output, args.overwrite)
        cfg = config_for(args.task, model=args.model, data=args.data, seed=args.seed, max_prompt_length=args.max_prompt_length)
        base = args.model or (read_checkpoint_meta(args.checkpoint)["base_model"] if args.checkpoint else None)
        device = resolve_device(args.device)
        model, tokenizer = load_base_model(base, device, resolve_dtype(args.dtype, device))
        if args.checkpoint:
            meta = read_checkpoint_meta(args.checkpoint)
            cfg.lora_rank, cfg.lora_alpha = meta["lora"]["rank"], meta["lora"]["alpha"]
            cfg.lora_targets = tuple(meta["lora"]["targets"])
            hm = load_checkpoint(build_policy(model, cfg), args.checkpoint)
        else:
            hm = HybridModel(model)
        examples = load_examples(cfg, args.split, args.data, args.limit)
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens or cfg.max_completion_length,
            temperature=args.temperature, top_k=args.top_k, greedy=not args.sample, hybrid=args.hybrid,
        )
        matcher = MarkerMatcher(tokenizer, cfg.marker, model.config.vocab_size)
        eos = eos_token_ids(model, tokenizer)
        engine = make_engine(hm.eval(), matcher, eos, tokenizer.pad_token_id, kind=args.engine)
        result = evaluate(
            hm, tokenizer, user_messages(args.task, examples), examples, get_reward_fn(args.task), sampling, matcher, eos, cfg.max_prompt_length,
            SYSTEM_PROMPT if cfg.system_prompt else None, args.batch_size, args.seed, engine=engine,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update(task=args.task, checkpoint=args.checkpoint, model=base, hybrid=args.hybrid, greedy=not args.sample)
    write_json(out_path, result)
    print(f"{args.task}: accuracy {result['accuracy']:.3f} over {result['n']} examples -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
