"""The rollout engine (hrpo.engine.rollout_engine) against the reference loop (hrpo.engine.rollout) and HF's forward.

Under one seed both draw the same Philox noise per (row, step, token), so every token,
think flag and finish must agree exactly and log-probs / latents to rounding, whatever
the engine's prefix sharing and compaction do."""

import pytest
import torch
from conftest import build_model
from peft import LoraConfig, get_peft_model
from test_rollout import mix_strongly
from test_rollout_engine import EXTRA_EOS, PROMPTS, assert_same
from transformers import AutoConfig, AutoModelForCausalLM

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.fast_decoder import FastDecoder, unsupported_reason
from hrpo.engine.rollout import SamplingConfig, left_pad, rollout
from hrpo.engine.rollout_engine import EngineOptions, ReferenceEngine, RolloutEngine, make_engine
from hrpo.model.hybrid import HybridModel, positions_from_mask

G = 4
F32 = dict(latent_dtype=torch.float32)
# A third of the vocabulary ends a row: on every test model rows then finish at spread-out
# steps, enough of them early for the engine's power-of-two compaction to act.
WIDE_EOS = list(range(100, 220))


def policy(model, moderate=True):
    hm = HybridModel(model)
    if moderate:  # a ~ 0.73: mixing, not chaotic (see test_rollout_engine)
        with torch.no_grad():
            hm.gate.lam.uniform_(2.0, 3.0)
    return hm


def grouped(tokenizer, prompts=PROMPTS):
    return [tokenizer.encode(p) for p in prompts for _ in range(G)]


def cfg(**kw):
    return SamplingConfig(**{"max_new_tokens": 40, "temperature": 0.8, "top_k": 20, **kw})


def both(hm, tokenizer, prompts, options, seed=7, eos=None, **kw):
    """(reference rollout, engine rollout) of the same prompts, seed and sampling."""
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + (EXTRA_EOS if eos is None else eos)
    sampling = cfg(**kw)
    ref = rollout(
        hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=seed, latent_dtype=options.latent_dtype
    )
    engine = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, options)
    return ref, engine.generate(prompts, sampling, seed=seed)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("hybrid", [True, False])
def test_engine_equals_reference_with_sharing_and_compaction(arch, tokenizer, hybrid, cpu_kernels):
    hm = policy(build_model(arch, len(tokenizer)))
    prompts = grouped(tokenizer)
    compactions = 0
    for share, compact in [(False, 0.0), (True, 0.0), (False, 0.6), (True, 0.9)]:
        opts = EngineOptions(share_prefix=share, compact_below=compact, cpu_kernels=cpu_kernels, **F32)
        ref, out = both(hm, tokenizer, prompts, opts, eos=WIDE_EOS, hybrid=hybrid)
        assert ref.lengths.min() < ref.lengths.max()
        assert_same(ref, out)
        assert out.stats["cpu_ext"] == cpu_kernels  # the C++ step ran (it builds here), or the torch one
        compactions += out.stats["compactions"]
    assert compactions > 0, "no run compacted: the check would not cover compaction"
    if hybrid:
        assert out.think_mask.any()


def test_bf16_latents_keep_the_consistency_invariant(arch, tokenizer):
    """The engine stores bf16 latents and gates with exactly those, so the training forward
    reproduces the rollout's log-probs."""
    hm = policy(build_model(arch, len(tokenizer), seed=2), moderate=False)
    mix_strongly(hm)
    _, out = both(hm, tokenizer, grouped(tokenizer), EngineOptions(), seed=3, top_k=0, max_new_tokens=24)
    assert out.latents.dtype == torch.bfloat16 and out.think_mask.sum() > 20
    m = out.completion_mask
    with torch.no_grad():
        lp = hm.sequence_logprobs(out, 0.8, hybrid=True)
        assert (lp - out.logprobs)[m].abs().max() < 1e-4
        shifted = out.select(slice(None))
        shifted.latents = torch.roll(out.latents, 1, dims=1)
        assert (hm.sequence_logprobs(shifted, 0.8) - out.logprobs)[m].abs().max() > 1e-2


def test_ragged_prompts_match_one_at_a_time(arch, tokenizer):
    hm = policy(build_model(arch, len(tokenizer), seed=4))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engine = RolloutEngine(
        hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id], tokenizer.pad_token_id, EngineOptions(**F32)
    )
    sampling = cfg(greedy=True, max_new_tokens=24)
    batch = engine.generate(prompts, sampling)
    for row, p in enumerate(prompts):
        single = engine.generate([p], sampling)
        n = int(single.lengths[0])
        assert torch.equal(batch.completion_ids[row, :n], single.completion_ids[0, :n])
        torch.testing.assert_close(batch.logprobs[row, :n], single.logprobs[0, :n], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.latents[row, :n], single.latents[0, :n], atol=1e-4, rtol=1e-4)


