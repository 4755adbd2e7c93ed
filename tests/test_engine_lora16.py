"""In bf16 the engine samples the policy being trained: it applies LoRA adapters the way the
training forward does (hrpo_kernels.lora_linear's 16-bit forward: the base GEMM, then the
low-rank product added to its rounded output), not merged into a bf16 weight.

The adapters are the size a few optimizer steps at the recipes' lr 5e-6 leave (B ~ N(0, 2e-5),
A as peft initialises it). A merge rounds most such deltas away (weights of 0.02 have a bf16
spacing of 1.2e-4). Their effect on log-probs is about bf16's own forward noise, so the checks
that tell the two apart compare computations made of the same ops: each packed projection at
decode and prefill shapes, and the log-prob of each rollout's first token (from the prefill
alone), both exactly; the decode steps, whose attention rounds differently from the training
forward's, are held to the bf16 noise level.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_model
from peft import LoraConfig, get_peft_model
from test_distributed import free_port

import hrpo.model.hybrid
from hrpo.core.marker import MarkerMatcher
from hrpo.engine.fast_decoder import FastDecoder
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model.hybrid import HybridModel, positions_from_mask
from hrpo.model.loading import load_base_model
from hrpo_kernels import _common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B_STD = 2e-5  # lora_B after a few AdamW steps at lr 5e-6 (each step moves an entry by about lr)
PROJ = {
    "qkv": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "o": ("self_attn", ["o_proj"]),
    "gate_up": ("mlp", ["gate_proj", "up_proj"]),
    "down": ("mlp", ["down_proj"]),
}


def bf16_policy(which: str, tokenizer) -> tuple[HybridModel, object]:
    """(policy in bf16 with early-training adapters on every projection, its tokenizer)."""
    if which == "embedded":
        model, tokenizer = load_base_model(None, torch.device("cpu"), torch.bfloat16)
    else:
        model = build_model("llama", len(tokenizer)).to(torch.bfloat16)
    torch.manual_seed(0)  # peft's init of A
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    hm = HybridModel(peft_model)
    with torch.no_grad():  # a ~ 0.73: mixing, as in test_engine
        hm.gate.lam.copy_(torch.linspace(2.0, 3.0, hm.gate.lam.numel()))
    return hm, tokenizer


@pytest.fixture(params=["embedded", "llama"])
def bf16(request, tokenizer):
    return bf16_policy(request.param, tokenizer)


def test_the_adapters_are_early_training_sized(bf16):
    """The regime under test: a 16-bit merge would leave most weights unchanged."""
    hm, _ = bf16
    lora = hm.model.base_model.model.model.layers[0].self_attn.q_proj
    assert hm.embed.weight.dtype == torch.bfloat16 and lora.lora_A["default"].weight.dtype == torch.float32
    delta = lora.get_delta_weight("default")  # s B A: most entries below half the weights' bf16 spacing
    w = lora.base_layer.weight
    assert ((w.float() + delta).to(torch.bfloat16) == w).float().mean() > 0.7


def test_projections_apply_adapters_as_the_training_forward(bf16):
    """Each packed matrix's output, at decode (rows) and prefill (rows x positions) shapes,
    equals its projections' outputs in the training forward (the peft modules as
    HybridModel routes them, through lora_linear): exactly, since a CPU bf16 GEMM rounds each
    output once from fp32 whatever the packing."""
    hm, _ = bf16
    dec = FastDecoder(hm.causal_lm)
    g = torch.Generator().manual_seed(2)
    changed = 0
    for layer, packed in zip(hm.causal_lm.model.layers, dec.layers):
        for name, (owner, projs) in PROJ.items():
            mods = [getattr(getattr(layer, owner), p) for p in projs]
            d = mods[0].base_layer.in_features
            for shape in ((5, d), (3, 7, d)):
                x = torch.randn(shape, generator=g).to(torch.bfloat16)
                with torch.no_grad():
                    want = torch.cat([m(x) for m in mods], dim=-1)
                    base = torch.cat([m.base_layer(x) for m in mods], dim=-1)
                    got = packed.linear(name, x)
                assert torch.equal(got, want), f"{name} {tuple(shape)}"
                changed += int((want != base).sum())
    assert changed > 0, "the adapters changed no output: the check would not see them"
    if _common._onednn_packing(torch.bfloat16):  # so the check above covered oneDNN's prepacked GEMM
        assert all(w is not None for layer in dec.layers for w in layer.packed.values())


def sampler_logprobs(hidden, weight, targets, temperature):
    """Log-probs of `targets` as the engine's sampler scores a hidden state (fp32 logits,
    scaled, minus their logsumexp), so that equal hidden states give equal log-probs. (The
    CPU token_logprobs rounds bf16 logits to bf16 first: 0.01-0.02 apart in log-prob.)"""
    scaled = (hidden.float() @ weight.float().T) / temperature
    return scaled.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def test_sampling_logprobs_follow_the_training_forward(bf16, monkeypatch):
    """(a) Rollout.logprobs against HybridModel.sequence_logprobs on the rollout (hybrid, the
    same temperature), its hidden states scored as the sampler scores them. Prompts of one
    length, so the training forward has no left padding and each row's first log-prob comes
    from the same ops as the engine's prefill."""
    hm, tok = bf16
    texts = ["Tom has 12 apples and", "3 * 4 = 12, then 5 +", "What is 7 + 8? It is"]
    prompts = [tok.encode(t) for t in texts]
    n = min(len(p) for p in prompts)
    prompts = [p[:n] for p in prompts for _ in range(4)]
    engine = RolloutEngine(hm, MarkerMatcher(tok), [tok.eos_token_id], tok.pad_token_id, EngineOptions())
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=24, temperature=0.8, top_k=0), seed=3)
    m = out.completion_mask
    assert out.think_mask.sum() > 50
    with torch.no_grad():
        bf16_scored = hm.sequence_logprobs(out, 0.8, hybrid=True)
        monkeypatch.setattr(hrpo.model.hybrid, "token_logprobs", sampler_logprobs)
        on = hm.sequence_logprobs(out, 0.8, hybrid=True)
    # The first token comes from the prefill alone, and the training forward of the prompts
    # (the rollout cut to its first token) runs the same ops: the adapters' effect there is
    # reproduced exactly.
    first = out.select(slice(None))
    for f in ("completion_ids", "completion_mask", "latents", "think_mask"):
        setattr(first, f, getattr(out, f)[:, :1])
    with torch.no_grad():
        on1 = hm.sequence_logprobs(first, 0.8, hybrid=True)[:, 0]
        with hm.adapters_disabled():
            off1 = hm.sequence_logprobs(first, 0.8, hybrid=True)[:, 0]
    assert (on1 != off1).any(), "the adapters do not move the first tokens: nothing to check"
    assert torch.equal(out.logprobs[:, 0], on1), (out.logprobs[:, 0] - on1).abs().max()
    # Every token: within bf16 forward noise of the training forward. Decode-step attention
    # rounds apart from the training forward's (the gap is 0.001-0.003 on average here, as
    # large as the adapters' effect itself, whichever way they are applied; fp32 agrees to
    # 1e-4, test_engine).
    gap = (out.logprobs - on)[m].abs()
    assert gap.mean() < 0.006 and gap.max() < 0.2, (gap.mean(), gap.max())
    assert (out.logprobs - bf16_scored)[m].abs().mean() < 0.012


