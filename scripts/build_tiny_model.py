"""Build the tiny embedded model of hrpo/assets/tiny: a BPE tokenizer and a small Qwen2 model,
supervised fine-tuned briefly on synthetic arithmetic word problems (hrpo.tasks.synthetic).

Only part of the SFT corpus writes the answer after the marker (the rest in prose), so the
warm-started model is partly right and RL has both reward signal and room to improve (see the
README this writes). Everything is seeded and deterministic, so reruns on the same machine
(same thread count) write the same weights.

    python scripts/build_tiny_model.py                 # writes hrpo/assets/tiny (800 steps, 40% marker)
    python scripts/build_tiny_model.py --sft-steps 1000 --marker-fraction 0.5 --out /tmp/tiny_other
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from hrpo.core.prompts import ANSWER_MARKER, format_prompt
from hrpo.tasks.synthetic import synthetic_split

# The instruction the tokenizer's corpus was built with (kept so that the build stays reproducible).
SYSTEM_PROMPT = (
    "Think through the problem step by step, then write the final answer on the last line "
    f"after '{ANSWER_MARKER}', for example '{ANSWER_MARKER} 42'."
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hrpo" / "assets" / "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

# Qwen-style chat template: no default system turn, so format_prompt(..., system=None) gives
# just the user turn followed by the assistant header.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained on the corpus, wrapped as a Qwen2Tokenizer.

    AutoTokenizer loads any checkpoint whose config says model_type "qwen2" as Qwen2Tokenizer,
    which rebuilds its normalizer and pre-tokenizer in code and keeps only the vocab and merges
    of tokenizer.json. So we train the BPE with exactly that pipeline (taken from an empty
    Qwen2Tokenizer): it isolates every digit, so numbers are spelled digit by digit, and its
    byte-level alphabet encodes any text and decodes it exactly."""
    qwen = Qwen2Tokenizer()._tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # else decode would eat the space before '.'
        model_max_length=512,
    )


