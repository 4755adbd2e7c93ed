"""Rollout throughput: `pytest benchmarks/test_rollout_bench.py --benchmark-only`.

Names are `{method}-{device}-{model}-b{batch}`; each entry's extra_info carries tokens_per_s
(new tokens / wall time of one rollout) and, on GPU, the bandwidth floor of the same run.
Methods: eager_reference (the original code's style: eager ops, full logits, a host-side
re-decode of every row each step), hf_generate (plain sampling through HF `generate`),
reference_loop (hrpo.engine.rollout), engine_plain and engine_hybrid (hrpo.engine.rollout_engine),
and on the CPU engine_{soft,moi,soft-noise,gumbel-soft}: the engine under each training-free
latent mode (docs/latent-modes.md), whose thinking inputs are the mode's mixture, and
engine_plain_top_p: engine_plain sampling the top_p 0.9 nucleus inside its top-k (the cost of
the cut, against engine_plain).

GPU: Qwen2.5-1.5B / 3B shapes (benchmarks/model_shapes.py) with random bf16 weights
(speed does not depend on their values), prompts of 256 random tokens in groups of 8,
NEW_TOKENS (512) new tokens with no early stop (no EOS, a marker that never appears, so
hybrid mode blends at every step: its worst case). The slow baselines run BASELINE_TOKENS
(128) new tokens to fit the device time; their per-token cost is overhead-bound, so
tokens/s at 128 is if anything kinder to them than at 512. The eager reference re-decodes
with the embedded tokenizer (ids folded into its vocabulary), a cheaper decode than
Qwen's. Floor: B new tokens per step over (weights + the KV cache at the run's mean
length, read once per step) / the device copy bandwidth measured in this run.

CPU: the embedded model, batches of distinct prompts x 8 (the arith recipe's rollout, ragged
prompts: hf_generate left-pads them), 64 new tokens, no early stop.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks.conftest import synced
from benchmarks.eager_reference import eager_rollout
from benchmarks.model_shapes import model_shape, random_causal_lm
from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import format_prompt
from hrpo.engine.rollout import SamplingConfig, left_pad, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import load_base_model
from hrpo.tasks.synthetic import synthetic_split
from hrpo_kernels.latent_input import MODES, LatentParams

GPU_MODELS = {"qwen2.5-1.5b": "Qwen2.5-1.5B-Instruct", "qwen2.5-3b": "Qwen2.5-3B-Instruct"}
if os.environ.get("HRPO_BENCH_MODELS"):  # e.g. qwen2.5-1.5b: one model per pytest call (gpu_check.sh)
    GPU_MODELS = {k: GPU_MODELS[k] for k in os.environ["HRPO_BENCH_MODELS"].split(",")}
NEW_TOKENS = int(os.environ.get("HRPO_BENCH_NEW_TOKENS", 512))
BASELINE_TOKENS = int(os.environ.get("HRPO_BENCH_BASELINE_TOKENS", 128))
PROMPT_LEN, GROUP = 256, 8
TEMPERATURE, TOP_K = 0.5, 50
TOP_P = 0.9  # engine_plain_top_p's nucleus
METHODS = ["eager_reference", "hf_generate", "engine_plain", "engine_hybrid"]
LATENT_METHODS = [f"engine_{mode}" for mode in MODES[1:]]  # the training-free modes


@functools.cache
def tiny_tokenizer():
    return load_base_model(None, torch.device("cpu"), torch.float32)[1]


@functools.cache
def never_marker(vocab: int) -> MarkerMatcher:
    """A matcher whose marker never completes: every position stays thinking."""
    matcher = MarkerMatcher(tiny_tokenizer(), "####", vocab)
    matcher.table[: matcher.found_state] = 0
    return matcher


class FoldedDecode:
    """The embedded tokenizer's decode on ids folded into its vocabulary: the per-step host
    work of the original code on a model whose tokenizer files are not available here."""

    def __init__(self, tokenizer, pad_id: int):
        self.tok, self.pad_token_id, self.n = tokenizer, pad_id, len(tokenizer)

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode([i % self.n for i in ids], skip_special_tokens=skip_special_tokens)


def _record(benchmark, method, device, model, batch, new_tokens, **extra):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        method=method,
        device=device,
        model=model,
        batch=batch,
        new_tokens=new_tokens,
        tokens_per_s=batch * new_tokens / seconds,
        **extra,
    )


def hf_generate(hm, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """A zero-argument callable: one rollout of `prompts` through HF `generate`, plain
    sampling at the benchmarks' temperature and top-k, exactly `new_tokens` new tokens."""
    ids, mask = left_pad(prompts, pad_id, hm.lm_weight.device)  # HF's convention for a ragged batch

    def run():
        return hm.causal_lm.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=TOP_K,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )

    return run


