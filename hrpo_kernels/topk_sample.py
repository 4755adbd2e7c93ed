"""topk_sample_mix: the top-k tail of the decode epilogue on precomputed fp32 logits.

Given logits (B, V) fp32 and the input embedding E (V, d):
- p = softmax(logits / T) restricted to the top-k logits and renormalised (k <= 128), then,
  with top_p < 1, cut to its nucleus inside the k (latent_input.nucleus) and renormalised;
- token: the exponential race argmax_j p_j / x_j, x_j = -log(u_j) (greedy: argmax of the
  logits over the full vocabulary, lowest id on ties);
- logprob = log_softmax(logits / T)[token] over the FULL vocabulary;
- h_hat = (p @ E) / ||p||_2, fp32.

Seeded noise, shared by every sampling path (this reference, the C++ twin, the CUDA kernel
of csrc/topk_sample.cu and the Triton kernels of sample_and_mix.py):
u[b, v] = philox_uniform(seed, offset + row_ids[b] * V + v) (hrpo_kernels/philox.py,
csrc/philox.h: Philox4x32-10, counter words (lo, hi, 0, 0), key = the seed's halves), race
score logits/T - log(-log u), ties to the lowest token id; row_ids (default arange(B)) let a
caller keep a row's noise when rows are removed or reordered. So (seed, offset, row_ids) fix
the tokens on every path. The extension's top-k set is the keys above the k-th largest logit
plus, on exact ties at it, the lowest token ids. The reference below is the specification;
without a seed it draws its noise from torch (tested statistically) and takes torch.topk's set.
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import (
    check_seed,
    f32_copy,
    host_int,
    row_ids_or_arange,
    row_ids_tensor,
    row_seeds,
    sample_outputs,
    seed_offset,
)
from .latent_input import (
    NOISE_KEY,
    LatentParams,
    check_noise_width,
    kernel_args,
    latent_input_reference,
    mixture_entropy,
    nucleus,
)
from .philox import philox_uniform

MAX_TOPK = 128


def sample_from_logits_reference(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    top_k: int,
    temperature: float,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    tokens: torch.Tensor | None = None,
    *,
    top_p: float = 1.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling tail of both decode-epilogue references (top_k 0: full vocabulary; top_p
    < 1: the nucleus cut inside the top-k set, latent_input.sampling_support).
    `tokens` given: skip the draw and score those tokens (to check a sampler's log-probs).
    `seed` given: the noise of (row b, token v) is philox_uniform(seed, offset + row_ids[b] * V
    + v) (offset default 0, row_ids default arange(B)), the convention of every path;
    otherwise one (B, V) torch.rand draw from `generator`."""
    if temperature <= 0:
        raise ValueError(f"sampling: temperature must be > 0, got {temperature}")
    logits = logits.float()
    scaled = logits / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    B, V = scaled.shape
    idx = None
    if 0 < top_k < V:
        vals, idx = torch.topk(scaled, top_k, dim=-1)
        p = torch.zeros_like(scaled).scatter_(-1, idx, torch.softmax(vals, dim=-1))
    else:
        p = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        p = nucleus(p, top_p)
    if tokens is None and greedy:
        tokens = logits.argmax(dim=-1)
    elif tokens is None and seed is not None:
        tokens = _philox_race(scaled, idx, seed, offset, row_ids, p > 0 if top_p < 1 else None)
    elif tokens is None:
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        tokens = (p / -torch.log(u.clamp_min(1e-20))).argmax(dim=-1)
    tokens = tokens.to(device=logits.device, dtype=torch.int64)
    logprobs = scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm
    h_hat = (p @ f32_copy(embedding)) / p.norm(dim=-1, keepdim=True)  # no 16-bit upcast per step
    return tokens, logprobs, h_hat


def _philox_race(scaled, idx, seed, offset, row_ids, keep=None) -> torch.Tensor:
    """argmax over the candidates (idx, or the full vocabulary; only those `keep` (B, V) holds
    when given: the nucleus) of scaled - log(-log u), u = philox_uniform(seed, offset +
    row_ids[b] * V + v); ties: the lowest token id."""
    B, V = scaled.shape
    dev = scaled.device
    row_ids = row_ids_or_arange(row_ids, B, dev)[:, None]
    if idx is None:
        cand = torch.arange(V, device=dev, dtype=torch.int64).expand(B, V)
    else:
        cand = idx.sort(dim=-1).values  # ascending token ids: argmax's first max is the lowest id
    u = philox_uniform(row_seeds(seed, B), host_int(offset) + row_ids * V + cand)
    score = scaled.gather(-1, cand) - torch.log(-torch.log(u))
    if keep is not None:
        score = score.masked_fill(~keep.gather(-1, cand), float("-inf"))
    return cand.gather(-1, score.argmax(dim=-1, keepdim=True)).squeeze(-1)


