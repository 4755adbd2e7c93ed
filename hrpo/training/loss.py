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


def per_token_terms(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    beta: float = 0.005,
    epsilon: float = 0.2,
    tis: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token k3 KL, per-token "clipped" flags), all (B, T).

    Without old_logp the ratio is exp(logp - logp.detach()) (one update per rollout: value
    1, gradient of logp); with it, the PPO-clipped ratio against the rollout's log-probs.
    tis: (B, T) truncated importance weights (see tis_weights) multiplying the policy term,
    not the KL term (as TRL's GRPOTrainer applies its importance_sampling_ratio)."""
    adv = advantages[:, None]
    if old_logp is None:
        obj = torch.exp(logp - logp.detach()) * adv
        clipped = torch.zeros_like(logp, dtype=torch.bool)
    else:
        ratio = torch.exp(logp - old_logp)
        bounded = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
        obj = torch.minimum(ratio * adv, bounded * adv)
        clipped = (ratio * adv > bounded * adv).detach()
    per_token = -obj if tis is None else -obj * tis
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return per_token, kl, clipped


def tis_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: min(exp(train_logp - rollout_logp), cap) per token, with
    train_logp the training forward's log-probs of the rollout's tokens and rollout_logp the
    sampler's. The engine samples from merged, rounded weights, so its distribution is not
    quite the trained policy's; this reweights each token's policy term towards the latter,
    as TRL's GRPOTrainer does with vllm_importance_sampling_correction (cap:
    vllm_importance_sampling_cap, default 2.0 there)."""
    return torch.exp(train_logp - rollout_logp).clamp(max=cap)


def token_weights(
    mask: torch.Tensor,
    norm: str = "grpo",
    max_completion_length: int | None = None,
    n_rows: int | None = None,
    n_tokens: int | None = None,
) -> torch.Tensor:
    """(B, T) weights with loss = sum(weights * per_token): "grpo" averages each completion's
    tokens, then the batch; "dapo" averages all tokens of the batch; "dr_grpo" sums tokens
    and divides by B * max_completion_length. n_rows and n_tokens: the batch's totals when
    `mask` is only part of it (a micro-batch, one rank's share)."""
    if norm not in NORMS:
        raise ValueError(f"loss norm must be one of {NORMS}, got {norm!r}")
    mask = mask.float()
    n_rows = mask.shape[0] if n_rows is None else n_rows
    if norm == "grpo":
        return mask / mask.sum(-1, keepdim=True).clamp_min(1) / n_rows
    if norm == "dapo":
        return mask / max(float(mask.sum()) if n_tokens is None else n_tokens, 1.0)
    if not max_completion_length:
        raise ValueError("dr_grpo normalisation needs max_completion_length")
    return mask / (n_rows * max_completion_length)


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
    tis: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise, and metrics. logp, ref_logp, old_logp, mask, tis: (B, T); advantages:
    (B,). The loss is sum(token_weights * per_token_terms) (see both)."""
    weights = token_weights(mask, norm, max_completion_length)
    per_token, kl, clipped = per_token_terms(logp, advantages, ref_logp, old_logp, beta, epsilon, tis)
    loss = (per_token * weights).sum()
    return loss, metrics(metric_sums(kl, clipped, mask), mask.shape[0])


def metric_sums(kl: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(the sum over rows of each row's mean k3 KL, the clipped tokens, the tokens) under mask:
    sums, so micro-batches add them up before `metrics` turns them into means."""
    m = mask.float()
    return (
        float(((kl.detach() * m).sum(-1) / m.sum(-1).clamp_min(1)).sum()),
        float((clipped.float() * m).sum()),
        float(m.sum()),
    )


def metrics(sums: tuple[float, float, float], n_rows: int) -> dict[str, float]:
    """The logged metrics from metric_sums over a batch of n_rows: "kl", the mean over rows of
    each row's mean KL; "clip_frac", the fraction of tokens whose ratio was clipped."""
    kl_sum, n_clipped, n_tokens = sums
    return {"kl": kl_sum / max(n_rows, 1), "clip_frac": n_clipped / max(n_tokens, 1.0)}
