"""A hybrid rollout written the way the paper's public code does it, as the baseline.

Eager ops through the Hugging Face model with its KV cache, full logits, multinomial
sampling, and, every step, a host-side decode of each row's whole text to look for the
answer marker. It computes the same kind of rollout as hrpo.rollout; only the speed differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hrpo.model import positions_from_mask
from hrpo.rollout import left_pad


@torch.no_grad()
def eager_rollout(hm, tokenizer, prompts, max_new_tokens, temperature, top_k, marker="####", generator=None):
    model = hm.causal_lm
    E = hm.embed.weight
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, E.device)
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=hm.embed(ids), attention_mask=mask.long(), position_ids=positions_from_mask(mask), past_key_values=cache, use_cache=True)
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
        x = torch.where(think[:, None], a * e.float() + torch.sqrt(1 - a * a + 1e-8) * (i * h_hat), e.float()).to(e.dtype)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(inputs_embeds=x[:, None], attention_mask=mask.long(), position_ids=pos, past_key_values=cache, use_cache=True)
        pos = pos + 1
    return generated
