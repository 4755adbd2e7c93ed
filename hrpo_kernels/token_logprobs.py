"""Log-probs of target tokens under a linear lm-head at a temperature, chunked over tokens
so that at most (chunk x V) logits exist at once in the forward pass.

The reference relies on torch autograd, which keeps each chunk's logits for the backward;
the fused kernel of the kernels issue recomputes them instead.
"""
from __future__ import annotations

import torch


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,) -> fp32 log p(target) (N,)."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"token_logprobs: {hidden.shape[0]} hidden rows but {targets.shape[0]} targets"
        )
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        logits = (h @ weight.T).float() / temperature
        t = targets[start : start + chunk_size, None]
        out.append((logits.gather(-1, t) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """Dispatcher: fused kernels plug in here; the reference serves every device for now."""
    return token_logprobs_reference(hidden, weight, targets, temperature, chunk_size)