def _runner(method, hm, prompts, new_tokens, matcher, decoder_tok, pad_id, generator, engine=None):
    """A zero-argument callable that makes one rollout of `prompts` with `method`."""
    if method == "eager_reference":
        return lambda: eager_rollout(hm, decoder_tok, prompts, new_tokens, TEMPERATURE, TOP_K, generator=generator)
    if method == "hf_generate":
        return hf_generate(hm, prompts, new_tokens, pad_id)
    mode = method.removeprefix("engine_")
    cfg = SamplingConfig(
        new_tokens,
        TEMPERATURE,
        TOP_K,
        TOP_P if method == "engine_plain_top_p" else 1.0,
        hybrid=method not in ("engine_plain", "engine_plain_top_p"),
        latent=LatentParams(mode if mode in MODES else "hrpo"),
    )
    if method == "reference_loop":
        return lambda: rollout(hm, prompts, cfg, matcher, [], pad_id, generator)
    return lambda: engine.generate(prompts, cfg, generator)


# ---------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_base_model(None, torch.device("cpu"), torch.float32)
    hm = HybridModel(model).eval()
    return hm, tok


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize(
    "method",
    [
        "eager_reference",
        "hf_generate",
        "reference_loop",
        "engine_plain",
        "engine_plain_top_p",
        "engine_hybrid",
        *LATENT_METHODS,
    ],
)
def test_rollout_cpu(benchmark, tiny, method, batch):
    hm, tok = tiny
    new = 64
    questions = synthetic_split("test", batch // GROUP)  # a GRPO batch, as the arith recipe rolls out
    prompts = [tok(format_prompt(tok, ex.question, None))["input_ids"] for ex in questions for _ in range(GROUP)]
    matcher = never_marker(hm.lm_weight.shape[0])
    engine = RolloutEngine(hm, matcher, [], tok.pad_token_id) if method.startswith("engine") else None
    fn = _runner(method, hm, prompts, new, matcher, tok, tok.pad_token_id, torch.Generator().manual_seed(0), engine)
    benchmark.name = f"{method}-cpu-tiny-b{batch}"
    benchmark.pedantic(fn, rounds=9, warmup_rounds=2)  # a shared 2-core VM: a median of 9 is steadier than of 3
    _record(benchmark, method, "cpu", "tiny", batch, new)


# ---------------------------------------------------------------------------------- GPU
_MODELS: dict = {}


def gpu_model(name: str):
    """A random-weight bf16 model at the shapes of `name`, built once per session."""
    if name not in _MODELS:
        _MODELS.clear()  # one model on the card at a time
        torch.cuda.empty_cache()
        _MODELS[name] = HybridModel(random_causal_lm(model_shape(GPU_MODELS[name]), "cuda", torch.bfloat16))
    return _MODELS[name]


def floor_tokens_per_s(hm, batch: int, new_tokens: int, copy_gbps: float) -> float:
    cfg = hm.config
    weights = sum(p.numel() * p.element_size() for p in hm.causal_lm.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mean_len = PROMPT_LEN + new_tokens / 2
    kv = 2 * cfg.num_hidden_layers * batch * mean_len * cfg.num_key_value_heads * head_dim * 2
    return batch / ((weights + kv) / (copy_gbps * 1e9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU rollout benchmarks need CUDA")
@pytest.mark.parametrize("batch", [32, 128, 256])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", list(GPU_MODELS))
def test_rollout_gpu(benchmark, copy_gbps, model, method, batch):
    hm = gpu_model(model)
    V = hm.lm_weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in torch.randint(0, V, (batch // GROUP, PROMPT_LEN), generator=g).tolist() for _ in range(GROUP)]
    baseline = method in ("eager_reference", "hf_generate")
    new = BASELINE_TOKENS if baseline else NEW_TOKENS
    tok = tiny_tokenizer()
    matcher = never_marker(V)
    engine = RolloutEngine(hm, matcher, [], 0, EngineOptions()) if method.startswith("engine") else None
    fn = _runner(
        method,
        hm,
        prompts,
        new,
        matcher,
        FoldedDecode(tok, 0),
        0,
        torch.Generator(device="cuda").manual_seed(0),
        engine,
    )
    benchmark.name = f"{method}-cuda-{model}-b{batch}"
    benchmark.pedantic(synced(fn), rounds=1, warmup_rounds=0 if baseline else 1)
    floor = floor_tokens_per_s(hm, batch, new, copy_gbps)
    _record(
        benchmark,
        method,
        "cuda",
        model,
        batch,
        new,
        floor_tokens_per_s=floor,
        copy_GBps=copy_gbps,
        device_name=torch.cuda.get_device_name(),
    )
    benchmark.extra_info["fraction_of_floor"] = benchmark.extra_info["tokens_per_s"] / floor
    if engine is not None:
        benchmark.extra_info["engine_stats"] = engine.last_stats
