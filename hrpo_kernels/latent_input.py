"""latent_input: the rule that turns one decode step's distribution (and its sampled token)
into the next input embedding while the model thinks. One op for five latent modes; this
file holds its parameter object and the pure-torch reference (the specification). The fused
paths compute the same thing in the pass over the vocabulary that already forms the mixture
p @ E: the Triton kernels of sample_and_mix.py (MODE constexpr) and the C++ twin of
csrc/topk_sample_cpu.cpp (TopkArgs.mode). docs/latent-modes.md says the same in prose.

Notation: logits l (B, V) fp32, E (V, d) the input embedding, y the token the sampler drew
(the exponential race of topk_sample.py; greedy: argmax l), C the sampler's candidates
(sampling_support: the top-k set, all V tokens when top_k = 0, then cut to the sampler's
nucleus when its top_p < 1). The mixture distribution is

    p = softmax(l / T_mix) over C (renormalised), then, when LatentParams.top_p < 1, cut to
        its own nucleus (nucleus(): the smallest set of most probable tokens whose mass
        reaches top_p) and renormalised,

T_mix = LatentParams.temperature, or the sampler's temperature when None. So the sampler's
settings (temperature, top-k, top-p) choose the candidates, as Soft Thinking mixes "after
top-k / top-p", and the mode's own numbers reshape the mixture over them. Then:

- hrpo (HRPO, arXiv 2505.18454): x = (p @ E) / ||p||_2, the latent h_hat that the model's
  gate then blends with E[y] (hrpo/gate.py); the op returns h_hat, not the blend.
- soft (Soft Thinking, Zhang et al. 2025, arXiv 2505.15778: the concept token ct = p and its
  embedding sum_k ct[k] e(k)): x = p @ E. The token y is only recorded (what the thinking
  "says"). The cold stop is not part of the op: the op only reports p's entropy in nats
  (mixture_entropy; the fused passes' `entropy` output), and the decode loop acts on it
  (hrpo/engine/rollout.py ColdStop, docs/latent-modes.md).
- moi (Mixture of Inputs, Zhuang et al. 2025, arXiv 2505.14827, the Dirichlet posterior
  mean): w = (H p + (beta + 1 - H) onehot(y)) / (beta + 1), x = w @ E, with H = -sum_v p_v
  log p_v / log n the entropy of p normalised by the log of its candidate count n (the top-k,
  the nucleus, or V), as the authors' code normalises (EvanZhuang/mixinputs,
  gpu_model_runner.py: H / log n over the n mixed candidates; it computes the same w as
  H (p + beta onehot(y)) / (1 + beta) + (1 - H) onehot(y)).
- soft-noise (soft / fuzzy tokens, Butt et al. 2025, arXiv 2509.19170): x = p @ E +
  noise_std * z, z ~ N(0, I_d); fuzzy tokens are this with a T_mix near 0 (the paper: 0.0001;
  soft tokens: 0.5). noise_std is in embedding units.
- gumbel-soft (SofT-GRPO, Zheng et al. 2025, arXiv 2511.06411, the Gumbel-Softmax rollout:
  Gumbel noise on the token log-probabilities): w = softmax((log p + g) / gumbel_tau) over
  p's support, g_v = -log(-log u_v), x = w @ E. The uniforms u are the sampler's race noise
  (below), so the recorded token y is the argmax of w when T_mix is the sampler's
  temperature (our choice: one draw serves both).
Which parts were checked against which text (and which not) is in docs/latent-modes.md.

Noise (the seeded convention of every sampling path, hrpo_kernels/philox.py): the race and
the Gumbel noise of (row b, token v) use u = philox_uniform(seed, offset + row_ids[b] * V + v);
the Gaussian noise of (row b, dimension c) is Box-Muller on the uniforms of the counter
offset + row_ids[b] * V + c under the keys k = seed ^ NOISE_KEY and k + 1 (two more streams;
needs d <= V so that rows never share counters). So (seed, offset, row_ids) fix every input,
whatever the batch layout. greedy draws no noise at all: soft-noise adds none and gumbel-soft
uses g = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ._common import f32_copy, host_int, row_ids_or_arange, row_seeds
from .philox import philox_uniform

MODES = ("hrpo", "soft", "moi", "soft-noise", "gumbel-soft")
MODE_ID = {m: i for i, m in enumerate(MODES)}  # the kernels' MODE constexpr and TopkArgs.mode
NOISE_KEY = 0x5DEECE66D  # seed ^ NOISE_KEY (and that + 1) key the Gaussian streams


@dataclass(frozen=True)
class LatentParams:
    """The latent mode and its numbers (only the mode's own numbers matter):
    temperature: T_mix of the mixture, None = the sampler's (fuzzy tokens: small, e.g. 0.01);
    top_p: the mixture's own nucleus within the sampler's candidates (1: off);
    beta: MoI's concentration (its code's default 1.0, MIXINPUTS_BETA); noise_std: soft-noise's sigma;
    gumbel_tau: gumbel-soft's Gumbel-Softmax temperature."""

    mode: str = "hrpo"
    temperature: float | None = None
    top_p: float = 1.0
    beta: float = 1.0
    noise_std: float = 0.1
    gumbel_tau: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"latent mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"latent temperature must be > 0 (or None: the sampler's), got {self.temperature}")
        check_top_p(self.top_p, "latent")
        if not self.beta >= 0:
            raise ValueError(f"latent beta (MoI concentration) must be >= 0, got {self.beta}")
        if not self.noise_std >= 0:
            raise ValueError(f"latent noise_std must be >= 0, got {self.noise_std}")
        if not self.gumbel_tau > 0:
            raise ValueError(f"latent gumbel_tau must be > 0, got {self.gumbel_tau}")

    @property
    def is_h_hat(self) -> bool:
        """Whether this is HRPO's own latent h_hat (the sampler's distribution, its nucleus
        included, none of its own), which every sampling path computes without the latent op."""
        return self.mode == "hrpo" and self.temperature is None and self.top_p == 1

    @property
    def mode_id(self) -> int:
        return MODE_ID[self.mode]

    def mix_temperature(self, sampler_temperature: float) -> float:
        return self.temperature if self.temperature is not None else sampler_temperature


def check_top_p(top_p: float, what: str) -> None:
    if not 0 < top_p <= 1:
        raise ValueError(f"{what} top_p must be in (0, 1], got {top_p}")


def check_noise_width(D: int, V: int) -> None:
    if D > V:
        raise ValueError(f"latent soft-noise: the Gaussian stream needs d <= V, got d {D}, V {V}")


def gaussian_noise(seed: int | torch.Tensor, offset: int, row_ids: torch.Tensor, D: int, V: int) -> torch.Tensor:
    """(B, D) fp32 standard normals of the soft-noise mode (Box-Muller, see the module doc);
    seed: an int, or each row's key as a (B, 1) tensor (_common.row_seeds)."""
    check_noise_width(D, V)
    c = torch.arange(D, device=row_ids.device, dtype=torch.int64)
    ctr = offset + row_ids.to(torch.int64)[:, None] * V + c
    key = seed ^ NOISE_KEY
    u1, u2 = philox_uniform(key, ctr), philox_uniform(key + 1, ctr)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def gumbel_noise(seed: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log u) of the Philox uniforms at `counters` (fp32, their
    shape): gumbel-soft's noise of (row b, token v) has counter offset + row_ids[b] * V + v."""
    return -torch.log(-torch.log(philox_uniform(seed, counters)))


def mixture_weights(
    logits: torch.Tensor,
    tokens: torch.Tensor | None,
    params: LatentParams,
    temperature: float,
    top_k: int = 0,
    greedy: bool = False,
    *,
    top_p: float = 1.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) fp32 weights w with the next input w @ E (plus soft-noise's Gaussian noise):
    p / ||p|| (hrpo), p (soft, soft-noise), MoI's posterior mean, the Gumbel-Softmax weights.
    What the inspector shows as the tokens an input mixed."""
    B, V = logits.shape
    if not greedy and params.mode in ("soft-noise", "gumbel-soft") and seed is None:
        raise ValueError(f"latent_input: mode {params.mode} draws Philox noise and needs a seed")
    p, x, support = _mixture_p(logits, params, temperature, top_k, top_p)
    if params.mode == "hrpo":
        return p / p.norm(dim=-1, keepdim=True)
    if params.mode == "moi":
        n = min(top_k, V) if top_k > 0 else V  # the candidates before any nucleus, as kernel_args
        H = entropy_nats(p)[:, None] / math.log(max(n, 2))  # one candidate: H = 0 whatever n says
        lam = H / (params.beta + 1)
        return lam * p + (1 - lam) * F.one_hot(tokens.long(), V).to(p.dtype)
    if params.mode == "gumbel-soft":
        g = torch.zeros_like(x)
        if not greedy:
            rid = row_ids_or_arange(row_ids, B, logits.device)
            g = gumbel_noise(row_seeds(seed, B), host_int(offset) + rid[:, None] * V + torch.arange(V, device=x.device))
        logp = torch.log(p.clamp_min(1e-30))
        return torch.softmax(((logp + g) / params.gumbel_tau).masked_fill(~support, float("-inf")), dim=-1)
    return p


def _mixture_p(logits: torch.Tensor, params: LatentParams, temperature: float, top_k: int, top_p: float = 1.0):
    """The mixture distribution p (module docstring), the scores l / T_mix and p's support."""
    logits = logits.float()
    x = logits / params.mix_temperature(temperature)
    support = sampling_support(logits, temperature, top_k, top_p)
    p = torch.softmax(x.masked_fill(~support, float("-inf")), dim=-1)
    if params.top_p < 1:
        p = nucleus(p, params.top_p)
        support = p > 0
    return p, x, support


def entropy_nats(p: torch.Tensor) -> torch.Tensor:
    """(B,) -sum_v p_v log p_v in nats (0 log 0 = 0)."""
    return -torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), 0.0).sum(-1)