def test_greedy_tokens_equal_the_peft_forward(bf16):
    """(b) Plain greedy decoding: the engine's tokens are the argmax of the peft model's own
    forward (the HF body on token ids, adapters applied by the training op) step by step,
    and the first step's log-prob (from the prefill) is that forward's, to the C++ top-k
    sampler's rounding: its log-sum-exp (a polynomial exp, its own summation order) lands
    within a few fp32 ulps of torch.logsumexp's, 1e-6 at these logits' size."""
    hm, tok = bf16
    prompts = [tok.encode(t) for t in ["Tom has 12 apples", "3 * 4 = 12, then", "What is 7 + 8?"]]
    prompts = [p[: min(len(q) for q in prompts)] for p in prompts]  # unpadded, as in the forward below
    engine = RolloutEngine(hm, MarkerMatcher(tok), [tok.eos_token_id], tok.pad_token_id, EngineOptions())
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=12, greedy=True, hybrid=False, temperature=1.0))
    seq = torch.tensor(prompts)
    for t in range(int(out.lengths.max())):
        mask = torch.ones_like(seq, dtype=torch.bool)
        with torch.no_grad():
            hidden = hm.decoder(hm.embed(seq), mask, positions_from_mask(mask))[:, -1]
        want = (hidden.float() @ hm.lm_weight.float().T).argmax(-1)
        live = t < out.lengths
        assert torch.equal(out.completion_ids[live, t], want[live]), f"step {t}"
        if t == 0:
            torch.testing.assert_close(
                out.logprobs[:, 0], sampler_logprobs(hidden, hm.lm_weight, want, 1.0), rtol=0, atol=1e-5
            )
        seq = torch.cat([seq, want[:, None]], dim=1)


