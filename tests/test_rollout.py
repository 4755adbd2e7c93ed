import pytest
import torch
from conftest import build_model

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, left_pad, rollout
from hrpo.model.hybrid import HybridModel, positions_from_mask

PROMPTS = ["Tom has 12 apples", "3 * 4 = 12, then", "Café #### déjà", "x"]


def setup(arch, tokenizer, seed=0):
    hm = HybridModel(build_model(arch, len(tokenizer), seed=seed))
    return hm, MarkerMatcher(tokenizer), [tokenizer.encode(p) for p in PROMPTS]


def mix_strongly(hm):
    with torch.no_grad():
        hm.gate.lam.uniform_(-2.0, 0.0)
        hm.gate.w_r.bias.uniform_(0.5, 1.0)
        hm.gate.w_i.bias.fill_(2.0)


def run(hm, tokenizer, matcher, prompts, seed=0, **kw):
    cfg = SamplingConfig(**{"max_new_tokens": 24, "temperature": 0.7, "top_k": 20, **kw})
    g = torch.Generator().manual_seed(seed)
    return rollout(hm, prompts, cfg, matcher, [tokenizer.eos_token_id], tokenizer.pad_token_id, g)


def test_passthrough_gate_gives_plain_rollout(arch, tokenizer):
    hm, matcher, prompts = setup(arch, tokenizer)
    with torch.no_grad():  # a = 1 exactly and i = 0: the blend returns the token embedding
        hm.gate.lam.fill_(100.0)
        hm.gate.w_i.bias.fill_(-1e4)
    hybrid = run(hm, tokenizer, matcher, prompts, hybrid=True)
    plain = run(hm, tokenizer, matcher, prompts, hybrid=False)
    assert hybrid.think_mask.any()
    assert torch.equal(hybrid.completion_ids, plain.completion_ids)
    assert torch.equal(hybrid.logprobs, plain.logprobs)


@torch.no_grad()
def plain_sampling(model, prompts, pad_id, eos_id, steps, temperature, top_k, seed):
    """Textbook sampling with HF's own forward and lm-head, no cache, same draw convention."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(prompts, pad_id)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits[:, -1]
        vals, idx = torch.topk(logits / temperature, top_k)
        p = torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(vals, -1))
        u = torch.rand(p.shape, generator=g)
        tok = (p / -torch.log(u.clamp_min(1e-20))).argmax(-1).masked_fill(done, pad_id)
        out.append(tok)
        done |= tok == eos_id
        if done.all():
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_hybrid_off_equals_plain_sampling(arch, tokenizer):
    hm, matcher, prompts = setup(arch, tokenizer, seed=1)
    mix_strongly(hm)  # irrelevant when hybrid is off
    ours = run(hm, tokenizer, matcher, prompts, seed=5, hybrid=False)
    ref = plain_sampling(hm.model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 24, 0.7, 20, seed=5)
    assert not ours.think_mask.any()
    assert torch.equal(ours.completion_ids, ref)


@pytest.mark.parametrize("top_k", [0, 20])
def test_training_forward_logprobs_equal_rollout_logprobs(arch, tokenizer, top_k):
    hm, matcher, prompts = setup(arch, tokenizer, seed=2)
    mix_strongly(hm)
    out = run(hm, tokenizer, matcher, prompts, seed=3, top_k=top_k, hybrid=True)
    assert out.think_mask.sum() > 20 and (out.gate_mean < 0.9).all()
    with torch.no_grad():
        lp = hm.sequence_logprobs(out, 0.7, hybrid=True)
        m = out.completion_mask
        assert (lp - out.logprobs)[m].abs().max() < 1e-4
        # The check has teeth: latents one position off, or plain inputs, disagree.
        shifted = out.select(slice(None))
        shifted.latents = torch.roll(out.latents, 1, dims=1)
        assert (hm.sequence_logprobs(shifted, 0.7) - out.logprobs)[m].abs().max() > 1e-2
        assert (hm.sequence_logprobs(out, 0.7, hybrid=False) - out.logprobs)[m].abs().max() > 1e-2


def test_ragged_prompts_match_one_at_a_time(arch, tokenizer):
    hm, matcher, prompts = setup(arch, tokenizer, seed=4)
    # a ~ 0.73: a strongly mixing gate turns the latent feedback chaotic, and padding's
    # rounding differences (1e-6) then grow to 1e-2 within 20 steps.
    with torch.no_grad():
        hm.gate.lam.uniform_(2.0, 3.0)
    batch = run(hm, tokenizer, matcher, prompts, greedy=True, hybrid=True)
    for row, p in enumerate(prompts):
        single = run(hm, tokenizer, matcher, [p], greedy=True, hybrid=True)
        n = int(single.lengths[0])
        assert torch.equal(batch.completion_ids[row, :n], single.completion_ids[0, :n])
        torch.testing.assert_close(batch.logprobs[row, :n], single.logprobs[0, :n], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.latents[row, :n], single.latents[0, :n], atol=1e-4, rtol=1e-4)


def test_marker_in_prompt_does_not_end_thinking(tokenizer):
    hm, matcher, _ = setup("qwen2", tokenizer)
    prompt = [tokenizer.encode("the answer is #### 12")]
    out = run(hm, tokenizer, matcher, prompt, hybrid=True, max_new_tokens=6)
    text = tokenizer.decode(out.completion_ids[0, :1], skip_special_tokens=True)
    assert bool(out.think_mask[0, 0]) == ("####" not in text)


def test_thinking_stops_at_the_token_that_completes_the_marker(tokenizer):
    hm, matcher, _ = setup("qwen2", tokenizer)
    out = run(hm, tokenizer, matcher, [tokenizer.encode(p) for p in PROMPTS] * 4, seed=9, max_new_tokens=40, top_k=0)
    for row in range(out.completion_ids.shape[0]):
        ids = out.completion_ids[row][out.completion_mask[row]].tolist()
        for t in range(len(ids)):
            thinking = "####" not in tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
            assert bool(out.think_mask[row, t]) == thinking
        assert not out.think_mask[row][~out.completion_mask[row]].any()