def llama3_rope_model(vocab):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        attention_bias=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("body", ["cpp", "torch"])
@pytest.mark.parametrize("which", ["qwen2", "qwen3", "llama", "llama3-rope-bias-mqa"])
def test_fast_decoder_matches_hf_forward(tokenizer, which, body):
    """Prefill of ragged prompts and ten teacher-forced decode steps give HF's hidden states,
    with decode steps in the extension's C++ body and in torch ops."""
    model = llama3_rope_model(len(tokenizer)) if which.startswith("llama3") else build_model(which, len(tokenizer))
    hm = HybridModel(model)
    dec = FastDecoder(model, cpu_body=body == "cpp")
    assert (dec.ext is not None) == (body == "cpp")  # the C++ body must build here, not silently fall back
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    lens = torch.tensor([len(p) for p in prompts])
    P, steps = int(lens.max()), 10
    cache = dec.new_cache(len(prompts), P + steps)
    right = torch.full((len(prompts), P), tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        right[i, : len(p)] = torch.tensor(p)
    g = torch.Generator().manual_seed(0)
    follow = torch.randint(0, len(tokenizer), (len(prompts), steps), generator=g)
    ours = [dec.prefill(hm.embed(right), lens, cache)]
    for t in range(steps):
        ours.append(dec.decode(hm.embed(follow[:, t]), cache))
    ids, mask = left_pad([p + follow[i].tolist() for i, p in enumerate(prompts)], tokenizer.pad_token_id)
    with torch.no_grad():
        hf = hm.decoder(hm.embed(ids), mask, positions_from_mask(mask))
    width = ids.shape[1]
    for t, h in enumerate(ours):  # column of the input that ends prompt + t follow tokens
        torch.testing.assert_close(h, hf[:, width - steps - 1 + t], atol=2e-5, rtol=1e-4)
    assert torch.equal(cache.seqlens, (lens + steps).int())


def lora_policy(tokenizer):
    model = build_model("qwen2", len(tokenizer), seed=5)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return policy(peft_model)


def test_lora_is_merged_and_follows_updates(tokenizer):
    hm = lora_policy(tokenizer)
    prompts = grouped(tokenizer)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + EXTRA_EOS
    engine = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, EngineOptions(**F32))
    sampling = cfg()
    first = engine.generate(prompts, sampling, seed=1)
    assert first.stats["repacked"] == 0  # packed at construction, nothing changed since
    assert_same(rollout(hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=1), first)
    with torch.no_grad():  # an optimizer step on the adapters
        for name, p in hm.model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p) * 0.3)
    second = engine.generate(prompts, sampling, seed=1)
    assert second.stats["repacked"] == 1 and not torch.equal(first.completion_ids, second.completion_ids)
    assert_same(rollout(hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=1), second)
    assert engine.generate(prompts, sampling, seed=1).stats["repacked"] == 0
    with hm.adapters_disabled():  # the reference policy: base weights only
        base = engine.generate(prompts, sampling, seed=1)
        assert base.stats["repacked"] == 1
        assert_same(rollout(hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=1), base)
    with torch.no_grad():  # an in-place update of one base weight (a full fine-tune's step)
        hm.causal_lm.model.layers[1].mlp.down_proj.base_layer.weight.mul_(-1.0)
    flipped = engine.generate(prompts, sampling, seed=1)
    assert flipped.stats["repacked"] == 1 and not torch.equal(second.completion_ids, flipped.completion_ids)
    assert_same(rollout(hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=1), flipped)


def test_unsupported_models_fall_back_with_one_warning(tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    hm = policy(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    assert "sliding" in unsupported_reason(hm.causal_lm)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id]
    with pytest.warns(UserWarning, match="reference loop") as caught:
        engine = make_engine(hm, matcher, eos, tokenizer.pad_token_id, EngineOptions(**F32))
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert isinstance(engine, ReferenceEngine)
    prompts = grouped(tokenizer)[:6]
    out = engine.generate(prompts, cfg(max_new_tokens=12), seed=2)
    ref = rollout(hm, prompts, cfg(max_new_tokens=12), matcher, eos, tokenizer.pad_token_id, seed=2)
    assert_same(ref, out)
    with pytest.raises(ValueError, match="cannot run"):
        FastDecoder(hm.causal_lm)
    mistral = AutoConfig.for_model(
        model_type="mistral",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    assert "model_type 'mistral'" in unsupported_reason(AutoModelForCausalLM.from_config(mistral))


def test_stats_reuse_and_bad_input(tokenizer):
    hm = policy(build_model("qwen2", len(tokenizer)))
    engine = make_engine(hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert isinstance(engine, RolloutEngine)
    big = engine.generate(grouped(tokenizer), cfg(max_new_tokens=16), seed=0)
    state = engine.state
    small = engine.generate(grouped(tokenizer)[:5], cfg(max_new_tokens=8), seed=0)
    assert engine.state is state, "a smaller call must reuse the buffers"
    assert small.completion_ids.shape[0] == 5 and big.completion_ids.shape[0] == 16
    for key in ("prefill_s", "decode_s", "steps", "host_checks", "compactions", "new_tokens", "tokens_per_s"):
        assert key in small.stats
    assert small.stats["new_tokens"] == int(small.completion_mask.sum())
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1, 2], []], cfg())
    with pytest.raises(ValueError, match=f"prompt 1 holds token id {len(tokenizer)}, outside"):
        engine.generate([[1, 2], [3, len(tokenizer)]], cfg())
    with pytest.raises(ValueError, match="engine must be"):
        make_engine(hm, MarkerMatcher(tokenizer), [], 0, kind="vllm")


