"""The update half of a training step, and the whole step:
`pytest benchmarks/test_train_step_bench.py --benchmark-only`.

Update entries `update-{method}-{device}-{model}-{recipe}`: the reference pass plus the
policy's forward and backward over one rollout, for
- eager: the common trainers' way (HF's forward with its LoRA layers and full logits,
  log_softmax, gather; every completion carrying its own copy of the prompt), and
- hrpo: hrpo.training.update (token-sized micro-batches, each prompt once per group, no logits kept for
  the backward, hrpo_kernels.lora_linear),
with the same loss, gate and adapters. extra_info: seconds, tokens/s (prompt + completion
tokens of the rollout), and on CUDA the peak memory above the resident weights.

GPU: Qwen2.5-1.5B / 3B shapes (benchmarks/model_shapes.py), random bf16 weights, LoRA r32 on
all projections, 256 prompt + 512 completion tokens with every position thinking: the GSM8K
recipe's 8 completions (2 prompts x 4) and the MATH recipe's 16 (2 x 8).
CPU: the embedded model with a real rollout of the arith recipe (4 prompts x 8, up to 64 new
tokens).

Whole-step entries `step-{method}-cpu-tiny-arith` (seconds per optimizer step in extra_info):
hrpo_hybrid and hrpo_grpo (hrpo's trainer: rollout, reward, reference pass, update) and, when
`trl` is installed, trl_grpo: TRL's GRPOTrainer on the same model, task and recipe.

Whole-step entries `step-{eager_baseline,hrpo}-{device}-{model}-...` (whole_step): a rollout
for the full completion length then the update, both run for real and timed as one round
(rollout_s, update_s, seconds_per_step). eager_baseline is this repository's eager
re-implementation of the original code's loop (benchmarks/eager_reference.py) plus the eager
update; hrpo is the engine plus hrpo.training.update. On CUDA at Qwen2.5-1.5B shapes, the GSM8K
recipe; on the CPU the embedded model stands in, so the same logic runs without a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.conftest import synced
from benchmarks.eager_reference import eager_rollout, eager_update
from benchmarks.model_shapes import model_shape, random_causal_lm
from benchmarks.test_rollout_bench import TOP_K, FoldedDecode, never_marker, tiny_tokenizer
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model import lora
from hrpo.model.hybrid import SequenceBatch
from hrpo.model.loading import build_policy, load_base_model
from hrpo.training.config import config_for
from hrpo.training.loss import group_advantages
from hrpo.training.update import UpdateSettings, micro_batches, policy_backward, reference_logprobs

GPU_MODELS = {"qwen2.5-1.5b": "Qwen2.5-1.5B-Instruct", "qwen2.5-3b": "Qwen2.5-3B-Instruct"}
GPU_RECIPES = {"gsm8k": (2, 4), "math": (2, 8)}  # prompts x group size
PROMPT_LEN, COMPLETION_LEN, TEMPERATURE, BETA = 256, 512, 0.5, 0.005


def hrpo_update(hm, batch: SequenceBatch, adv: torch.Tensor, max_completion_length: int):
    s = UpdateSettings(TEMPERATURE, True, BETA, 0.2, "grpo", max_completion_length, micro_batch_tokens=16384)

    def run():
        plan = micro_batches(batch, s.micro_batch_tokens)
        ref = reference_logprobs(hm, batch, plan, s)
        policy_backward(hm, batch, plan, adv, ref, None, s)
        hm.zero_grad(set_to_none=True)

    return run


def eager_runner(hm, batch, adv):
    def run():
        with lora.peft_forward(hm.model):
            eager_update(hm, batch, adv, TEMPERATURE, BETA).backward()
        hm.zero_grad(set_to_none=True)

    return run


def tokens_of(batch: SequenceBatch) -> int:
    return int(batch.prompt_mask.sum() + batch.completion_mask.sum())


def record(benchmark, method, device, model, recipe, batch, seconds=None, **extra):
    seconds = seconds or benchmark.stats.stats.median
    benchmark.extra_info.update(
        method=method,
        device=device,
        model=model,
        recipe=recipe,
        seconds=seconds,
        tokens=tokens_of(batch),
        tokens_per_s=tokens_of(batch) / seconds,
        **extra,
    )


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

        benchmark.name = f"step-{method}-cpu-tiny-arith"
        # The round is TRL's whole run (setup and 6 steps); its per-step median is TRL's own clock.
        seconds = benchmark.pedantic(trl_step_seconds, kwargs={"steps": 6, "workdir": tmp_path}, rounds=1)
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
    torch.cuda.empty_cache()
    model = random_causal_lm(model_shape(GPU_MODELS[name]), "cuda", torch.bfloat16)
    hm = build_policy(model, config_for("gsm8k"))  # LoRA r32, alpha 64 on every projection; fp32 gate
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)  # trained adapters: the adapter path is not all zeros
    return hm.train()


def random_rollout(
    hm, prompts: int, group: int, prompt_len: int = PROMPT_LEN, completion_len: int = COMPLETION_LEN
) -> tuple[SequenceBatch, torch.Tensor]:
    """A rollout's batch of random tokens on hm's device, every position thinking."""
    V, d = hm.embed.weight.shape
    B, dev = prompts * group, hm.lm_weight.device
    g = torch.Generator(device=dev).manual_seed(0)
    prompt_ids = torch.randint(0, V, (prompts, prompt_len), device=dev, generator=g).repeat_interleave(group, 0)
    batch = SequenceBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids, dtype=torch.bool),
        completion_ids=torch.randint(0, V, (B, completion_len), device=dev, generator=g),
        completion_mask=torch.ones(B, completion_len, dtype=torch.bool, device=dev),
        latents=torch.randn(B, completion_len, d, device=dev, generator=g).to(hm.embed.weight.dtype),
        think_mask=torch.ones(B, completion_len, dtype=torch.bool, device=dev),
    )
    adv = group_advantages(torch.randn(B, device=dev, generator=g), group)
    return batch, adv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU training-step benchmarks need CUDA")
@pytest.mark.parametrize("recipe", list(GPU_RECIPES))
@pytest.mark.parametrize("method", ["eager", "hrpo"])
@pytest.mark.parametrize("model", list(GPU_MODELS))
def test_update_gpu(benchmark, model, method, recipe):
    hm = gpu_policy(model)
    batch, adv = random_rollout(hm, *GPU_RECIPES[recipe])
    fn = eager_runner(hm, batch, adv) if method == "eager" else hrpo_update(hm, batch, adv, COMPLETION_LEN)
    fn()  # warm-up: kernels compiled and autotuned, the allocator's pools filled
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    benchmark.name = f"update-{method}-cuda-{model}-{recipe}"
    benchmark.pedantic(synced(fn), rounds=1)
    peak = torch.cuda.max_memory_allocated()
    record(
        benchmark,
        method,
        "cuda",
        model,
        recipe,
        batch,
        peak_gb=peak / 2**30,
        peak_above_weights_gb=(peak - resident) / 2**30,
        device_name=torch.cuda.get_device_name(),
    )
    del hm


def step_rollout(method: str, hm, prompts: list[list[int]], tokenizer=None, pad_id: int = 0):
    """rollout(new_tokens) of one whole step. eager_baseline: the eager loop of
    benchmarks/eager_reference.py (HF forward with its cache, full logits, a host-side re-decode
    of every row each step with `tokenizer`; without one, the embedded tokenizer's decode on
    folded ids); hrpo: the engine. Both blend at every position (the marker never completes)
    and never stop early."""
    if method == "eager_baseline":
        decoder = tokenizer or FoldedDecode(tiny_tokenizer(), pad_id)
        gen = torch.Generator(device=hm.lm_weight.device).manual_seed(0)
        return lambda new: eager_rollout(hm, decoder, prompts, new, TEMPERATURE, TOP_K, generator=gen)
    engine = RolloutEngine(hm, never_marker(hm.lm_weight.shape[0]), [], pad_id, EngineOptions())
    return lambda new: engine.generate(prompts, SamplingConfig(new, TEMPERATURE, TOP_K), seed=0)


def whole_step(benchmark, method: str, hm, batch: SequenceBatch, adv: torch.Tensor, rollout=None) -> dict:
    """Time one whole step, `rollout(new_tokens)` for the batch's full completion length then
    the update, as the benchmark's one round; returns each part's seconds. rollout: by default
    step_rollout of the batch's prompts (random ids: no tokenizer reads them). Warm-up
    beforehand: hrpo's full step (its kernels compile, its graphs are captured for this
    length); the eager baseline's update and an 8-token rollout (eager ops compile nothing: the
    first steps only set up the BLAS handles and the allocator, and its every step is alike)."""
    new = batch.completion_ids.shape[1]
    rollout = rollout or step_rollout(method, hm, batch.prompt_ids.tolist())
    update = eager_runner(hm, batch, adv) if method == "eager_baseline" else hrpo_update(hm, batch, adv, new)
    sync = torch.cuda.synchronize if hm.lm_weight.is_cuda else (lambda: None)
    parts: dict[str, float] = {}

    def step(rollout_tokens: int = new):
        for name, mode, run in (
            ("rollout_s", hm.eval, lambda: rollout(rollout_tokens)),
            ("update_s", hm.train, update),
        ):
            mode()
            start = time.perf_counter()
            run()
            sync()
            parts[name] = time.perf_counter() - start

    step(new if method == "hrpo" else 8)
    benchmark.pedantic(step, rounds=1)
    return parts


@pytest.mark.parametrize("method", ["eager_baseline", "hrpo"])
def test_step_vs_eager_cpu(benchmark, method):
    """whole_step on the CPU with the embedded model standing in for the GPU's: 2 prompts x 4
    completions of 32 + 24 random tokens."""
    torch.manual_seed(0)
    hm = build_policy(load_base_model(None, torch.device("cpu"), torch.float32)[0], config_for("arith"))
    batch, adv = random_rollout(hm, 2, 4, 32, 24)
    parts = whole_step(benchmark, method, hm, batch, adv)
    benchmark.name = f"step-{method}-cpu-tiny-random"
    benchmark.extra_info.update(
        method=method, device="cpu", model="tiny", **parts, seconds_per_step=benchmark.stats.stats.median, new_tokens=24
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU training-step benchmarks need CUDA")
@pytest.mark.parametrize("method", ["eager_baseline", "hrpo"])
def test_step_gpu(benchmark, method):
    """The whole step of the GSM8K recipe at Qwen2.5-1.5B shapes (2 prompts x 4 completions of
    256 + 512 tokens), both sides run for real: eager_baseline, the eager rollout loop for all
    512 tokens then the eager update; hrpo, the engine's rollout then hrpo.training.update. The goal is 5x."""
    hm = gpu_policy("qwen2.5-1.5b")
    batch, adv = random_rollout(hm, 2, 4)
    parts = whole_step(benchmark, method, hm, batch, adv)
    benchmark.name = f"step-{method}-cuda-qwen2.5-1.5b-gsm8k"
    benchmark.extra_info.update(
        method=method,
        device="cuda",
        model="qwen2.5-1.5b",
        **parts,
        seconds_per_step=benchmark.stats.stats.median,
        new_tokens=COMPLETION_LEN,
        device_name=torch.cuda.get_device_name(),
    )
