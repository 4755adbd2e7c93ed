"""Baselines written the way the paper's public code and the common trainers do it: a hybrid
rollout (eager_rollout) and a training update (eager_update).

Eager ops through the Hugging Face model with its KV cache, full logits, multinomial
sampling, and, every step, a host-side decode of each row's whole text to look for the
answer marker. It computes the same kind of rollout as hrpo.engine.rollout; only the speed differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hrpo.engine.rollout import left_pad
from hrpo.model.hybrid import positions_from_mask
from hrpo.training.loss import grpo_loss


@torch.no_grad()
def eager_rollout(hm, tokenizer, prompts, max_new_tokens, temperature, top_k, marker="####", generator=None):
    model = hm.causal_lm
    E = hm.embed.weight
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, E.device)
    cache = DynamicCache(config=model.config)
    out = model(
        inputs_embeds=hm.embed(ids),
        attention_mask=mask.long(),
        position_ids=positions_from_mask(mask),
        past_key_values=cache,
        use_cache=True,
    )
    pos = mask.sum(-1, keepdim=True)
    generated = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature
        if top_k:
            kth = torch.topk(logits, top_k).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        h_hat = probs @ E.float() / probs.norm(dim=-1, keepdim=True)
        thinking = []
        for row, t in zip(generated, tok.tolist()):  # the original's per-step re-decode
            row.append(t)
            thinking.append(marker not in tokenizer.decode(row, skip_special_tokens=True))
        think = torch.tensor(thinking, device=E.device)
        e = hm.embed(tok)
        g = hm.gate
        r = torch.sigmoid(g.w_r(e.float()))
        i = torch.sigmoid(g.w_i(e.float()))
        a = torch.exp(-g.c * F.softplus(-g.lam) * r)
        x = torch.where(think[:, None], a * e.float() + torch.sqrt(1 - a * a + 1e-8) * (i * h_hat), e.float()).to(
            e.dtype
        )
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            inputs_embeds=x[:, None],
            attention_mask=mask.long(),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        pos = pos + 1
    return generated


def eager_update(hm, batch, advantages, temperature, beta):
    """The update the way the common trainers write it: HF's forward over every completion
    with its own copy of the prompt, full logits, log_softmax, gather; the reference pass the
    same with the adapters off on plain tokens. Returns the GRPO loss (to backward)."""
    model = hm.causal_lm
    P = batch.prompt_ids.shape[1]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    pos = positions_from_mask(mask)
    embeds = hm.embed(ids)

    def logprobs(inputs):
        logits = model(inputs_embeds=inputs, attention_mask=mask.long(), position_ids=pos).logits
        logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, dim=-1)
        return logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1)

    with torch.no_grad(), hm.adapters_disabled():
        ref = logprobs(embeds)
    comp, _ = hm.gate(embeds[:, P:], batch.latents, batch.think_mask)
    loss, _ = grpo_loss(
        logprobs(torch.cat([embeds[:, :P], comp], 1)), advantages, batch.completion_mask, ref, beta=beta
    )
    return loss
