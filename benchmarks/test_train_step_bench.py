"""The update half of a training step, and the whole step: `pytest benchmarks/test_train_step_bench.py --benchmark-only`.

Update entries `update-{method}-{device}-{model}-{recipe}`: the reference pass plus the
policy's forward and backward over one rollout, for
- eager: the common trainers' way (HF's forward with its LoRA layers and full logits,
  log_softmax, gather; every completion carrying its own copy of the prompt), and
- hrpo: hrpo.update (token-sized micro-batches, each prompt once per group, no logits kept for
  the backward, hrpo_kernels.lora_linear),
with the same loss, gate and adapters. extra_info: seconds, tokens/s (prompt + completion
tokens of the rollout), and on CUDA the peak memory above the resident weights.

GPU: Qwen2.5-1.5B / 3B shapes (../shared/model_shapes.json), random bf16 weights, LoRA r32 on
all projections, 256 prompt + 512 completion tokens with every position thinking: the GSM8K
recipe's 8 completions (2 prompts x 4) and the MATH recipe's 16 (2 x 8).
CPU: the embedded model with a real rollout of the arith recipe (4 prompts x 8, up to 64 new
tokens).

Whole-step entries `step-{method}-cpu-tiny-arith` (seconds per optimizer step in extra_info):
hrpo_hybrid and hrpo_grpo (hrpo's trainer: rollout, reward, reference pass, update) and, when
`trl` is installed, trl_grpo: TRL's GRPOTrainer on the same model, task and recipe.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from benchmarks.eager_reference import eager_update, peft_lora_forward
from hrpo.config import config_for
from hrpo.loading import build_policy
from hrpo.loss import group_advantages
from hrpo.model import SequenceBatch
from hrpo.update import UpdateSettings, micro_batches, policy_backward, reference_logprobs

SHAPES = Path(__file__).resolve().parents[2] / "shared" / "model_shapes.json"
GPU_MODELS = {"qwen2.5-1.5b": "Qwen2.5-1.5B-Instruct", "qwen2.5-3b": "Qwen2.5-3B-Instruct"}
GPU_RECIPES = {"gsm8k": (2, 4), "math": (2, 8)}  # prompts x group size
PROMPT_LEN, COMPLETION_LEN, TEMPERATURE, BETA = 256, 512, 0.5, 0.005


def hrpo_update(hm, batch: SequenceBatch, adv: torch.Tensor, max_completion_length: int):
    s = UpdateSettings(TEMPERATURE, True, BETA, 0.2, "grpo", max_completion_length, max_tokens=16384)

    def run():
        plan = micro_batches(batch, s.max_tokens)
        ref = reference_logprobs(hm, batch, plan, s)
        policy_backward(hm, batch, plan, adv, ref, None, s)
        hm.zero_grad(set_to_none=True)

    return run


def eager_runner(hm, batch, adv):
    def run():
        with peft_lora_forward(hm):
            eager_update(hm, batch, adv, TEMPERATURE, BETA).backward()
        hm.zero_grad(set_to_none=True)

    return run


def tokens_of(batch: SequenceBatch) -> int:
    return int(batch.prompt_mask.sum() + batch.completion_mask.sum())


def record(benchmark, method, device, model, recipe, batch, seconds=None, **extra):
    seconds = seconds or benchmark.stats.stats.median
    benchmark.extra_info.update(method=method, device=device, model=model, recipe=recipe, seconds=seconds,
                                tokens=tokens_of(batch), tokens_per_s=tokens_of(batch) / seconds, **extra)


# ---------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def tiny_rollout(tmp_path_factory):
    from hrpo.train import Trainer

    cfg = config_for("arith", output_dir=str(tmp_path_factory.mktemp("bench") / "run"), eval_limit=8)
    t = Trainer(cfg, None, progress=False)
    idx = t.order[:4]
    prompts = [t.train_prompts[i] for i in idx for _ in range(cfg.group_size)]
    out = t.engine.generate(prompts, t.sampling, seed=0)
    adv = group_advantages(torch.randn(len(prompts), generator=torch.Generator().manual_seed(0)), cfg.group_size)
    return t.hm.train(), out, adv, cfg.max_completion_length


@pytest.mark.parametrize("method", ["eager", "hrpo"])
def test_update_cpu(benchmark, tiny_rollout, method):
    hm, out, adv, max_len = tiny_rollout
    fn = eager_runner(hm, out, adv) if method == "eager" else hrpo_update(hm, out, adv, max_len)
    benchmark.name = f"update-{method}-cpu-tiny-arith"
    benchmark.pedantic(fn, rounds=9, warmup_rounds=2)  # a shared 2-core VM: the median of 9
    record(benchmark, method, "cpu", "tiny", "arith", out)


@pytest.mark.parametrize("method", ["hrpo_hybrid", "hrpo_grpo", "trl_grpo"])
def test_step_cpu(benchmark, tmp_path, method):
    """Seconds per optimizer step of the arith recipe (32 completions, 4 prompts x 8, 64 new tokens)."""
    if method == "trl_grpo":
        pytest.importorskip("trl", reason="trl is not a dependency; pip install trl to measure it")
        from benchmarks.trl_peer import trl_step_seconds

        seconds = trl_step_seconds(steps=6, workdir=tmp_path)
        benchmark.name = f"step-{method}-cpu-tiny-arith"
        benchmark.pedantic(lambda: None, rounds=1)
        benchmark.extra_info.update(method=method, seconds_per_step=seconds)
        return
    from hrpo.train import Trainer

    cfg = config_for("arith", output_dir=str(tmp_path / "run"), eval_limit=8, hybrid=method == "hrpo_hybrid")
    t = Trainer(cfg, None, progress=False)
    steps = iter(range(10**6))
    benchmark.name = f"step-{method}-cpu-tiny-arith"
    benchmark.pedantic(lambda: t.device_step(next(steps)), rounds=9, warmup_rounds=2)
    benchmark.extra_info.update(method=method, seconds_per_step=benchmark.stats.stats.median)


# ---------------------------------------------------------------------------------- GPU
def gpu_policy(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.cuda.empty_cache()
    entry = json.loads(SHAPES.read_text())[GPU_MODELS[name]]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**entry), dtype=torch.bfloat16)
    hm = build_policy(model, config_for("gsm8k"))  # LoRA r32, alpha 64 on every projection; fp32 gate
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)  # trained adapters: the adapter path is not all zeros
    return hm.train()


def gpu_rollout(hm, prompts: int, group: int) -> tuple[SequenceBatch, torch.Tensor]:
    V, d = hm.embed.weight.shape
    B, dev = prompts * group, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    prompt_ids = torch.randint(0, V, (prompts, PROMPT_LEN), device=dev, generator=g).repeat_interleave(group, 0)
    batch = SequenceBatch(
        prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids, dtype=torch.bool),
        completion_ids=torch.randint(0, V, (B, COMPLETION_LEN), device=dev, generator=g),
        completion_mask=torch.ones(B, COMPLETION_LEN, dtype=torch.bool, device=dev),
        latents=torch.randn(B, COMPLETION_LEN, d, device=dev, generator=g).to(torch.bfloat16),
        think_mask=torch.ones(B, COMPLETION_LEN, dtype=torch.bool, device=dev),
    )
    adv = group_advantages(torch.randn(B, device=dev, generator=g), group)
    return batch, adv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU training-step benchmarks need CUDA")
@pytest.mark.parametrize("recipe", list(GPU_RECIPES))
@pytest.mark.parametrize("method", ["eager", "hrpo"])
@pytest.mark.parametrize("model", list(GPU_MODELS))
def test_update_gpu(benchmark, model, method, recipe):
    hm = gpu_policy(model)
    batch, adv = gpu_rollout(hm, *GPU_RECIPES[recipe])
    fn = eager_runner(hm, batch, adv) if method == "eager" else hrpo_update(hm, batch, adv, COMPLETION_LEN)
    fn()  # warm-up: kernels compiled and autotuned, the allocator's pools filled
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    benchmark.name = f"update-{method}-cuda-{model}-{recipe}"
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, method, "cuda", model, recipe, batch, seconds=seconds, peak_gb=peak / 2**30,
           peak_above_weights_gb=(peak - resident) / 2**30, device_name=torch.cuda.get_device_name())
    del hm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU training-step benchmarks need CUDA")
@pytest.mark.parametrize("method", ["official", "hrpo"])
def test_step_gpu(benchmark, method):
    """The whole step of the GSM8K recipe at Qwen2.5-1.5B shapes (2 prompts x 4 completions of
    256 + 512 tokens): rollout plus update. official: the original code's rollout
    (benchmarks/eager_reference.py, timed at the rollout benchmark's BASELINE_TOKENS new tokens
    and scaled per token to 512: its per-step cost does not fall with length) plus the eager
    update; hrpo: the engine's 512-token rollout plus hrpo.update. The goal is 5x."""
    from benchmarks.eager_reference import eager_rollout
    from benchmarks.test_rollout_bench import BASELINE_TOKENS, FoldedDecode, never_marker, tiny_tokenizer
    from hrpo.engine import EngineOptions, RolloutEngine
    from hrpo.rollout import SamplingConfig

    hm = gpu_policy("qwen2.5-1.5b")
    batch, adv = gpu_rollout(hm, 2, 4)
    prompts = batch.prompt_ids.tolist()
    matcher = never_marker(hm.lm_weight.shape[0])
    if method == "official":
        new = BASELINE_TOKENS
        rollout = lambda: eager_rollout(hm.eval(), FoldedDecode(tiny_tokenizer(), 0), prompts, new, TEMPERATURE, 50,
                                        generator=torch.Generator(device="cuda").manual_seed(0))  # noqa: E731
        update = eager_runner(hm.train(), batch, adv)
    else:
        new = COMPLETION_LEN
        engine = RolloutEngine(hm, matcher, [], 0, EngineOptions())
        cfg = SamplingConfig(new, TEMPERATURE, 50)
        rollout = lambda: engine.generate(prompts, cfg, seed=0)  # noqa: E731
        update = hrpo_update(hm.train(), batch, adv, COMPLETION_LEN)
    timings = []
    for part in (rollout, update):
        part()  # warm-up (compilation, graph capture, autotuning)
        torch.cuda.synchronize()
        start = time.perf_counter()
        part()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    rollout_s = timings[0] * COMPLETION_LEN / new
    benchmark.name = f"step-{method}-cuda-qwen2.5-1.5b-gsm8k"
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(method=method, device="cuda", rollout_s=rollout_s, update_s=timings[1],
                                seconds_per_step=rollout_s + timings[1], measured_new_tokens=new)
