"""The engine's GPU path (Triton / CUDA kernels, CUDA graphs), run by benchmarks/gpu_check.sh
on a lent GPU. On CPU these skip: test_engine.py covers the same code path without graphs."""

import pytest
import torch
from conftest import build_model
from test_engine import PROMPTS, WIDE_EOS, G, policy
from test_rollout_engine import assert_same

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's GPU path needs CUDA")


def gpu_policy(arch, tokenizer, dtype):
    return policy(build_model(arch, len(tokenizer))).to(device="cuda", dtype=dtype)


def engine_for(hm, tokenizer, **opts):
    return RolloutEngine(
        hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + WIDE_EOS, tokenizer.pad_token_id, EngineOptions(**opts)
    )


@pytest.mark.parametrize("hybrid", [True, False])
def test_graphs_replay_the_eager_step(arch, tokenizer, hybrid):
    """Captured and replayed steps give bit-identical rollouts to eager steps, compaction on."""
    hm = gpu_policy(arch, tokenizer, torch.bfloat16)
    hm.gate.float()
    prompts = [tokenizer.encode(p) for p in PROMPTS for _ in range(G)]
    sampling = SamplingConfig(40, 0.8, 20, hybrid=hybrid)
    graphed = engine_for(hm, tokenizer, compact_below=0.6, check_every=4)
    assert graphed.graphs, "CUDA graphs are off (did the extension build?)"
    eager = engine_for(hm, tokenizer, compact_below=0.6, check_every=4, cuda_graphs=False)
    a = graphed.generate(prompts, sampling, seed=3)
    b = eager.generate(prompts, sampling, seed=3)
    assert a.stats["graph_captures"] >= 1 and a.stats["compactions"] >= 1
    for name in ("completion_ids", "completion_mask", "think_mask", "logprobs", "latents"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    again = graphed.generate(prompts, sampling, seed=3)  # replays the cached graphs
    assert torch.equal(a.completion_ids, again.completion_ids) and again.stats["graph_captures"] == 0
    with torch.no_grad():  # an optimizer step on the gate: replays must see the new weights
        hm.gate.w_i.bias.add_(1.0)
        hm.gate.lam.sub_(1.0)
    a, b = graphed.generate(prompts, sampling, seed=3), eager.generate(prompts, sampling, seed=3)
    for name in ("completion_ids", "logprobs", "latents"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_engine_equals_reference_on_gpu(arch, tokenizer):
    """fp32 model: the engine (graphs, kernels) and the reference loop (HF forward, the same
    sampling kernel) draw the same tokens."""
    hm = gpu_policy(arch, tokenizer, torch.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS for _ in range(G)]
    sampling = SamplingConfig(40, 0.8, 20)
    eos = [tokenizer.eos_token_id] + WIDE_EOS
    ref = rollout(hm, prompts, sampling, MarkerMatcher(tokenizer), eos, tokenizer.pad_token_id, seed=5)
    out = engine_for(hm, tokenizer, latent_dtype=torch.float32, check_every=8).generate(prompts, sampling, seed=5)
    assert_same(ref, out)
