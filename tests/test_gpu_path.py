"""The GPU path end to end on the CPU (HRPO_GPU_PATH=cpu, hrpo_kernels/_common.py): a hybrid
rollout of the engine as it runs on CUDA (Triton kernels in the interpreter, the extension's
twins of its .cu kernels, the decode step captured into a stand-in graph and replayed, seeded
noise, host checks every check_every steps, prefix sharing, compaction) and one training
step on it (hrpo.training.update with the fused token_logprobs / gated_blend / lora_linear), checked
against the reference loop and the eager update, in fp32 and bf16, on the embedded model and
a random Llama. Spies on the launchers make sure the GPU branches ran."""

import importlib
import os

import pytest
import torch
from conftest import build_model, build_tokenizer

import hrpo.engine.rollout_engine
from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import format_prompt
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model.loading import build_policy, load_base_model
from hrpo.tasks.synthetic import synthetic_split
from hrpo.training.config import config_for
from hrpo.training.update import UpdateSettings, micro_batches, policy_backward, reference_logprobs
from hrpo_kernels._common import GPU_PATH_ENV, StandInGraph, gpu_path_mode, on_gpu_path, stream_capturing, use_fused
from hrpo_kernels._ext import ext_for, load_extension

TEMP = 0.8
LAUNCHERS = {  # module: the functions through which the GPU branches run
    "hrpo_kernels.sample_and_mix": ("sample_and_mix_triton",),
    "hrpo_kernels.decode_attention": ("decode_attention_triton",),
    "hrpo_kernels.gated_blend": ("gated_blend_triton",),
    "hrpo_kernels.token_logprobs": ("token_logprobs_triton",),
    "hrpo_kernels.lora_linear": ("_forward",),  # the op's path; HRPO_KERNELS=reference runs peft's math
}


