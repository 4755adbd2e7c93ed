"""The reference hybrid rollout: a plain KV-cached decode loop over a Hugging Face model.

Each step samples x_t from p_t, records log p(x_t), the latent h_hat_t = (p_t @ E)/||p_t||
and whether the row is still thinking (the marker is not yet in its text, x_t included),
then feeds the gate's blend of E[x_t] and h_hat_t as stored (in latent_dtype), or plain
E[x_t], as the next input.

seed given: step t's race noise is philox_uniform(seed, t * B * V + row * V + token) with
`row` the row's index in the call's batch (hrpo_kernels.philox), a function of (seed, row,
step, token) only, so prefix sharing and compaction leave every draw, hence every token,
unchanged. row_span=(first, total): the call's rows are rows first.. of a batch of `total`
(one rank's share of a data-parallel batch), and draw that batch's noise. share_prefix: each
distinct prompt is prefilled once and its cache rows copied to its duplicates.
compact_below: when the fraction of live rows falls under it, finished rows leave the cache
and the step state; results still land at their original rows.
Finished rows record pad tokens, log-prob 0, a zero latent and no thinking.

Under FSDP every forward of the body is a collective, so a rank whose rows have all finished
keeps stepping (on finished rows) until every rank's have; its result is still cut at the
step its own rows finished, so the rollout is the one a single process draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from hrpo.core.distributed import forward_group
from hrpo.core.marker import MarkerMatcher
from hrpo.model.hybrid import HybridModel, SequenceBatch, cache_index_select, distinct_prompts, positions_from_mask
from hrpo_kernels import sample_and_mix
from hrpo_kernels.latent_input import LatentParams


@dataclass(frozen=True)
class ColdStop:
    """Soft Thinking's cold stop (Zhang et al. 2025, arXiv 2505.15778; docs/latent-modes.md
    says where each part comes from). At each step of a row that is still thinking, H is the
    entropy in nats of the step's mixture distribution p (latent_input.mixture_entropy: T_mix,
    the sampler's top-k, the latent nucleus), computed in the sampling pass. The row's counter
    c becomes c + 1 when H < entropy, else 0; the step at which c reaches `steps` emits the
    answer marker's first token instead of its draw, and the next steps its remaining tokens
    (forced, as if sampled: recorded log-prob 0), each fed as a plain token embedding. Once the
    marker is written the row decodes in plain tokens as any row past its marker."""

    entropy: float  # the threshold tau, in nats
    steps: int  # consecutive low-entropy steps k

    def __post_init__(self):
        if not self.entropy > 0:
            raise ValueError(f"cold stop: the entropy threshold must be > 0 (nats), got {self.entropy}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"cold stop: steps must be an int >= 1, got {self.steps!r}")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 1.0  # the nucleus cut inside the top-k (1: off; hrpo_kernels/latent_input.py)
    greedy: bool = False
    hybrid: bool = True  # thinking positions take a latent input (else every input is E[token])
    latent: LatentParams = LatentParams()  # what that input is (hrpo_kernels/latent_input.py)
    cold_stop: ColdStop | None = None  # Soft Thinking's early end of thinking (off: None)

    def __post_init__(self):
        if self.cold_stop is None:
            return
        if not self.hybrid:
            raise ValueError("cold stop ends the thinking phase, and plain decoding (hybrid off) has none")
        if self.latent.mode == "gumbel-soft":
            raise ValueError("cold stop reads the entropy of p; gumbel-soft's pass mixes the noisy weights instead")


@dataclass
class Rollout(SequenceBatch):
    logprobs: torch.Tensor = None  # (B, T) fp32 log p(x_t) at the sampling temperature
    gate_mean: torch.Tensor = None  # (B,) mean gate coefficient a over thinking positions
    stats: dict | None = None  # timing counters (the engine's)
    # A seeded rollout's Philox noise (the module doc): its seed, each row's row in the batch of
    # noise_total rows. What gumbel-soft training re-draws the rollout's Gumbel noise from.
    noise_seed: int | None = None
    noise_rows: torch.Tensor | None = None  # (B,) long
    noise_total: int | None = None

    def philox_rows(self) -> torch.Tensor:
        """(B, T) long: the Philox row of each completion position; step t of a row drew the
        counters philox_row * V + v (the step's offset t * total * V folded in)."""
        T = self.completion_ids.shape[1]
        steps = torch.arange(T, device=self.noise_rows.device)
        return steps[None, :] * self.noise_total + self.noise_rows[:, None]

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


def thinking_input(
    hm: HybridModel,
    e: torch.Tensor,
    latent: torch.Tensor,
    think: torch.Tensor,
    params: LatentParams,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next inputs from the token embeddings e (B, d) and the stored latents (B, d): at
    thinking positions, the gate's blend (hrpo; also its coefficients a) or the latent itself
    (the training-free modes, whose latent is the next input); elsewhere e."""
    if params.mode == "hrpo":
        return hm.gate(e, latent, think, impl=impl)
    return torch.where(think[:, None], latent.to(e.dtype), e), None


def cold_stop_step(
    threshold: float | torch.Tensor,
    steps: int | torch.Tensor,
    count: torch.Tensor,
    entropy: torch.Tensor,
    thinking: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    marker_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the cold stop (ColdStop's entropy threshold and steps; scalars, or (B,) per
    row) in device ops only, so a captured step holds it. count (B,) int64, updated in place:
    consecutive low-entropy steps, then (once >= steps) one more per forced token, so that
    count - steps indexes marker_ids. thinking: the rows still thinking before this step.
    Returns (tokens, logprobs, forced)."""
    grown = torch.where((count >= steps) | (entropy < threshold), count + 1, 0)
    count.copy_(torch.where(thinking, grown, count))
    forced = thinking & (count >= steps)
    # a forced marker always completes the marker, so the index stays below its length
    forced_tok = marker_ids[(count - steps).clamp(0, marker_ids.numel() - 1)]
    return torch.where(forced, forced_tok, tokens), logprobs.masked_fill(forced, 0.0), forced


# long: the reference decode loop, kept whole so each step reads in order against the fast engine it checks
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
    seed: int | None = None,
    share_prefix: bool = False,
    compact_below: float = 0.0,
    row_span: tuple[int, int] | None = None,
) -> Rollout:
    device = hm.lm_weight.device
    B = len(prompts)
    first, total = row_span or (0, B)
    V = hm.lm_weight.shape[0]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    eos = torch.tensor(eos_ids, device=device)
    E = hm.embed.weight

    cache = DynamicCache(config=hm.config)
    attn = prompt_mask
    if share_prefix:
        rep, inverse = distinct_prompts(prompt_ids, prompt_mask)
        u_ids, u_mask = prompt_ids[rep], prompt_mask[rep]  # same width: the layout of the full batch
        hidden = hm.decoder(hm.embed(u_ids), u_mask, positions_from_mask(u_mask), cache)[:, -1]
        if len(rep) < B:
            cache_index_select(cache, inverse)
        hidden = hidden[inverse]
    else:
        hidden = hm.decoder(hm.embed(prompt_ids), attn, positions_from_mask(attn), cache)[:, -1]
    pos = prompt_mask.sum(-1, keepdim=True)

    act = torch.arange(B, device=device)  # original row of each live cache row
    compacted = False
    states = matcher.initial(B, device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    gate_sum = torch.zeros(B, device=device)
    gate_n = torch.zeros(B, device=device)
    peers = forward_group(hm)  # ranks that must decode as many steps as this one
    steps = None  # the steps this rank's own rows took
    cold = torch.zeros(B, dtype=torch.int64, device=device)  # the cold stop's counters
    entropy = torch.zeros(B, dtype=torch.float32, device=device) if cfg.cold_stop else None
    marker_ids = torch.tensor(matcher.marker_ids, device=device)
    tokens, alive, logps, latents, thinks = [], [], [], [], []
    for step in range(cfg.max_new_tokens):
        noise = {}
        if seed is not None:
            noise = dict(seed=int(seed), offset=step * total * V, row_ids=act + first if compacted or first else None)
        ent = None if entropy is None else entropy[: len(act)]
        tok, lp, h_hat = sample_and_mix(
            hidden,
            hm.lm_weight,
            E,
            cfg.temperature,
            cfg.top_k,
            cfg.greedy,
            generator,
            **noise,
            latent=cfg.latent,
            entropy=ent,
            top_p=cfg.top_p,
        )
        forced = torch.zeros_like(finished)
        if cfg.cold_stop:
            thinking = ~finished & ~matcher.found(states)
            cs = cfg.cold_stop
            tok, lp, forced = cold_stop_step(cs.entropy, cs.steps, cold, ent, thinking, tok, lp, marker_ids)
        tok = tok.masked_fill(finished, pad_id)
        states = matcher.advance(states, tok)
        think = ~finished & ~matcher.found(states) & ~forced if cfg.hybrid else torch.zeros_like(finished)
        lat = h_hat.to(latent_dtype).masked_fill(finished[:, None], 0.0)
        # Scatter the live rows back to their original rows (the identity until compaction).
        tok_f = torch.full((B,), pad_id, dtype=tok.dtype, device=device).index_copy(0, act, tok)
        alive_f = torch.zeros(B, dtype=torch.bool, device=device).index_copy(0, act, ~finished)
        lp_f = torch.zeros(B, dtype=lp.dtype, device=device).index_copy(0, act, lp.masked_fill(finished, 0.0))
        lat_f = torch.zeros(B, lat.shape[1], dtype=lat.dtype, device=device).index_copy(0, act, lat)
        think_f = torch.zeros(B, dtype=torch.bool, device=device).index_copy(0, act, think)
        tokens.append(tok_f)
        alive.append(alive_f)
        logps.append(lp_f)
        latents.append(lat_f)
        thinks.append(think_f)
        # The input is made from the latent as stored, so the training forward re-creates it.
        x, a = thinking_input(hm, hm.embed(tok), lat, think, cfg.latent)
        if a is not None:
            gate_sum.index_add_(0, act, torch.where(think, a.mean(-1), 0.0))
            gate_n.index_add_(0, act, think.to(gate_n.dtype))
        finished = finished | torch.isin(tok, eos)
        done = bool(finished.all())
        if done and steps is None:
            steps = step + 1
        if done if peers is None else not peers.any(not done):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        live = ~finished
        n_live = int(live.sum())
        if compact_below > 0 and 0 < n_live < compact_below * B and n_live < live.numel():
            keep = live.nonzero().squeeze(-1)
            cache_index_select(cache, keep)
            act, states, finished, cold = act[keep], states[keep], finished[keep], cold[keep]
            attn, pos, x = attn[keep], pos[keep], x[keep]
            compacted = True
        hidden = hm.decoder(x[:, None], attn, pos, cache)[:, -1]
        pos = pos + 1

    T = steps or len(tokens)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens[:T], 1),
        completion_mask=torch.stack(alive[:T], 1),
        latents=torch.stack(latents[:T], 1),
        think_mask=torch.stack(thinks[:T], 1),
        logprobs=torch.stack(logps[:T], 1),
        gate_mean=torch.where(gate_n > 0, gate_sum / gate_n.clamp_min(1), float("nan")),
        noise_seed=seed,
        noise_rows=None if seed is None else torch.arange(first, first + B, device=device),
        noise_total=total,
    )