def topk_sample_mix_reference(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    k: int,
    temperature: float,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    tokens: torch.Tensor | None = None,
    *,
    top_p: float = 1.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, V), embedding (V, d) -> tokens (B,) int64, logprobs (B,) fp32, h_hat (B, d) fp32.
    seed given: the shared Philox noise (see sample_from_logits_reference)."""
    if k < 1:
        raise ValueError(f"topk_sample_mix: k must be >= 1, got {k}")
    noise = dict(seed=seed, offset=offset, row_ids=row_ids)
    return sample_from_logits_reference(
        logits, embedding, k, temperature, greedy, generator, tokens, top_p=top_p, **noise
    )


def topk_sample_mix(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    k: int,
    temperature: float,
    greedy: bool = False,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    row_ids: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    impl: str | None = None,
    latent: LatentParams | None = None,
    entropy: torch.Tensor | None = None,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatcher. CUDA tensors -> the CUDA kernel when the extension loaded; CPU tensors ->
    the reference, or the C++ twin with impl="ext"; impl="reference" or HRPO_KERNELS=reference
    -> the reference. seed / offset: one-element int64 tensors on the logits' device (no
    host sync; the caller advances offset by >= B * V per step); a missing seed is drawn
    from `generator`. row_ids: (B,) int64 stable row identities (default arange(B)).
    `out` = preallocated (tokens, logprobs, h_hat). The reference ignores seed / offset /
    row_ids unless a seed is given, then draws the shared Philox noise from them. `latent`:
    the third output is that mode's next input (latent_input.py; CPU twin and reference only).
    `entropy`: a (B,) fp32 buffer filled with the mixture's entropy in nats (CPU twin and
    reference only). top_p: the sampler's nucleus inside the k (1: off; the CUDA kernel takes 1 only)."""
    if temperature <= 0:
        raise ValueError(f"topk_sample_mix: temperature must be > 0, got {temperature}")
    B, V = logits.shape
    D = embedding.shape[1]
    mod = _ext.ext_for(logits, impl)
    if mod is None:
        noise = dict(top_p=top_p, seed=seed, offset=offset, row_ids=row_ids)
        res = topk_sample_mix_reference(logits, embedding, k, temperature, greedy, generator, **noise)
        if latent is not None:
            res = res[:2] + (
                latent_input_reference(logits, embedding, res[0], latent, temperature, k, greedy, **noise),
            )
        if entropy is not None:
            entropy.copy_(mixture_entropy(logits, latent, temperature, k, top_p))
        if out is None:
            return res
        for o, r in zip(out, res):
            o.copy_(r)
        return out
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"topk_sample_mix: the extension takes 1 <= k <= {MAX_TOPK}, got {k}")
    seed, offset = seed_offset(seed, offset, generator, logits.device)
    check_seed(seed, B, "topk_sample_mix")
    row_ids = row_ids_tensor(row_ids, B, logits.device)
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        logits = logits.float().contiguous()
    if embedding.stride(-1) != 1:
        embedding = embedding.contiguous()
    tok, lp, h = sample_outputs(out, B, D, logits.device, "topk_sample_mix")
    mode = kernel_args(latent, temperature, min(k, V), top_p)
    if mode["MODE"] == 3:
        check_noise_width(D, V)
    mod.topk_sample_mix(
        logits,
        embedding,
        int(min(k, V)),
        float(temperature),
        bool(greedy),
        seed,
        offset,
        row_ids,
        tok,
        lp,
        h,
        mode["MODE"],
        mode["inv_tm"],
        mode["inv_tau"],
        mode["beta"],
        mode["sigma"],
        mode["inv_logv"],
        NOISE_KEY,
        entropy,
        mode["top_p"],
        mode["mix_top_p"],
    )
    return tok, lp, h
