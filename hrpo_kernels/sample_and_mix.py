"""The decode epilogue: lm-head, temperature, top-k, a seeded sample, the sampled token's
log-prob, and the latent mixture h_hat = (p @ E) / ||p||_2.

Conventions the kernels must keep:
- p is softmax(logits / temperature) restricted to the top-k logits and renormalised
  (top_k = 0: the full vocabulary). The sample and h_hat come from p.
- logprob is log_softmax(logits / temperature) of the chosen token over the full
  vocabulary: the policy's log-prob, the same quantity the training forward computes, so
  rollout log-probs serve directly as the old log-probs of the clipped objective.
- The sample is an exponential race, argmax(p / x) with x ~ Exp(1) drawn as -log(u) from
  one (B, V) uniform draw per step; greedy takes argmax of the logits instead.
"""
from __future__ import annotations

import torch


def sample_and_mix_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    embedding: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, d), lm_weight (V, d), embedding (V, d) -> tokens (B,) int64,
    logprobs (B,) fp32, h_hat (B, d) fp32."""
    if temperature <= 0:
        raise ValueError(f"sample_and_mix: temperature must be > 0, got {temperature}")
    logits = hidden.float() @ lm_weight.float().T
    scaled = logits / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        vals, idx = torch.topk(scaled, top_k, dim=-1)
        p = torch.zeros_like(scaled).scatter_(-1, idx, torch.softmax(vals, dim=-1))
    else:
        p = torch.softmax(scaled, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        tokens = (p / -torch.log(u.clamp_min(1e-20))).argmax(dim=-1)
    logprobs = scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm
    h_hat = (p @ embedding.float()) / p.norm(dim=-1, keepdim=True)
    return tokens, logprobs, h_hat


def sample_and_mix(hidden, lm_weight, embedding, temperature, top_k=0, greedy=False, generator=None):
    """Dispatcher: fused kernels plug in here; the reference serves every device for now."""
    return sample_and_mix_reference(hidden, lm_weight, embedding, temperature, top_k, greedy, generator)
