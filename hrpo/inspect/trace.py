"""Per-position traces of a hybrid completion.

Conventions (those of hrpo/engine/rollout.py): at step t the model's distribution p_t gives the
token x_t and the latent h_hat_t = (p_t @ E) / ||p_t||; the next input is the gate's blend

    input_{t+1} = a_t * E[x_t] + sqrt(1 - a_t^2) * (i_t * h_hat_t),
    a_t = exp(-c softplus(-Lambda) r_t),  r_t = sigmoid(W_r E[x_t] + b_r)

while the row is thinking, else plain E[x_t]. A Position t therefore shows x_t, whether the
row was still thinking after x_t (the marker not yet in the text, x_t included), the gate
coefficient mean_channels(a_t) of the blend that fed E[x_t] and h_hat_t into step t+1 (None
where nothing was blended), and the tokens whose input embeddings are nearest (cosine) to
h_hat_t as stored (rounded to the engine's latent dtype, as the model was fed it).

Under a training-free latent mode (hrpo_kernels/latent_input.py: soft, moi, soft-noise,
gumbel-soft) the latent is itself the next input at thinking positions (no gate), and a
Position also shows which tokens that input mixed: the largest weights of w_t, the input
being w_t @ E (replay() computes them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import thinking_input
from hrpo.engine.rollout_engine import EngineOptions
from hrpo.model.hybrid import HybridModel, SequenceBatch, positions_from_mask
from hrpo_kernels.latent_input import LatentParams, mixture_weights


@dataclass
class Position:
    token: str  # the token's text, decoded alone
    thinking: bool  # the marker is not yet in the completion, this token included
    gate: float | None  # mean over channels of a_t; None where the input was not blended
    nearest: list[tuple[str, float]]  # (token text, cosine similarity to h_hat_t), best first
    mixed: list[tuple[str, float]] = field(default_factory=list)  # (token text, weight in w_t), largest first


@dataclass
class Trace:
    prompt: str  # the user message
    positions: list[Position]
    recorded: dict = field(default_factory=dict)  # what a samples line said about this completion

    @property
    def gate_mean(self) -> float | None:
        """Mean gate coefficient over blended positions (the rollout's gate_mean)."""
        gates = [p.gate for p in self.positions if p.gate is not None]
        return sum(gates) / len(gates) if gates else None


def nearest_tokens(h: torch.Tensor, embedding: torch.Tensor, k: int, chunk: int = 256):
    """(cosine similarities, token ids), each (n, k) best first: the k rows of `embedding`
    (V, d) nearest to each row of h (n, d). Chunked: n x V similarities of a real
    vocabulary do not fit in memory at once."""
    unit = F.normalize(embedding.float(), dim=-1)
    h = F.normalize(h.float(), dim=-1)
    parts = [(h[i : i + chunk] @ unit.T).topk(min(k, unit.shape[0]), dim=-1) for i in range(0, h.shape[0], chunk)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def thinking_flags(matcher: MarkerMatcher, ids: torch.Tensor) -> list[bool]:
    """Whether the row is still thinking after each token of `ids` (1-D)."""
    state, flags = matcher.initial(1, ids.device), []
    for tok in ids:
        state = matcher.advance(state, tok.view(1))
        flags.append(not bool(matcher.found(state)))
    return flags


@torch.no_grad()
def describe(
    hm: HybridModel,
    tokenizer,
    matcher: MarkerMatcher,
    batch: SequenceBatch,
    k: int,
    latent: LatentParams = LatentParams(),
    mixed: list | None = None,
) -> list[list[Position]]:
    """The positions of every completion row of `batch` (a rollout or a teacher-forced replay);
    `mixed`: per row, replay()'s (token ids, weights) of each position's mixture."""
    E = hm.embed.weight
    vocab = min(E.shape[0], len(tokenizer))  # rows past the tokenizer's are padding that never decodes
    text = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))
    rows = []
    for r, (ids, mask, latents, blended) in enumerate(
        zip(batch.completion_ids, batch.completion_mask, batch.latents, batch.think_mask)
    ):
        ids, latents, blended = ids[mask], latents[mask], blended[mask]
        if ids.numel() == 0:
            rows.append([])
            continue
        # a depends only on E[x_t] and the gate; recomputed exactly as the rollout blended it.
        _, a = hm.gate(hm.embed(ids), latents, blended)
        gated = blended if latent.mode == "hrpo" else torch.zeros_like(blended)  # the other modes have no gate
        sims, near = nearest_tokens(latents, E[:vocab], k)
        mix = mixed[r] if mixed is not None else [([], [])] * len(ids)
        rows.append(
            [
                Position(
                    text(t),
                    think,
                    g if b else None,
                    [(text(i), s) for i, s in zip(n_ids, n_sims)],
                    [(text(i), w) for i, w in zip(*m)],
                )
                for t, think, b, g, n_ids, n_sims, m in zip(
                    ids.tolist(),
                    thinking_flags(matcher, ids),
                    gated.tolist(),
                    a.mean(-1).tolist(),
                    near.tolist(),
                    sims.tolist(),
                    mix,
                )
            ]
        )
    return rows


