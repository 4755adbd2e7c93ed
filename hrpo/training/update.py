"""The update half of a training step: the reference pass and the policy's forward and backward
over a rollout, lean in memory and time.

- Micro-batches are sized by tokens, not rows: whole GRPO groups, longest first, packed while
  their padded size (distinct prompts x prompt width + rows x completion width) fits
  `micro_batch_tokens`, so long completions cannot blow memory; each micro-batch is trimmed to its
  own widths, so little is spent on padding.
- Within a micro-batch each distinct prompt runs through the body once (HybridModel's
  share_prefix), not once per completion of its group.
- Log-probs never materialise a (tokens x vocabulary) tensor for the backward
  (hrpo_kernels.token_logprobs: fused on the GPU, chunked with recompute on the CPU).
- The loss is sum(token_weights * per_token_terms), with weights computed on the whole batch,
  so the micro-batched gradient is the whole batch's gradient.
- Every rank runs the same number of micro-batches (`length`, agreed by the caller): under
  FSDP each forward is an all-gather and each backward a reduce-scatter, so a rank with a
  shorter plan pads it with zero-weight micro-batches (one row's forward and a backward of
  zero) rather than leave the others waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hrpo.engine.rollout import Rollout
from hrpo.model.hybrid import HybridModel, SequenceBatch, distinct_prompts
from hrpo.training.loss import metric_sums, metrics, per_token_terms, token_weights
from hrpo_kernels.latent_input import LatentParams, gumbel_targets


def group_rows(batch: SequenceBatch) -> list[list[int]]:
    """The rows of each distinct prompt (a GRPO group), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(distinct_prompts(batch.prompt_ids, batch.prompt_mask)[1].tolist()):
        groups.setdefault(g, []).append(row)
    return list(groups.values())


def micro_batches(batch: SequenceBatch, micro_batch_tokens: int) -> list[torch.Tensor]:
    """Row indices of each micro-batch: whole groups, longest first, packed while the padded
    token count stays within micro_batch_tokens (a group larger than that goes alone)."""
    prompt_len = batch.prompt_mask.sum(-1).tolist()  # read once: no host sync per group
    comp_len = batch.completion_mask.sum(-1).tolist()
    groups = [(row_idx, prompt_len[row_idx[0]], max(comp_len[r] for r in row_idx)) for row_idx in group_rows(batch)]
    groups.sort(key=lambda g: -(g[1] + g[2]))
    plans, current, widths = [], [], (0, 0, 0, 0)  # distinct prompts, rows, prompt width, completion width
    for row_idx, p, t in groups:
        n_d, n_r, wp, wt = widths[0] + 1, widths[1] + len(row_idx), max(widths[2], p), max(widths[3], t)
        if current and n_d * wp + n_r * wt > micro_batch_tokens:
            plans.append(torch.tensor(current, device=batch.prompt_ids.device))
            current, (n_d, n_r, wp, wt) = [], (1, len(row_idx), p, t)
        current += row_idx
        widths = (n_d, n_r, wp, wt)
    if current:
        plans.append(torch.tensor(current, device=batch.prompt_ids.device))
    return plans


def trim(batch: SequenceBatch, row_idx: torch.Tensor) -> SequenceBatch:
    """The rows `row_idx` of `batch`, without the prompt columns that are padding in all of them (left)
    and the completion columns past their longest completion (right)."""
    sub = batch.select(row_idx)
    p = int(sub.prompt_mask.sum(-1).max())
    t = max(int(sub.completion_mask.sum(-1).max()), 1)
    return SequenceBatch(
        sub.prompt_ids[:, -p:],
        sub.prompt_mask[:, -p:],
        sub.completion_ids[:, :t],
        sub.completion_mask[:, :t],
        sub.latents[:, :t],
        sub.think_mask[:, :t],
        None if sub.gumbel_ids is None else sub.gumbel_ids[:, :t],
        None if sub.gumbel_values is None else sub.gumbel_values[:, :t],
    )


def padded(plan: list[torch.Tensor], length: int | None) -> Iterator[tuple[torch.Tensor, bool]]:
    """(row_idx, real) for each of `length` micro-batches (None: the plan's own length): the
    plan's, then zero-weight ones on the plan's first row that only make the collectives."""
    yield from ((row_idx, True) for row_idx in plan)
    for _ in range(len(plan), length or 0):
        yield plan[0][:1], False


@dataclass
class UpdateSettings:
    temperature: float
    hybrid: bool
    beta: float
    epsilon: float
    loss_norm: str
    max_completion_length: int
    micro_batch_tokens: int  # padded tokens per micro-batch (--micro-batch-tokens)
    share_prefix: bool = True  # off with gradient checkpointing (it needs the body's KV cache)
    latent: LatentParams = LatentParams()  # the method's thinking inputs (soft tokens: soft-noise)
    top_k: int = 0  # the rollout's, which the soft tokens' (and gumbel-soft's) mixture was taken over

    @property
    def latent_inputs(self) -> bool:
        """Whether the stored latents are themselves the thinking inputs (not blended by a gate)."""
        return self.hybrid and self.latent.mode != "hrpo"


@torch.no_grad()
def _logprobs(
    hm: HybridModel,
    batch: SequenceBatch,
    plan: list[torch.Tensor],
    settings: UpdateSettings,
    hybrid: bool,
    length: int | None,
) -> torch.Tensor:
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)
    for row_idx, real in padded(plan, length):
        sub = trim(batch, row_idx)
        logp = hm.sequence_logprobs(
            sub, settings.temperature, hybrid, settings.share_prefix, settings.latent, settings.top_k
        )
        if real:
            out[row_idx, : sub.completion_ids.shape[1]] = logp
    return out