def build_model(tokenizer, hidden: int, layers: int, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def sft_solution(ex, rng: random.Random, marker_fraction: float) -> str:
    """The worked solution, ending in the marker form for `marker_fraction` of the corpus and
    in plain prose ("The answer is 9.") otherwise. The warm-started model then follows the
    answer format only part of the time, as an instruction-tuned model that has never seen
    the marker convention would, and RL has to learn it as well as the arithmetic."""
    if rng.random() < marker_fraction:
        return ex.meta["solution"]
    return ex.meta["solution"].replace(f"{ANSWER_MARKER} {ex.answer}", f"The answer is {ex.answer}.")


def encode_sft(tokenizer, examples, marker_fraction: float = 1.0, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per example. Both halves are encoded separately, exactly as
    at RL time the prompt is encoded and the completion is generated after it."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        prompt = tokenizer(format_prompt(tokenizer, ex.question, system=None), add_special_tokens=False).input_ids
        target = tokenizer(
            sft_solution(ex, rng, marker_fraction) + tokenizer.eos_token, add_special_tokens=False
        ).input_ids
        out.append((prompt, target))
    return out


def collate(pairs, pad_id: int):
    """Right-padded batch; labels are -100 on prompt and padding, so the loss is on the
    completion (solution + <|im_end|>) only."""
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
    return ids, mask, labels


def reward(text: str, answer: str) -> float:
    """1 only if the marker occurs exactly once and the text after it is the answer."""
    return float(text.count(ANSWER_MARKER) == 1 and text.rsplit(ANSWER_MARKER, 1)[1].strip() == answer)


@torch.no_grad()
def accuracy(model, tokenizer, examples, batch_size=100, **gen_kwargs) -> float:
    """Mean reward over examples, generating with left padding as an RL rollout would."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [format_prompt(tokenizer, ex.question, system=None) for ex in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=48,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **gen_kwargs,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        hits += sum(reward(t, ex.answer) for t, ex in zip(texts, chunk))
    tokenizer.padding_side = "right"
    model.train()
    return hits / len(examples)


def benchmark(model, tokenizer) -> dict[str, float]:
    """Timings that size the RL loop: one forward+backward over 64x100 tokens, and a 40-token
    KV-cached greedy decode for a batch of 64 prompts (prefill included)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (64, 100), generator=g)
    prompts = [format_prompt(tokenizer, ex.question, system=None) for ex in synthetic_split("test", 64)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    times = {}
    for _ in range(2):  # first round warms up allocators and kernels
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times["fwd_bwd_64x100_s"] = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(
                **enc, do_sample=False, min_new_tokens=40, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id
            )
            times["decode_64x40_s"] = time.perf_counter() - t
    times["prompt_tokens"] = enc.input_ids.shape[1]
    return times


README = """# Tiny embedded model

A {params:,}-parameter Qwen2 causal LM (`Qwen2ForCausalLM`: hidden {hidden}, {layers} layers,
4 attention heads, 2 KV heads, tied embeddings, fp32 safetensors) with its own byte-level BPE
tokenizer ({vocab} tokens: every digit is its own token, optionally with its leading space;
special tokens `<|im_start|>`, `<|im_end|>` = eos, `<|endoftext|>` = pad; Qwen-style chat template).
It exists so that HRPO runs end to end on a CPU without any model hub:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("hrpo/assets/tiny")
model = AutoModelForCausalLM.from_pretrained("hrpo/assets/tiny")
```

## Task

Synthetic multi-step arithmetic word problems from `hrpo.tasks.synthetic` (2-4 steps of +, - and
x2/x3 on small non-negative integers), answered as `7 + 5 = 12. 12 - 3 = 9. #### 9`.
Prompts are `format_prompt(tokenizer, question, system=None)` (no system turn).

## Build

    python scripts/build_tiny_model.py --sft-steps {steps} --marker-fraction {marker_fraction}

trains the tokenizer on synthetic train problems, then runs {steps} steps of supervised
fine-tuning (batch {batch}, AdamW lr {lr}, loss on the completion tokens only) on fresh
synthetic train problems. Seeded and deterministic (same weights on reruns on the same
machine with the same thread count). Only {marker_pct:.0f}% of the SFT solutions end in the
answer marker (`#### 9`); the others end in prose (`The answer is 9.`). The model so
starts like an instruction-tuned model that has not learned the task's answer format: it
mostly answers in prose, which the reward scores 0, and its arithmetic is imperfect. RL has
to learn the format and sharpen the arithmetic; most of the early gain is the format.
Build time: {build_min:.1f} min on {threads} CPU threads (wall clock, so it grows when
other jobs share the machine).

## Accuracy

On {n_eval} held-out `synthetic_split("test", {n_eval})` problems (reward 1 iff `####` occurs
exactly once and the stripped text after it equals the answer), 48 new tokens at most:

| decoding | accuracy |
|---|---|
| greedy | {greedy:.1%} |
| sampling, temperature 0.5, top-k 50 | {sampled:.1%} |

## Speed ({threads} CPU threads, this build machine, wall clock: sensitive to machine load)

- forward + backward over 64 x 100 tokens: {fwd_bwd_64x100_s:.2f} s
- KV-cached greedy decode, batch 64, 40 new tokens after {prompt_tokens}-token prompts: {decode_64x40_s:.2f} s
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--marker-fraction",
        type=float,
        default=0.4,
        help="share of SFT solutions that end in '#### N' (the rest: 'The answer is N.')",
    )
    ap.add_argument("--threads", type=int, default=2, help="fixed, since it can change float sums")
    args = ap.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)

    # Tokenizer corpus: problems and solutions, plus the chat markup and default system prompt
    # so that those encode compactly too.
    corpus_rng = random.Random(10_000 + args.seed)
    corpus = [
        f"{ex.question}\n{sft_solution(ex, corpus_rng, args.marker_fraction)}"
        for ex in synthetic_split("train", 5000, seed=10_000 + args.seed)
    ]
    corpus += ["user\nassistant\nsystem\n" + SYSTEM_PROMPT] * 50
    tokenizer = build_tokenizer(corpus, args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)

    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    # Every SFT example is seen once; the eval set comes from the disjoint test split.
    train = encode_sft(
        tokenizer,
        synthetic_split("train", args.sft_steps * args.batch_size, seed=args.seed),
        args.marker_fraction,
        args.seed,
    )
    test = synthetic_split("test", args.eval_n, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.sft_steps // 10)
    # Linear warmup, then cosine decay to 10% of the peak learning rate.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(
            (s + 1) / warmup,
            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.sft_steps - warmup)))),
        ),
    )
    model.train()
    for step in range(args.sft_steps):
        ids, mask, labels = collate(
            train[step * args.batch_size : (step + 1) * args.batch_size], tokenizer.pad_token_id
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.sft_steps - 1:
            print(
                f"sft step {step + 1}/{args.sft_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )

    greedy = accuracy(model, tokenizer, test, do_sample=False)
    torch.manual_seed(args.seed)
    sampled = accuracy(model, tokenizer, test, do_sample=True, temperature=0.5, top_k=50)
    print(f"held-out accuracy: greedy {greedy:.1%}, sampled (T=0.5, top-k 50) {sampled:.1%}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # What others load must tokenize exactly as the model was trained.
    loaded = AutoTokenizer.from_pretrained(args.out)
    for ex in test[:20]:
        text = format_prompt(tokenizer, ex.question, system=None) + ex.meta["solution"] + tokenizer.eos_token
        assert loaded(text).input_ids == tokenizer(text).input_ids, "saved tokenizer differs"
    build_min = (time.perf_counter() - start) / 60
    times = benchmark(model, tokenizer)
    print(f"timings: {times}", flush=True)
    (args.out / "README.md").write_text(
        README.format(
            params=n_params,
            hidden=args.hidden,
            layers=args.layers,
            vocab=len(tokenizer),
            steps=args.sft_steps,
            batch=args.batch_size,
            marker_fraction=args.marker_fraction,
            marker_pct=100 * args.marker_fraction,
            lr=args.lr,
            build_min=build_min,
            threads=args.threads,
            n_eval=args.eval_n,
            greedy=greedy,
            sampled=sampled,
            **times,
        )
    )
    print(f"wrote {args.out} in {build_min:.1f} min (before the timing benchmark)", flush=True)


if __name__ == "__main__":
    main()
