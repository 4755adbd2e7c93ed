"""GRPO objective with the k3 KL estimator, as HRPO trains it."""
from __future__ import annotations

import torch

NORMS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for consecutive groups of `group_size` rows.

    std is the unbiased sample std (as TRL's GRPO), so a zero-variance group gives 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    beta: float = 0.005,
    epsilon: float = 0.2,
    norm: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise, and metrics. logp, ref_logp, old_logp, mask: (B, T); advantages: (B,).

    Without old_logp the ratio is exp(logp - logp.detach()) (one update per rollout: value
    1, gradient of logp); with it, the PPO-clipped ratio against the rollout's log-probs.
    norm: "grpo" averages each completion's tokens, then the batch; "dapo" averages all
    tokens of the batch; "dr_grpo" sums tokens and divides by B * max_completion_length.
    """
    if norm not in NORMS:
        raise ValueError(f"loss norm must be one of {NORMS}, got {norm!r}")
    mask = mask.float()
    adv = advantages[:, None]
    if old_logp is None:
        obj = torch.exp(logp - logp.detach()) * adv
        clip_frac = 0.0
    else:
        ratio = torch.exp(logp - old_logp)
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
        obj = torch.minimum(ratio * adv, clipped * adv)
        clip_frac = float(((ratio * adv > clipped * adv).float() * mask).sum() / mask.sum().clamp_min(1))
    per_token = -obj
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if norm == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    elif norm == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        if not max_completion_length:
            raise ValueError("dr_grpo normalisation needs max_completion_length")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_completion_length)
    metrics = {
        "kl": float(((kl.detach() * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()),
        "clip_frac": clip_frac,
    }
    return loss, metrics