def mixture_entropy(
    logits: torch.Tensor, params: LatentParams | None, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """(B,) fp32 entropy in nats of the mixture distribution p (the module docstring's p, before
    any mode's transform or noise): what the fused passes write to `entropy` for Soft Thinking's
    cold stop (hrpo/engine/rollout.py, ColdStop)."""
    return entropy_nats(_mixture_p(logits, params or LatentParams(), temperature, top_k, top_p)[0])


def latent_input_reference(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    tokens: torch.Tensor,
    params: LatentParams,
    temperature: float,
    top_k: int = 0,
    greedy: bool = False,
    *,
    top_p: float = 1.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V), embedding (V, d), tokens (B,) the sampler's draw -> the next input (B, d)
    fp32 of `params.mode` (the module docstring is the definition); top_k / top_p: the
    sampler's. seed / offset / row_ids: the shared Philox noise; a noisy mode without greedy
    needs the seed."""
    noise = dict(top_p=top_p, seed=seed, offset=offset, row_ids=row_ids)
    x = mixture_weights(logits, tokens, params, temperature, top_k, greedy, **noise) @ f32_copy(embedding)
    if params.mode == "soft-noise" and not greedy:
        B, V = logits.shape
        rid = row_ids_or_arange(row_ids, B, logits.device)
        key = row_seeds(seed, B)
        x = x + params.noise_std * gaussian_noise(key, host_int(offset), rid, embedding.shape[1], V)
    return x


def noisy_input_logdensity(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    inputs: torch.Tensor,
    params: LatentParams,
    temperature: float,
    top_k: int = 0,
) -> torch.Tensor:
    """(N,) log N(inputs; mu, noise_std^2 I) with mu = p @ E the soft-noise mixture of `logits`
    (N, V) (latent_input's p: T_mix, the top-k, the nucleus): the log-density of a soft token
    under the policy (Soft Tokens, Hard Truths, arXiv 2509.19170: the thinking positions' term of the
    policy gradient). Differentiable in logits and embedding."""
    if params.mode != "soft-noise" or not params.noise_std > 0:
        raise ValueError(f"noisy_input_logdensity: needs the soft-noise mode with noise_std > 0, got {params}")
    mu = mixture_weights(logits, None, params, temperature, top_k, greedy=True) @ embedding.float()
    var = params.noise_std**2
    d = inputs.shape[-1]
    return -((inputs.float() - mu) ** 2).sum(-1) / (2 * var) - 0.5 * d * math.log(2 * math.pi * var)


# SofT-GRPO's numbers (its verl fork, verl/utils/torch_functional.py:152-154): the Gumbel
# variable is clamped to [-1.5, 3] and only candidates with log p > -3 are averaged.
GUMBEL_CLAMP = (-1.5, 3.0)
GUMBEL_MIN_LOGP = -3.0


def gumbel_targets(
    logits: torch.Tensor, params: LatentParams, temperature: float, top_k: int, seed: int, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SofT-GRPO's record of a gumbel-soft input at N thinking positions (its g'): the mixture's
    candidates ids (N, k), the top_k of `logits` (N, V), and g' = log p + g (N, k) fp32 at
    them, p the mixture distribution (T_mix, the top-k) and g the rollout's Gumbel noise, so
    that the input's weights were softmax(g' / gumbel_tau). rows (N,): each position's Philox
    row, counter rows * V + v (the step's offset folded in)."""
    N, V = logits.shape
    if params.mode != "gumbel-soft" or params.top_p < 1 or not 0 < top_k <= V:
        raise ValueError(
            f"gumbel_targets: needs gumbel-soft without a nucleus and 0 < top_k <= {V}, got {params}, {top_k}"
        )
    p = mixture_weights(logits, None, replace(params, mode="soft"), temperature, top_k, greedy=True)
    ids = torch.topk(logits, top_k, dim=-1).indices  # the support mixture_weights takes
    g = gumbel_noise(seed, rows.to(torch.int64)[:, None] * V + ids)
    return ids, torch.log(p.gather(-1, ids).clamp_min(1e-30)) + g


def gumbel_logdensity(
    logits: torch.Tensor, ids: torch.Tensor, g_prime: torch.Tensor, params: LatentParams, temperature: float
) -> torch.Tensor:
    """(N,) SofT-GRPO's log-probability of a soft token (arXiv 2511.06411, the Gumbel
    reparameterisation; its code: verl/utils/torch_functional.py:140-163): the stored g' is a
    draw of Gumbel(log p_theta, 1) with p_theta the policy's mixture over the stored candidates
    `ids` (softmax of logits / T_mix, renormalised over them), so each candidate scores
    log f(e) = -e - exp(-e), e = clamp(g' - log p_theta, -1.5, 3), and the position the mean
    over its candidates with log p_theta > -3 (all of them when none is; ours: with top-k <= 20
    some always is). Differentiable in logits through log p_theta."""
    logp = torch.log_softmax(logits.float().gather(-1, ids) / params.mix_temperature(temperature), dim=-1)
    e = (g_prime.float() - logp).clamp(*GUMBEL_CLAMP)
    keep = logp.detach() > GUMBEL_MIN_LOGP
    keep = keep | ~keep.any(-1, keepdim=True)
    return ((-e - torch.exp(-e)) * keep).sum(-1) / keep.sum(-1)


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """p (B, V), rows summing to 1, cut to its nucleus and renormalised: the tokens ranked by
    probability, the lower token id first among equal ones, each kept when the mass of the
    tokens ranked above it is < top_p. So the kept set is the smallest whose mass reaches
    top_p and the most probable token always stays. The rule of HF's TopPLogitsWarper
    (transformers/generation/logits_process.py: drop the tokens whose ascending cumulative
    mass is <= 1 - top_p), with the tie order fixed. The definition for the sampler and the
    mixture alike; the fused paths compute the same set (ranks within the top-k, a threshold
    search over the full vocabulary)."""
    sp, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sp, dim=-1) - sp  # mass of the tokens ranked above
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, idx, before < top_p)
    q = p * keep
    return q / q.sum(-1, keepdim=True)


