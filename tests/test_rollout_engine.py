"""Seeded rollouts: prefix sharing and compaction leave every token, log-prob, latent and
think flag unchanged (the race noise is a function of seed, row, step and token only)."""

import pytest
import torch
from conftest import build_model

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.model.hybrid import HybridModel, cache_index_select

PROMPTS = ["Tom has 12 apples", "3 * 4 = 12, then", "Café #### déjà", "x"]
G = 4
EXTRA_EOS = list(range(100, 124))  # a tiny random model rarely samples <|im_end|>: end rows at random steps


def setup(arch, tokenizer, seed=0):
    hm = HybridModel(build_model(arch, len(tokenizer), seed=seed))
    with torch.no_grad():  # a ~ 0.73 as in test_rollout: mixing, not chaotic
        hm.gate.lam.uniform_(2.0, 3.0)
    prompts = [tokenizer.encode(p) for p in PROMPTS for _ in range(G)]  # G copies, grouped
    return hm, MarkerMatcher(tokenizer), prompts


def run(hm, tokenizer, matcher, prompts, seed=7, gen_seed=0, eos=None, **kw):
    opts = {k: kw.pop(k) for k in ("share_prefix", "compact_below") if k in kw}
    cfg = SamplingConfig(**{"max_new_tokens": 40, "temperature": 0.8, "top_k": 20, **kw})
    g = torch.Generator().manual_seed(gen_seed)
    eos = [tokenizer.eos_token_id] + EXTRA_EOS if eos is None else eos
    return rollout(hm, prompts, cfg, matcher, eos, tokenizer.pad_token_id, g, seed=seed, **opts)


def assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.think_mask, b.think_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.gate_mean, b.gate_mean, atol=1e-5, rtol=0, equal_nan=True)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)


@pytest.mark.parametrize("hybrid", [True, False])
def test_sharing_and_compaction_do_not_change_the_rollout(arch, tokenizer, hybrid):
    hm, matcher, prompts = setup(arch, tokenizer)
    base = run(hm, tokenizer, matcher, prompts, hybrid=hybrid)
    lengths = base.lengths
    assert lengths.min() < lengths.max(), "rows must finish at different steps for compaction to act"
    if hybrid:
        assert base.think_mask.any()
    for share, compact in [(True, 0.0), (False, 1.01), (True, 0.6), (False, 0.3)]:
        other = run(hm, tokenizer, matcher, prompts, hybrid=hybrid, share_prefix=share, compact_below=compact)
        assert_same(base, other)


def test_seed_not_generator_fixes_the_tokens(tokenizer):
    hm, matcher, prompts = setup("qwen2", tokenizer)
    a = run(hm, tokenizer, matcher, prompts, gen_seed=0)
    b = run(hm, tokenizer, matcher, prompts, gen_seed=1, compact_below=0.9)
    c = run(hm, tokenizer, matcher, prompts, seed=8)
    assert_same(a, b)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # copies of one prompt draw different noise (their row ids differ)
    assert not all(torch.equal(a.completion_ids[0], a.completion_ids[r]) for r in range(1, G))


def test_row_order_is_the_seed_convention(tokenizer):
    """Row r of a batch is row r of its own seeded stream: a single-prompt call equals the
    first row of a batch (row id 0, offset t * B * V differs, so only step 0 is shared)."""
    hm, matcher, prompts = setup("qwen2", tokenizer)
    full = run(hm, tokenizer, matcher, prompts, max_new_tokens=1)
    one = run(hm, tokenizer, matcher, prompts[:1], max_new_tokens=1)
    assert torch.equal(full.completion_ids[:1], one.completion_ids)


def test_compacted_rollout_logprobs_equal_training_forward(arch, tokenizer):
    hm, matcher, prompts = setup(arch, tokenizer, seed=2)
    with torch.no_grad():
        hm.gate.lam.uniform_(-2.0, 0.0)
        hm.gate.w_r.bias.uniform_(0.5, 1.0)
        hm.gate.w_i.bias.fill_(2.0)
    out = run(hm, tokenizer, matcher, prompts, hybrid=True, share_prefix=True, compact_below=0.7, max_new_tokens=30)
    assert out.think_mask.sum() > 20
    with torch.no_grad():
        lp = hm.sequence_logprobs(out, 0.8, hybrid=True)
    m = out.completion_mask
    assert (lp - out.logprobs)[m].abs().max() < 1e-4


def test_ragged_distinct_prompts_share_prefix(tokenizer):
    """No duplicates and ragged lengths: sharing is the identity; with duplicates scattered
    (not grouped) the copies still land on their rows."""
    hm, matcher, _ = setup("llama", tokenizer)
    ps = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in ps}) > 1
    assert_same(run(hm, tokenizer, matcher, ps), run(hm, tokenizer, matcher, ps, share_prefix=True))
    mixed = [ps[i] for i in (2, 0, 2, 3, 0, 1, 2, 3)]
    assert_same(
        run(hm, tokenizer, matcher, mixed),
        run(hm, tokenizer, matcher, mixed, share_prefix=True, compact_below=0.8),
    )


def test_cache_index_select(tokenizer):
    hm, _, _ = setup("qwen2", tokenizer)
    from transformers import DynamicCache

    cache = DynamicCache(config=hm.config)
    x = torch.randn(3, 5, hm.config.hidden_size)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        hm.decoder(x, mask, torch.arange(5).expand(3, 5), cache)
    before = (
        [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers] if hasattr(cache, "layers") else None
    )
    idx = torch.tensor([2, 2, 0, 1])
    cache_index_select(cache, idx)
    if before is not None:
        for (k, v), layer in zip(before, cache.layers):
            assert torch.equal(layer.keys, k[idx]) and torch.equal(layer.values, v[idx])
    assert cache.get_seq_length() == 5