def spy(monkeypatch) -> dict[str, int]:
    """Counts of calls of every launcher and of the extension's step_controller and
    topk_sample_mix (the C++ twins the CUDA branch's .cu kernels run as on the CPU)."""
    counts: dict[str, int] = {}

    def wrap(owner, name):
        inner = getattr(owner, name)
        counts[name] = 0

        def counted(*a, **k):
            counts[name] += 1
            return inner(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    for module, names in LAUNCHERS.items():
        for name in names:
            wrap(importlib.import_module(module), name)
    ext = load_extension()
    assert ext is not None, "the C++ extension must build here"
    for name in ("step_controller", "topk_sample_mix", "decode_body_cpu"):
        wrap(ext, name)
    wrap(StandInGraph, "replay")
    return counts


def setup(which: str, dtype: torch.dtype):
    """(policy, tokenizer, prompts: 2 prompts x 2 rows, eos ids). LoRA adapters at init (B = 0)
    and a gate moved off its init so that blending matters (a ~ 0.5-0.9, not ~1)."""
    if which == "embedded":
        model, tok = load_base_model(None, torch.device("cpu"), torch.float32)
        # problems whose first steps are "19 - 11 = 8." and "19 + 8 = 27.": with " -" ending a
        # row too, one group ends after 3 tokens and the other after 10 (compaction acts)
        texts = [format_prompt(tok, ex.question, system=None) for ex in synthetic_split("train", 4, seed=1)[2:]]
        eos = [tok.eos_token_id] + tok.encode(".") + tok.encode(" -")
    else:
        tok = build_tokenizer()
        model = build_model("llama", len(tok))
        texts = ["Tom has 12 apples", "x"]
        eos = [tok.eos_token_id] + list(range(100, 220))
    torch.manual_seed(0)
    hm = build_policy(model, config_for("arith", lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        hm.gate.lam.uniform_(1.0, 3.0)
        hm.gate.w_r.bias.uniform_(-0.5, 0.5)
        hm.gate.w_i.bias.uniform_(0.0, 2.0)
    if dtype != torch.float32:
        hm.to(dtype)
        hm.gate.float()  # the gate trains in fp32 whatever the model's dtype
    prompts = [tok.encode(t) for t in texts for _ in range(2)]
    return hm, tok, prompts, eos


def update(hm, batch, max_completion_length):
    """One training step's gradients (the gate's and LoRA's) on a rollout, two micro-batches."""
    s = UpdateSettings(
        temperature=TEMP,
        hybrid=True,
        beta=0.04,
        epsilon=0.2,
        loss_norm="grpo",
        max_completion_length=max_completion_length,
        micro_batch_tokens=1,
    )  # one group each
    plan = micro_batches(batch, s.micro_batch_tokens)
    assert len(plan) == 2
    ref = reference_logprobs(hm, batch, plan, s)
    hm.zero_grad(set_to_none=True)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    loss, _, finite = policy_backward(hm, batch, plan, adv, ref, batch.logprobs, s)
    assert finite
    grads = {n: p.grad.float().clone() for n, p in hm.named_parameters() if p.grad is not None}
    hm.zero_grad(set_to_none=True)
    return ref, grads


def eager_update(hm, batch, max_completion_length, monkeypatch, calls):
    """update() with every op on its reference (HRPO_KERNELS=reference, the mode off): no
    launcher may run (calls: the spies' counts)."""
    before = dict(calls)
    monkeypatch.setenv("HRPO_KERNELS", "reference")
    try:
        return update(hm, batch, max_completion_length)
    finally:
        monkeypatch.delenv("HRPO_KERNELS")
        assert calls == before, "the eager update ran a fused op"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["embedded", "llama"])
def test_rollout_and_update_on_the_gpu_path(which, dtype, monkeypatch):
    hm, tok, prompts, eos = setup(which, dtype)
    fp32 = dtype == torch.float32
    sampling = SamplingConfig(max_new_tokens=12, temperature=TEMP, top_k=20, hybrid=True)
    matcher = MarkerMatcher(tok)
    latent = torch.float32 if fp32 else torch.bfloat16
    opts = EngineOptions(share_prefix=True, compact_below=0.9, check_every=3, latent_dtype=latent)
    calls = spy(monkeypatch)
    with gpu_path_mode():
        engine = RolloutEngine(hm, matcher, eos, tok.pad_token_id, opts)
        out = engine.generate(prompts, sampling, seed=11)
    st = out.stats
    # It ran as on CUDA: the graph bookkeeping, the kernels, no C++ decoder body.
    assert engine.graphs and engine.check_every == 3 and engine.dec.ext is None
    assert st["graph_captures"] >= 2 and st["compactions"] >= 1  # one graph per batch size
    assert calls["replay"] == st["steps"] - st["graph_captures"]  # each capture follows an eager step
    assert st["host_checks"] == -(-st["steps"] // 3)
    assert calls["decode_attention_triton"] == hm.config.num_hidden_layers * st["steps"]
    assert calls["sample_and_mix_triton"] == calls["topk_sample_mix"] == calls["step_controller"] == st["steps"]
    assert calls["gated_blend_triton"] == st["steps"] and calls["decode_body_cpu"] == 0
    assert out.think_mask.any() and out.lengths.min() < out.lengths.max()
    m = out.completion_mask

    if fp32:
        # The reference loop (HF forward, torch sampling) draws the same tokens under the seed;
        # log-probs and latents differ by fp32 rounding of sums taken in another order.
        ref = rollout(hm, prompts, sampling, matcher, eos, tok.pad_token_id, seed=11, latent_dtype=torch.float32)
        for name in ("completion_ids", "completion_mask", "think_mask"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), name
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=5e-5, rtol=0)
        torch.testing.assert_close(out.latents, ref.latents, atol=1e-4, rtol=1e-4)

    # The training forward on the rollout (what RL needs the rollout's log-probs to equal). In
    # bf16 the two forwards round activations in different orders (one token at a time in the
    # Triton attention, the whole sequence in HF's); the gap must stay under half a bf16 ulp
    # of a logit of 8 (0.0625 / 2; these models' largest logits / T are 8-16), a tenth of that
    # on average. fp32: rounding of sums in another order.
    with gpu_path_mode(), torch.no_grad():
        train_lp = hm.sequence_logprobs(out, TEMP, hybrid=True)
    gap = (train_lp - out.logprobs)[m].abs()
    print(f"{which} {dtype}: rollout vs training log-probs max {gap.max():.2e} mean {gap.mean():.2e}")
    assert (gap.max() < 5e-5) if fp32 else (gap.max() < 3e-2 and gap.mean() < 3e-3)

    # One training step through the GPU path against the eager update (HRPO_KERNELS=reference).
    with torch.no_grad():  # non-zero adapters for the update, so A gets a gradient too
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = dict(calls)
    with gpu_path_mode():
        ref_fused, g_fused = update(hm, out, sampling.max_new_tokens)
    for name in ("token_logprobs_triton", "gated_blend_triton", "_forward"):
        assert calls[name] > before[name], name
    ref_eager, g_eager = eager_update(hm, out, sampling.max_new_tokens, monkeypatch, calls)
    lora = [n for n in g_eager if "lora_" in n]
    gate = ["gate.w_r.weight", "gate.w_r.bias", "gate.w_i.weight", "gate.w_i.bias", "gate.lam"]
    assert g_fused.keys() == g_eager.keys() and set(gate) <= g_eager.keys() and len(lora) > 0
    errs = {n: rel_err(g_fused[n], g_eager[n]) for n in gate + lora}
    worst = max(errs, key=errs.get)
    print(f"{which} {dtype}: worst gradient {worst} relative error {errs[worst]:.2e}")
    if fp32:  # the same sums in another order
        assert errs[worst] < 1e-4, worst
        torch.testing.assert_close(ref_fused[m], ref_eager[m], atol=5e-5, rtol=0)
        return
    # bf16: each update is a few percent off the exact gradient of these bf16 weights (the
    # same step in fp32 on them: the eager bf16 update's own error reaches ~16% on single
    # tensors). So the fused update must agree with the eager one to within that spread,
    # and be no farther from the exact gradient than the eager one, over all tensors.
    hm.float()
    _, g_exact = eager_update(hm, out, sampling.max_new_tokens, monkeypatch, calls)
    fused_off = sum(rel_err(g_fused[n], g_exact[n]) for n in errs) / len(errs)
    eager_off = sum(rel_err(g_eager[n], g_exact[n]) for n in errs) / len(errs)
    print(f"{which} bf16: mean relative distance to the fp32 gradient: fused {fused_off:.2e}, eager {eager_off:.2e}")
    assert errs[worst] < 0.15 and fused_off < 2 * eager_off, (worst, errs[worst])
    torch.testing.assert_close(ref_fused[m], ref_eager[m], atol=0.1, rtol=0)


def test_mode_switch_and_bad_values(tokenizer, monkeypatch):
    hm = build_policy(build_model("llama", len(tokenizer)), config_for("arith", lora_rank=4, lora_alpha=8))
    args = (hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    cpu = RolloutEngine(*args)
    with gpu_path_mode():
        gpu = RolloutEngine(*args)
    # as on CUDA: graphs, a host check every 16 steps, the torch decoder body (its kernels)
    assert (gpu.graphs, gpu.check_every, gpu.dec.ext, gpu.impl) == (True, 16, None, None)
    assert (cpu.graphs, cpu.check_every, cpu.impl) == (False, 1, "ext") and cpu.dec.ext is not None
    # without the extension the step controller syncs: no graphs, a host check every step
    monkeypatch.setattr(hrpo.engine.rollout_engine, "load_extension", lambda: None)
    monkeypatch.setenv(GPU_PATH_ENV, "0")
    with gpu_path_mode(), pytest.warns(UserWarning, match="the CUDA extension did not load"):
        bare = RolloutEngine(*args)
    assert (bare.graphs, bare.check_every) == (False, 1) and os.environ[GPU_PATH_ENV] == "0"
    x = torch.zeros(2)
    assert not on_gpu_path(x) and not use_fused(x) and ext_for(x, None) is None
    with gpu_path_mode():
        assert on_gpu_path(x, torch.device("cpu")) and use_fused(x) and ext_for(x, None) is load_extension()
        monkeypatch.setenv("HRPO_KERNELS", "reference")
        assert not use_fused(x) and ext_for(x, None) is None
        monkeypatch.delenv("HRPO_KERNELS")
    assert not on_gpu_path(x)
    monkeypatch.setenv(GPU_PATH_ENV, "gpu")
    with pytest.raises(ValueError, match="HRPO_GPU_PATH='gpu': the only mode is 'cpu'"):
        use_fused(x)
    monkeypatch.setenv(GPU_PATH_ENV, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_fused(x)


def test_stand_in_graph_replays_as_captured_and_rejects_a_host_sync():
    t = torch.arange(4)
    seen = []
    graph = StandInGraph(lambda: seen.append(stream_capturing(t.add_(1))))
    assert torch.equal(t, torch.arange(4)) and not seen  # capture records, it does not run
    graph.replay()
    graph.replay()
    assert torch.equal(t, torch.arange(4) + 2) and seen == [True, True]  # ops see a capture
    assert not stream_capturing(t)
    for sync in (lambda: int(t.sum()), lambda: t.nonzero(), lambda: bool(t.any())):
        with pytest.raises(RuntimeError, match="syncs with the host"):
            StandInGraph(sync).replay()