def sampling_support(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) bool: the sampler's candidates. The top_k largest logits (all V when top_k is 0
    or >= V), then, when top_p < 1, the nucleus of softmax(logits / temperature) over them:
    top-k first, the nucleus cut inside it: the order of HF's warpers (transformers 5.24,
    generation/utils.py:1622-1629, TopKLogitsWarper then TopPLogitsWarper) and of the original
    HRPO rollout, which forms its latent from the probabilities after those warpers (the
    paper's patched transformers/generation/utils.py:3328,3351,3369-3372)."""
    B, V = logits.shape
    support = torch.ones_like(logits, dtype=torch.bool)
    if 0 < top_k < V:
        support = torch.zeros_like(support).scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
    if top_p < 1:
        p = torch.softmax((logits.float() / temperature).masked_fill(~support, float("-inf")), dim=-1)
        support = nucleus(p, top_p) > 0
    return support


def kernel_args(params: LatentParams | None, temperature: float, n_candidates: int, top_p: float = 1.0) -> dict:
    """The numbers the fused paths take for a mode and the sampler's nucleus (Triton kernel
    arguments, TopkArgs fields; a nucleus of 1 is off); n_candidates: the size of p's candidate
    set before any nucleus (min(top_k, V), or V), MoI's log n."""
    params = params or LatentParams()
    check_top_p(top_p, "sampling")
    return dict(
        top_p=float(top_p),
        mix_top_p=float(params.top_p),
        MODE=params.mode_id,
        inv_tm=1.0 / params.mix_temperature(temperature),
        inv_tau=1.0 / params.gumbel_tau,
        beta=float(params.beta),
        sigma=float(params.noise_std),
        inv_logv=1.0 / math.log(n_candidates) if n_candidates > 1 else 0.0,
    )