@torch.no_grad()
def record_gumbel_targets(
    hm: HybridModel, out: Rollout, plan: list[torch.Tensor], settings: UpdateSettings, length: int | None = None
) -> None:
    """gumbel-soft (SofT-GRPO): store in `out` each thinking position's candidates and g' = log p
    + g (latent_input.gumbel_targets), p the mixture of the training forward at the rollout's
    weights (adapters on, before any update; the inputs are the stored ones) and g the rollout's
    Gumbel noise, re-drawn from its Philox seed and rows. SofT-GRPO's rollout sends g' itself;
    its p is the sampler's, equal to the training forward's up to the engine's rounding. Every
    later pass (reference, old, policy) scores this fixed g'. Other methods: nothing to do."""
    if not (settings.latent_inputs and settings.latent.mode == "gumbel-soft"):
        return
    if out.noise_seed is None:
        raise ValueError("gumbel-soft training re-draws the rollout's Gumbel noise: it needs a seeded rollout")
    B, T = out.completion_ids.shape
    k, dev = settings.top_k, out.completion_ids.device
    out.gumbel_ids = torch.zeros(B, T, k, dtype=torch.long, device=dev)
    out.gumbel_values = torch.zeros(B, T, k, dtype=torch.float32, device=dev)
    rows = out.philox_rows()
    for row_idx, real in padded(plan, length):
        sub = trim(out, row_idx)
        h = hm.completion_hidden(sub, True, settings.share_prefix, settings.latent)
        if not real:
            continue
        t = sub.completion_ids.shape[1]
        soft = sub.think_mask & sub.completion_mask
        ids, values = gumbel_targets(
            hm.head_logits(h[soft]), settings.latent, settings.temperature, k, out.noise_seed, rows[row_idx, :t][soft]
        )
        sub_ids, sub_values = (
            torch.zeros_like(out.gumbel_ids[row_idx, :t]),
            out.gumbel_values.new_zeros(len(row_idx), t, k),
        )
        sub_ids[soft], sub_values[soft] = ids, values
        out.gumbel_ids[row_idx, :t], out.gumbel_values[row_idx, :t] = sub_ids, sub_values


def reference_logprobs(
    hm: HybridModel, batch: SequenceBatch, plan: list[torch.Tensor], settings: UpdateSettings, length: int | None = None
) -> torch.Tensor:
    """The reference policy's log-probs (B, T): the base model (adapters off) on plain tokens;
    under soft tokens on the rollout's inputs, so that its thinking positions hold the same
    action's log-density as the policy's (the KL compares like with like)."""
    with hm.adapters_disabled():
        return _logprobs(hm, batch, plan, settings, settings.latent_inputs, length)


def policy_logprobs(
    hm: HybridModel, batch: SequenceBatch, plan: list[torch.Tensor], settings: UpdateSettings, length: int | None = None
) -> torch.Tensor:
    """The policy's log-probs (B, T) from the training forward (adapters on, hybrid as in the
    update), without gradient: the "old" log-probs of a rollout's updates, and the training
    side of its importance-sampling correction."""
    return _logprobs(hm, batch, plan, settings, settings.hybrid, length)


def policy_backward(
    hm: HybridModel,
    batch: SequenceBatch,
    plan: list[torch.Tensor],
    advantages: torch.Tensor,
    ref: torch.Tensor | None,
    old: torch.Tensor | None,
    settings: UpdateSettings,
    scale: float = 1.0,
    n_rows: int | None = None,
    n_tokens: int | None = None,
    length: int | None = None,
    tis: torch.Tensor | None = None,
) -> tuple[float, dict, bool]:
    """Forward and backward of the policy over `length` micro-batches (the plan, padded),
    gradients accumulated into the parameters' .grad (times `scale`). n_rows, n_tokens: the whole
    batch's totals when this is a share of it (for the loss normalisation); tis: (B, T)
    importance weights of the policy terms. Returns (loss, metrics, finite). A non-finite
    micro-batch loss makes it non-finite, but the remaining micro-batches still run (their
    collectives): the caller agrees on it with the other ranks and drops the update."""
    weights = token_weights(batch.completion_mask, settings.loss_norm, settings.max_completion_length, n_rows, n_tokens)
    total, sums, finite = 0.0, (0.0, 0.0, 0.0), True
    for row_idx, real in padded(plan, length):
        sub = trim(batch, row_idx)
        t = sub.completion_ids.shape[1]
        logp = hm.sequence_logprobs(
            sub, settings.temperature, settings.hybrid, settings.share_prefix, settings.latent, settings.top_k
        )
        if not real:
            (logp.sum() * 0.0).backward()
            continue
        per_token, kl, clip = per_token_terms(
            logp,
            advantages[row_idx],
            None if ref is None else ref[row_idx, :t],
            None if old is None else old[row_idx, :t],
            settings.beta,
            settings.epsilon,
            None if tis is None else tis[row_idx, :t],
        )
        loss = (per_token * weights[row_idx, :t]).sum()
        finite = finite and bool(torch.isfinite(loss))
        (loss * scale).backward()
        total += loss.item()
        sums = tuple(a + b for a, b in zip(sums, metric_sums(kl, clip, sub.completion_mask)))
    if not finite:
        return float("nan"), {"kl": float("nan"), "clip_frac": float("nan")}, False
    return total, metrics(sums, batch.completion_ids.shape[0]), True