def test_refresh_reads_adapter_changes_only(bf16):
    """An optimizer step on the adapters re-reads them and nothing else; no change, no work;
    adapters switched off apply the base weights alone."""
    hm, _ = bf16
    dec = FastDecoder(hm.causal_lm)
    layer = dec.layers[1]
    x = torch.randn(4, layer.w["qkv"].shape[1]).to(torch.bfloat16)
    before = layer.linear("qkv", x).clone()
    versions = {k: w._version for k, w in layer.w.items()}
    assert not dec.refresh()
    with torch.no_grad():
        hm.causal_lm.model.layers[1].self_attn.k_proj.lora_B["default"].weight.mul_(50.0)
    assert dec.refresh()
    assert {k: w._version for k, w in layer.w.items()} == versions, "the base weights were re-copied"
    after = layer.linear("qkv", x)
    nq = hm.config.num_attention_heads * dec.head_dim
    nk = hm.config.num_key_value_heads * dec.head_dim
    assert torch.equal(after[:, :nq], before[:, :nq]) and torch.equal(after[:, nq + nk :], before[:, nq + nk :])
    assert not torch.equal(after[:, nq : nq + nk], before[:, nq : nq + nk])
    with hm.adapters_disabled():
        assert dec.refresh()
        base = [getattr(hm.causal_lm.model.layers[1].self_attn, p).base_layer for p in PROJ["qkv"][1]]
        with torch.no_grad():
            assert torch.equal(layer.linear("qkv", x), torch.cat([b(x) for b in base], -1))


FSDP_RUNNER = textwrap.dedent("""
    import copy, os, sys, torch
    sys.path.insert(0, os.environ["TESTS"])
    from conftest import build_tokenizer
    from test_engine_lora16 import bf16_policy
    from hrpo.core.distributed import finish_group, init_group, shard_layers
    from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
    from hrpo.core.marker import MarkerMatcher
    from hrpo.engine.rollout import SamplingConfig

    group = init_group("cpu")
    sharded, tok = bf16_policy("embedded", build_tokenizer())
    whole = copy.deepcopy(sharded)
    shard_layers(sharded, group)
    assert type(sharded.body.layers[0].self_attn.q_proj.lora_B["default"].weight).__name__ == "DTensor"
    engines = [RolloutEngine(hm, MarkerMatcher(tok), [tok.eos_token_id], tok.pad_token_id, EngineOptions())
               for hm in (sharded, whole)]
    prompts = [tok.encode(t) for t in ["Tom has 12 apples", "3 * 4 = 12, then", "x"] for _ in range(2)]
    for step in range(2):
        a, b = (e.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=0), seed=5)
                for e in engines)
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs), step
        assert a.stats["repacked"] == b.stats["repacked"] == step, (step, a.stats["repacked"])
        with torch.no_grad():  # the same update of the adapters, through the DTensors on one side
            for hm in (sharded, whole):
                for name, p in hm.named_parameters():
                    if "lora_B" in name:
                        p.mul_(3.0)
    finish_group()
""")


def test_fsdp_sharded_adapters_roll_out_as_whole_ones(tmp_path):
    """Two ranks, each layer's base weights and adapters sharded (FSDP2): the engine gathers
    them and samples what an unsharded copy samples, and sees an in-place update of the
    sharded adapters (an op on a DTensor advances the DTensor's version counter, not its
    local tensor's)."""
    script = tmp_path / "fsdp_runner.py"
    script.write_text(FSDP_RUNNER)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TESTS": str(tests), "PYTHONPATH": str(tests.parent), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(script),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