def teacher_force(
    hm: HybridModel,
    prompt: list[int],
    completion: list[int],
    matcher: MarkerMatcher,
    temperature: float,
    top_k: int,
    hybrid: bool = True,
    latent_dtype: torch.dtype = EngineOptions.latent_dtype,
) -> SequenceBatch:
    """The hybrid recurrence of hrpo.engine.rollout with the tokens given instead of drawn: the
    latents and blends are those this model produces along `completion` (one row). h_hat
    depends on temperature and top_k (as in the rollout), the drawn token never does."""
    return replay(hm, prompt, completion, matcher, temperature, top_k, hybrid, latent_dtype=latent_dtype)[0]


@torch.no_grad()
def replay(
    hm: HybridModel,
    prompt: list[int],
    completion: list[int],
    matcher: MarkerMatcher,
    temperature: float,
    top_k: int,
    hybrid: bool = True,
    latent: LatentParams = LatentParams(),
    latent_dtype: torch.dtype = EngineOptions.latent_dtype,
    k: int = 5,
    top_p: float = 1.0,
):
    """teacher_force under a latent mode (greedy: no noise), and per position the k tokens of
    largest weight in the mixture w_t its latent is made of: (batch, [(token ids, weights)]).
    top_k / top_p: the sampler's candidates, as in the rollout."""
    device = hm.lm_weight.device
    ids = torch.tensor([prompt], device=device)
    forced = torch.tensor(completion, dtype=torch.long, device=device)
    attn = torch.ones_like(ids, dtype=torch.bool)
    cache = DynamicCache(config=hm.config)
    hidden = hm.decoder(hm.embed(ids), attn, positions_from_mask(attn), cache)[:, -1]
    state = matcher.initial(1, device)
    latents, thinks, mixed = [], [], []
    for t, tok in enumerate(forced):
        tok = tok.view(1)
        logits = hidden.float() @ hm.lm_weight.float().T
        w = mixture_weights(logits, tok, latent, temperature, top_k, greedy=True, top_p=top_p)
        top = w.topk(min(k, w.shape[-1]), dim=-1)
        mixed.append((top.indices[0].tolist(), top.values[0].tolist()))
        state = matcher.advance(state, tok)
        think = ~matcher.found(state) if hybrid else torch.zeros(1, dtype=torch.bool, device=device)
        lat = (w @ hm.embed.weight.float()).to(latent_dtype)
        latents.append(lat)
        thinks.append(think)
        if t + 1 < len(forced):
            x, _ = thinking_input(hm, hm.embed(tok), lat, think, latent)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            hidden = hm.decoder(x[:, None], attn, torch.tensor([[len(prompt) + t]], device=device), cache)[:, -1]
    T, d = len(completion), hm.embed.weight.shape[1]
    batch = SequenceBatch(
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids, dtype=torch.bool),
        completion_ids=forced.view(1, T),
        completion_mask=torch.ones(1, T, dtype=torch.bool, device=device),
        latents=torch.cat(latents).view(1, T, d)
        if latents
        else torch.zeros(1, 0, d, dtype=latent_dtype, device=device),
        think_mask=torch.cat(thinks).view(1, T) if thinks else torch.zeros(1, 0, dtype=torch.bool, device=device),
    )
    return batch, mixed