class ReplayByCalling:
    """Stands in for a CUDA graph on the CPU: replay() runs the captured step again. Real
    capture is checked on a GPU (test_engine_cuda.py); this checks the engine's graph
    bookkeeping: the eager warm-up step, one capture per batch size, replays in chunks of
    check_every steps, compaction switching to a smaller graph, reuse on the next call."""

    captured = 0

    def __init__(self, step):
        ReplayByCalling.captured += 1
        self.replay = step


def test_graph_bookkeeping_matches_eager_steps(tokenizer, monkeypatch):
    hm = policy(build_model("llama", len(tokenizer)))
    prompts = grouped(tokenizer)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + WIDE_EOS
    opts = EngineOptions(compact_below=0.9, check_every=3, **F32)
    eager = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, opts).generate(prompts, cfg(), seed=4)
    engine = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, opts)
    engine.graphs = True
    monkeypatch.setattr(engine, "_capture", ReplayByCalling)
    import hrpo.engine.rollout_engine

    monkeypatch.setattr(hrpo.engine.rollout_engine, "sampling_is_fused", lambda *a: True)  # as on a GPU
    out = engine.generate(prompts, cfg(), seed=4)
    assert_same(eager, out)
    sizes = 1 + out.stats["compactions"]  # one graph per batch size
    assert out.stats["compactions"] >= 1 and out.stats["graph_captures"] == sizes == ReplayByCalling.captured
    assert out.stats["host_checks"] == -(-out.stats["steps"] // 3)
    again = engine.generate(prompts, cfg(), seed=4)
    assert again.stats["graph_captures"] == 0 and ReplayByCalling.captured == sizes
    assert_same(eager, again)
    # Sampling that would run the reference (full vocabulary past the kernel's widths) syncs
    # with the host: the engine must not capture it, and says so once.
    monkeypatch.setattr(hrpo.engine.rollout_engine, "sampling_is_fused", lambda *a: False)
    full = cfg(top_k=0)
    want = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, opts).generate(prompts, full, seed=4)
    with pytest.warns(UserWarning, match="CUDA graphs are off"):
        got = engine.generate(prompts, full, seed=4)
    assert got.stats["graph_captures"] == 0 and ReplayByCalling.captured == sizes
    assert_same(want, got)


def test_engine_on_the_fused_kernels_equals_reference(tokenizer, monkeypatch):
    """The engine's GPU-path ops (Triton sample_and_mix with row ids, Triton split-KV
    attention on the cache views, Triton gated_blend) under the interpreter draw the
    reference loop's tokens, compaction on."""
    import hrpo.engine.fast_decoder
    import hrpo.engine.rollout_engine
    import hrpo.model.gate
    from hrpo_kernels.decode_attention import decode_attention
    from hrpo_kernels.gated_blend import gated_blend_triton
    from hrpo_kernels.sample_and_mix import sample_and_mix_triton

    hm = policy(build_model("llama", len(tokenizer)))
    prompts = grouped(tokenizer)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + WIDE_EOS
    sampling = cfg(max_new_tokens=24)
    ref = rollout(hm, prompts, sampling, matcher, eos, tokenizer.pad_token_id, seed=7)
    monkeypatch.setattr(hrpo.engine.rollout_engine, "sample_and_mix", sample_and_mix_triton)
    monkeypatch.setattr(
        hrpo.engine.fast_decoder,
        "decode_attention",
        lambda *a, max_len=None: decode_attention(*a, impl="triton", max_len=max_len),
    )
    monkeypatch.setattr(hrpo.model.gate, "gated_blend", lambda *a, impl=None: gated_blend_triton(*a))
    opts = EngineOptions(compact_below=0.9, cpu_kernels=False, **F32)  # the torch body, which calls decode_attention
    out = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, opts).generate(prompts, sampling, seed=7)
    assert out.stats["compactions"] >= 1 and out.think_mask.any()
    assert_same(ref, out)
