"""The reference hybrid rollout: a plain KV-cached decode loop over a Hugging Face model.

Each step samples x_t from p_t, records log p(x_t), the latent h_hat_t = (p_t @ E)/||p_t||
and whether the row is still thinking (the marker is not yet in its text, x_t included),
then feeds the gate's blend of E[x_t] and h_hat_t (or plain E[x_t]) as the next input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from hrpo_kernels import sample_and_mix

from .marker import MarkerMatcher
from .model import HybridModel, SequenceBatch, positions_from_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_k: int = 50
    greedy: bool = False
    hybrid: bool = True


@dataclass
class Rollout(SequenceBatch):
    logprobs: torch.Tensor = None  # (B, T) fp32 log p(x_t) at the sampling temperature
    gate_mean: torch.Tensor = None  # (B,) mean gate coefficient a over thinking positions

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def rollout(
    hm: HybridModel,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    matcher: MarkerMatcher,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    latent_dtype: torch.dtype = torch.float32,
) -> Rollout:
    device = hm.lm_weight.device
    B = len(prompts)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    eos = torch.tensor(eos_ids, device=device)
    E = hm.embed.weight

    cache = DynamicCache(config=hm.config)
    attn = prompt_mask
    hidden = hm.decoder(hm.embed(prompt_ids), attn, positions_from_mask(attn), cache)[:, -1]
    pos = prompt_mask.sum(-1, keepdim=True)

    states = matcher.initial(B, device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    gate_sum = torch.zeros(B, device=device)
    gate_n = torch.zeros(B, device=device)
    tokens, alive, logps, latents, thinks = [], [], [], [], []
    for _ in range(cfg.max_new_tokens):
        tok, lp, h_hat = sample_and_mix(hidden, hm.lm_weight, E, cfg.temperature, cfg.top_k, cfg.greedy, generator)
        tok = tok.masked_fill(finished, pad_id)
        states = matcher.advance(states, tok)
        think = ~finished & ~matcher.found(states) if cfg.hybrid else torch.zeros_like(finished)
        tokens.append(tok)
        alive.append(~finished)
        logps.append(lp)
        latents.append(h_hat.to(latent_dtype))
        thinks.append(think)
        finished = finished | torch.isin(tok, eos)
        if bool(finished.all()):
            break
        x, a = hm.gate(hm.embed(tok), h_hat, think)
        gate_sum += torch.where(think, a.mean(-1), 0.0)
        gate_n += think
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        hidden = hm.decoder(x[:, None], attn, pos, cache)[:, -1]
        pos = pos + 1

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens, 1),
        completion_mask=torch.stack(alive, 1),
        latents=torch.stack(latents, 1),
        think_mask=torch.stack(thinks, 1),
        logprobs=torch.stack(logps, 1),
        gate_mean=torch.where(gate_n > 0, gate_sum / gate_n.clamp_min(1), float("nan")),
    )
