"""The decode epilogue: lm-head, temperature, top-k, a seeded sample, the sampled token's
log-prob, and the latent mixture h_hat = (p @ E) / ||p||_2.

Conventions the kernels must keep:
- p is softmax(logits / temperature) restricted to the top-k logits and renormalised
  (top_k = 0: the full vocabulary), then, with top_p < 1, cut to its nucleus inside the top-k
  and renormalised (latent_input.nucleus). The sample and h_hat come from p.
- logprob is log_softmax(logits / temperature) of the chosen token over the full
  vocabulary: the policy's log-prob, the same quantity the training forward computes, so
  rollout log-probs serve directly as the old log-probs of the clipped objective.
- The sample is an exponential race, argmax(p / x) with x ~ Exp(1) drawn as -log(u) from
  one (B, V) uniform draw per step; greedy takes argmax of the logits instead.
- Seeded, every path (the reference, the C++ twin, the CUDA extension, the Triton kernels)
  draws the same noise u[b, v] = philox_uniform(seed, offset + row_ids[b] * V + v)
  (hrpo_kernels/philox.py) and scores logits/T - log(-log u), ties to the lowest token id,
  so (seed, offset, row_ids) fix the tokens whichever path runs.
"""

from __future__ import annotations

import torch

from ._common import (
    cdiv,
    check_seed,
    cpu_logits,
    derived,
    f32_copy,
    interpreting,
    mm_f32,
    next_pow2,
    num_sms,
    on_gpu_path,
    row_ids_tensor,
    sample_outputs,
    seed_offset,
    use_fused,
)
from ._ext import load_extension
from ._triton_helpers import lazy_kernels
from .latent_input import (
    NOISE_KEY,
    LatentParams,
    check_noise_width,
    check_top_p,
    kernel_args,
    latent_input_reference,
    mixture_entropy,
)
from .topk_sample import MAX_TOPK, sample_from_logits_reference, topk_sample_mix


def sample_and_mix_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    embedding: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    *,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    latent: LatentParams | None = None,
    top_p: float = 1.0,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, d), lm_weight (V, d), embedding (V, d) -> tokens (B,) int64,
    logprobs (B,) fp32, h_hat (B, d) fp32 (with `latent`: that mode's next input,
    latent_input.py). seed given: u[b, v] = philox_uniform(seed, offset + row_ids[b] * V + v)
    (every path's convention), else a `generator` draw (a latent mode: one seed drawn from it,
    so that the race and the mode's noise share the draw). top_p: the sampler's nucleus.
    `entropy` (B,) fp32 given: filled with the entropy of the mixture distribution p in nats
    (latent_input.mixture_entropy)."""
    if temperature <= 0:
        raise ValueError(f"sample_and_mix: temperature must be > 0, got {temperature}")
    check_top_p(top_p, "sampling")
    logits = hidden.float() @ f32_copy(lm_weight).T  # the same values as .float(), upcast once per version
    if latent is not None and seed is None and not greedy:
        seed, offset = seed_offset(None, offset, generator, logits.device)
    noise = dict(top_p=top_p, seed=seed, offset=offset, row_ids=row_ids)
    tok, lp, h = sample_from_logits_reference(logits, embedding, top_k, temperature, greedy, generator, **noise)
    if latent is not None:
        h = latent_input_reference(logits, embedding, tok, latent, temperature, top_k, greedy, **noise)
    if entropy is not None:
        entropy.copy_(mixture_entropy(logits, latent, temperature, top_k, top_p))
    return tok, lp, h


# ---------------------------------------------------------------------------------------
# Fused Triton path.
#
# Randomness: the race noise of token v in row r is x = -log(u), u = philox_uniform(seed,
# offset + row_ids[r] * V + v) (row_ids default arange(B)), the same counter in both modes
# and the reference's, so (seed, offset, row_ids) fix the tokens of a step. The engine passes
# them as int64 device tensors (read inside the kernels: no host sync, capturable in a CUDA
# graph) and advances the offset by at least B * V per decode step.
# ---------------------------------------------------------------------------------------

# bound by lazy_kernels at the first launch (_triton_helpers.py), the rest by _define_kernels
triton = tl = dot_p = philox_uniform = gaussian = mode_input = row_counter = masked_softmax = mass_above = None
kept = probs = nucleus_cut = support = lse_argmax = cand_softmax = None
MAX_TOPK_TRITON = 1024
# Widest hidden size of the one-pass kernel by weight element size: its (BLOCK_V x
# next_pow2(d)) weight tiles must fit the 227 KB of shared memory of an sm_90 block
# (tests/sm90_compile.py compiles it for an H100: bf16 / fp16 d 2048 takes 192 KB, d 3072
# 384 KB; fp32 d 1024 192 KB, d 1536 256 KB). Wider models sample through the reference.
MAX_D_FULL_VOCAB = {2: 2048, 4: 1024}


def full_vocab_fits(d: int, weight: torch.Tensor) -> bool:
    return d <= MAX_D_FULL_VOCAB.get(weight.element_size(), 0)


def _mode_input(hv, e_ptr, tok, stride_e, dk, dok, lam, sigma, key, ctr, MODE: tl.constexpr, GREEDY: tl.constexpr):
    """Columns dk of the next input from the mixture's columns hv (both epilogues): MoI blends
    in the drawn token's embedding, soft-noise adds sigma * N(0, 1) from Philox (key, ctr + dk)."""
    if MODE == 2:
        e_tok = tl.load(e_ptr + tok.to(tl.int64) * stride_e + dk, mask=dok, other=0.0).to(tl.float32)
        hv = lam * hv + (1.0 - lam) * e_tok
    if MODE == 3 and not GREEDY:
        hv += sigma * gaussian(key, ctr + dk)
    return hv


def _row_counter(off_ptr, rid_ptr, row, V, HAS_ROW_IDS: tl.constexpr):
    """The noise counter of (row, token 0): offset + row_ids[row] * V (row_ids default arange)."""
    if HAS_ROW_IDS:
        rid = tl.load(rid_ptr + row)
    else:
        rid = row.to(tl.int64)
    return tl.load(off_ptr) + rid * V


def _masked_softmax(x, ok):
    """softmax of x over the lanes `ok` (at least one), 0 elsewhere."""
    x = tl.where(ok, x, float("-inf"))
    e = tl.where(ok, tl.exp(x - tl.max(x, axis=0)), 0.0)
    return e / tl.sum(e, axis=0)


def _mass_above(p, ids):
    """Per lane j, the mass of the lanes ranked above it (by p, the lower token id first among
    equal p): latent_input.nucleus keeps j when this is < top_p. O(K^2) on K <= 128 lanes,
    no sort; lanes off the set carry p = 0 and add nothing."""
    above = (p[:, None] > p[None, :]) | ((p[:, None] == p[None, :]) & (ids[:, None] < ids[None, :]))
    return tl.sum(tl.where(above, p[:, None], 0.0), axis=0)


# The full-vocabulary nucleus (top_k = 0) finds its cut without a sort: a binary search over
# the bit patterns of the probabilities (non-negative floats order as their int32 bits) for
# kt, the smallest value whose strictly larger tokens hold less than top_p, 30 passes over the
# row's logits; then the tokens tied at kt are kept in id order while the mass above stays
# below top_p (kid: the last kept id). Kept: bits > kt, or bits == kt and id <= kid.


def _kept(p, cols, kt, kid):
    bits = p.to(tl.int32, bitcast=True)
    return (bits > kt) | ((bits == kt) & (cols <= kid))


def _probs(lrow, cols, ok, inv, m, s, inv_c, m_c, s_c, kt_c, kid_c, CUT: tl.constexpr):
    """p[cols] = e^(l inv - m) / s on the lanes `ok`, and, when CUT, on the
    candidates of the nucleus (inv_c, m_c, s_c, kt_c, kid_c) only; 0 elsewhere."""
    lg = tl.load(lrow + cols, mask=ok, other=float("-inf"))
    on = ok
    if CUT:
        on = on & kept(tl.where(ok, tl.exp(lg * inv_c - m_c) / s_c, 0.0), cols, kt_c, kid_c)
    return tl.where(on, tl.exp(lg * inv - m) / s, 0.0)


def _nucleus_cut(lrow, V, inv, m, s, inv_c, m_c, s_c, kt_c, kid_c, top_p, CUT: tl.constexpr, BLOCK_V: tl.constexpr):
    """(kt, kid) of the nucleus of mass top_p of _probs' distribution (see above)."""
    lane = tl.arange(0, BLOCK_V)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x3F800000, tl.int32)  # the bits of 1.0
    for _ in range(30):  # 2^30 > the bits of 1.0
        mid = lo + (hi - lo) // 2
        mass = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lane
            p = probs(lrow, cols, cols < V, inv, m, s, inv_c, m_c, s_c, kt_c, kid_c, CUT)
            mass += tl.sum(tl.where(p.to(tl.int32, bitcast=True) > mid, p, 0.0), axis=0)
        below = mass < top_p
        hi = tl.where(below, mid, hi)
        lo = tl.where(below, lo, mid + 1)
    above = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lane
        p = probs(lrow, cols, cols < V, inv, m, s, inv_c, m_c, s_c, kt_c, kid_c, CUT)
        above += tl.sum(tl.where(p.to(tl.int32, bitcast=True) > lo, p, 0.0), axis=0)
    n_tie = tl.maximum(tl.ceil((top_p - above) / lo.to(tl.float32, bitcast=True)), 1.0).to(tl.int32)
    seen = tl.zeros([], tl.int32)
    kid = tl.full([], V, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lane
        p = probs(lrow, cols, cols < V, inv, m, s, inv_c, m_c, s_c, kt_c, kid_c, CUT)
        tie = (p.to(tl.int32, bitcast=True) == lo) & (cols < V)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)
        kid = tl.minimum(kid, tl.min(tl.where(tie & (rank == n_tie), cols, V), axis=0))
        seen += tl.sum(tie.to(tl.int32), axis=0)
    return lo, kid


def _support(lg, cols, ok, inv_t, m, s, kt, kid, inv_tm, mm, sm, kt2, kid2):
    """(cand, on): the sampler's candidates among these lanes (its nucleus kt, kid) and the
    mixture's support within them (its own nucleus kt2, kid2 of p_mix = e^(l inv_tm - mm) / sm)."""
    cand = ok & kept(tl.where(ok, tl.exp(lg * inv_t - m) / s, 0.0), cols, kt, kid)
    return cand, cand & kept(tl.where(cand, tl.exp(lg * inv_tm - mm) / sm, 0.0), cols, kt2, kid2)


def _lse_argmax(lrow, V, inv_t, BLOCK_V: tl.constexpr):
    """(m, s) of the online softmax of lg * inv_t over the row, and the greedy (max logit, its
    lowest id)."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    g_best = tl.full([], float("-inf"), tl.float32)
    g_tok = tl.zeros([], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lane
        lg = tl.load(lrow + cols, mask=cols < V, other=float("-inf"))
        t_best = tl.max(lg, axis=0)
        t_tok = tl.min(tl.where(lg == t_best, cols, V), axis=0)
        g_tok = tl.where(t_best > g_best, t_tok, g_tok)
        g_best = tl.maximum(g_best, t_best)
        m_new = tl.maximum(m, tl.max(lg * inv_t, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(lg * inv_t - m_new), axis=0)
        m = m_new
    return m, s, g_best, g_tok


def _cand_softmax(lrow, V, inv, inv_c, m_c, s_c, kt_c, kid_c, BLOCK_V: tl.constexpr):
    """(m, s) of the online softmax of lg * inv over the candidates of the nucleus (inv_c, m_c,
    s_c, kt_c, kid_c)."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lane
        ok = cols < V
        lg = tl.load(lrow + cols, mask=ok, other=float("-inf"))
        on = ok & kept(tl.where(ok, tl.exp(lg * inv_c - m_c) / s_c, 0.0), cols, kt_c, kid_c)
        x = tl.where(on, lg * inv, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(on, tl.exp(x - m_new), 0.0), axis=0)
        m = m_new
    return m, s


def _define_kernels() -> dict:
    # where the kernels' bodies find them
    globals().update(
        mode_input=triton.jit(_mode_input),
        row_counter=triton.jit(_row_counter),
        masked_softmax=triton.jit(_masked_softmax),
        mass_above=triton.jit(_mass_above),
        kept=triton.jit(_kept),
        probs=triton.jit(_probs),
        nucleus_cut=triton.jit(_nucleus_cut),
        support=triton.jit(_support),
        lse_argmax=triton.jit(_lse_argmax),
        cand_softmax=triton.jit(_cand_softmax),
    )

    @triton.jit
    def _full_partial_kernel(
        h_ptr,
        w_ptr,
        e_ptr,
        seed_ptr,
        seed_stride,
        off_ptr,
        rid_ptr,
        ws_acc,
        ws_m,
        ws_s,
        ws_mx,
        ws_sx,
        ws_qx,
        ws_rx,
        ws_score,
        ws_tok,
        ws_logit,
        B,
        V,
        D,
        n_rb,
        v_per_split,
        inv_t,
        inv_tm,
        inv_tau,
        stride_h,
        stride_w,
        stride_e,
        TIED: tl.constexpr,
        GREEDY: tl.constexpr,
        FP32_DOT: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr,
        MODE: tl.constexpr,
        MIX_SHARED: tl.constexpr,
        HAS_ENT: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (row block, V-split) program: a single pass over its lm_weight rows keeping,
        per row, the sampler's online softmax state (m, s = sum e^(l/T-m)), the race winner,
        and the latent mixture's state (latent_input.py) over its scores x = l/T_mix
        (gumbel-soft: (l/T_mix + g)/tau): mx, sx = sum e^(x-mx), qx = sum e^(2(x-mx)),
        rx = sum e^(x-mx) (x-mx) (the entropy: MoI's, and the cold stop's with HAS_ENT) and
        acc = sum e^(x-mx) E[v]. MIX_SHARED (the mixture's scores are the sampler's: T_mix = T,
        no Gumbel): one state serves both."""
        pid = tl.program_id(0)
        rb = pid % n_rb  # row blocks of one split are neighbours: they share its tiles in L2
        split = pid // n_rb
        rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ks = tl.arange(0, BLOCK_D)
        k_ok = ks < D
        h = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        seed = tl.load(seed_ptr + rows * seed_stride, mask=row_ok, other=0)[:, None]  # each row's key
        if HAS_ROW_IDS:
            rid = tl.load(rid_ptr + rows, mask=row_ok, other=0)
        else:
            rid = rows.to(tl.int64)
        ctr_row = tl.load(off_ptr) + rid * V  # the noise counter of (row, token 0)
        v_lo = split * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        lane = tl.arange(0, BLOCK_V)

        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_B], tl.float32)
        mx = tl.full([BLOCK_B], float("-inf"), tl.float32)
        sx = tl.zeros([BLOCK_B], tl.float32)
        qx = tl.zeros([BLOCK_B], tl.float32)
        rx = tl.zeros([BLOCK_B], tl.float32)
        best = tl.full([BLOCK_B], float("-inf"), tl.float32)
        tok = tl.zeros([BLOCK_B], tl.int32)
        blogit = tl.zeros([BLOCK_B], tl.float32)
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + lane
            col_ok = cols < v_hi
            tile_mask = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :], mask=tile_mask, other=0.0)
            if FP32_DOT:
                logits = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                logits = tl.dot(h, tl.trans(w))
            scaled = tl.where(col_ok[None, :], logits * inv_t, float("-inf"))
            if GREEDY:
                score = tl.where(col_ok[None, :], logits, float("-inf"))
                g = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
            else:
                u = philox_uniform(seed, ctr_row[:, None] + cols[None, :])
                g = -tl.log(-tl.log(u))  # Gumbel noise: the race and gumbel-soft's weights
                score = scaled + g  # log(p_v / x_v) + const
            t_best = tl.max(score, axis=1)
            t_arg = tl.argmax(score, axis=1)
            t_logit = tl.sum(tl.where(lane[None, :] == t_arg[:, None], scaled, 0.0), axis=1)
            upd = t_best > best  # strict: ties keep the lower token, as torch.argmax
            best = tl.where(upd, t_best, best)
            tok = tl.where(upd, v0 + t_arg, tok)
            blogit = tl.where(upd, t_logit, blogit)

            if MIX_SHARED:
                xs = scaled
            else:
                m_new = tl.maximum(m, tl.max(scaled, axis=1))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(scaled - m_new[:, None]), axis=1)
                m = m_new
                xs = tl.where(col_ok[None, :], logits * inv_tm, float("-inf"))
                if MODE == 4:  # gumbel-soft
                    xs = (xs + g) * inv_tau
            mx_new = tl.maximum(mx, tl.max(xs, axis=1))
            ax = tl.exp(mx - mx_new)
            px = tl.exp(xs - mx_new[:, None])
            if MODE == 2 or HAS_ENT:  # the entropy's sum, rescaled to the new max (0 before any column)
                rx = tl.where(sx > 0, ax * (rx + (mx - mx_new) * sx), 0.0)
                rx += tl.sum(tl.where(col_ok[None, :], px * (xs - mx_new[:, None]), 0.0), axis=1)
            sx = sx * ax + tl.sum(px, axis=1)
            qx = qx * ax * ax + tl.sum(px * px, axis=1)
            if TIED:
                e = w  # the tile read for the logits serves the mixture too
            else:
                e = tl.load(e_ptr + cols[:, None].to(tl.int64) * stride_e + ks[None, :], mask=tile_mask, other=0.0)
            acc = acc * ax[:, None] + dot_p(px, e, FP32_DOT)
            mx = mx_new

        if MIX_SHARED:
            m, s = mx, sx
        slot = split * B + rows
        tl.store(ws_m + slot, m, mask=row_ok)
        tl.store(ws_s + slot, s, mask=row_ok)
        tl.store(ws_mx + slot, mx, mask=row_ok)
        tl.store(ws_sx + slot, sx, mask=row_ok)
        tl.store(ws_qx + slot, qx, mask=row_ok)
        tl.store(ws_rx + slot, rx, mask=row_ok)
        tl.store(ws_score + slot, best, mask=row_ok)
        tl.store(ws_tok + slot, tok, mask=row_ok)
        tl.store(ws_logit + slot, blogit, mask=row_ok)
        tl.store(ws_acc + slot[:, None].to(tl.int64) * D + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _full_reduce_kernel(
        ws_acc,
        ws_m,
        ws_s,
        ws_mx,
        ws_sx,
        ws_qx,
        ws_rx,
        ws_score,
        ws_tok,
        ws_logit,
        tok_out,
        lp_out,
        h_out,
        ent_out,
        e_ptr,
        seed_ptr,
        seed_stride,
        off_ptr,
        rid_ptr,
        B,
        V,
        D,
        n_splits,
        stride_ho,
        stride_e,
        beta,
        sigma,
        inv_logv,
        noise_key,
        MODE: tl.constexpr,
        GREEDY: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr,
        HAS_ENT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One row: merge the per-split states (rescaled by e^(m_split - m)) into the
        token, its full-vocabulary log-prob and the mode's next input (latent_input.py)."""
        row = tl.program_id(0)
        sp = tl.arange(0, BLOCK_S)
        ok = sp < n_splits
        slot = sp * B + row
        m = tl.load(ws_m + slot, mask=ok, other=float("-inf"))
        m_all = tl.max(m, axis=0)
        s = tl.sum(tl.load(ws_s + slot, mask=ok, other=0.0) * tl.where(ok, tl.exp(m - m_all), 0.0), axis=0)
        mx = tl.load(ws_mx + slot, mask=ok, other=float("-inf"))
        mx_all = tl.max(mx, axis=0)
        w = tl.where(ok, tl.exp(mx - mx_all), 0.0)
        sx_sp = tl.load(ws_sx + slot, mask=ok, other=0.0)
        sx = tl.sum(sx_sp * w, axis=0)
        score = tl.load(ws_score + slot, mask=ok, other=float("-inf"))
        win = tl.argmax(score, axis=0)  # ties: the lowest split, i.e. the lowest token
        tok = tl.sum(tl.where(sp == win, tl.load(ws_tok + slot, mask=ok, other=0), 0), axis=0)
        logit = tl.sum(tl.where(sp == win, tl.load(ws_logit + slot, mask=ok, other=0.0), 0.0), axis=0)
        tl.store(tok_out + row, tok.to(tl.int64))
        tl.store(lp_out + row, logit - (m_all + tl.log(s)))
        if MODE == 0:  # hrpo: (acc/s) / (sqrt(q)/s)
            scale = 1.0 / tl.sqrt(tl.sum(tl.load(ws_qx + slot, mask=ok, other=0.0) * w * w, axis=0))
        else:
            scale = 1.0 / sx
        lam = 1.0
        if MODE == 2 or HAS_ENT:  # sum p log p = r/s - log s, merged as r + (m_split - m) s per split
            r_sp = tl.load(ws_rx + slot, mask=ok, other=0.0) + tl.where(ok, (mx - mx_all) * sx_sp, 0.0)
            H = -(tl.sum(r_sp * w, axis=0) / sx - tl.log(sx))  # nats
            if HAS_ENT:
                tl.store(ent_out + row, H)
            lam = H * inv_logv / (beta + 1.0)  # used by moi only
        seed = tl.load(seed_ptr + row * seed_stride)
        ctr = row_counter(off_ptr, rid_ptr, row, V, HAS_ROW_IDS)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            dok = dk < D
            a = tl.load(
                ws_acc + slot[:, None].to(tl.int64) * D + dk[None, :], mask=ok[:, None] & dok[None, :], other=0.0
            )
            hv = tl.sum(a * w[:, None], axis=0) * scale
            hv = mode_input(hv, e_ptr, tok, stride_e, dk, dok, lam, sigma, seed ^ noise_key, ctr, MODE, GREEDY)
            tl.store(h_out + row * stride_ho + dk, hv, mask=dok)

    @triton.jit
    def _topk_tail_kernel(
        logits_ptr,
        vals_ptr,
        idx_ptr,
        e_ptr,
        seed_ptr,
        seed_stride,
        off_ptr,
        rid_ptr,
        tok_out,
        lp_out,
        h_out,
        ent_out,
        V,
        D,
        K,
        inv_t,
        inv_tm,
        inv_tau,
        beta,
        sigma,
        inv_logv,
        noise_key,
        top_p,
        mix_top_p,
        stride_l,
        stride_k,
        stride_e,
        stride_ho,
        GREEDY: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr,
        MODE: tl.constexpr,
        NUCLEUS: tl.constexpr,
        MIX_NUCLEUS: tl.constexpr,
        HAS_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One row: logsumexp over the full vocabulary (and the greedy argmax), the race
        among the sampler's candidates (the k selected logits, cut to the sampler's nucleus
        when NUCLEUS), and the mode's next input from the mixture p over them, cut to its own
        nucleus when MIX_NUCLEUS (latent_input.py; hrpo: h_hat = sum_j p_j E[id_j] / ||p||)."""
        row = tl.program_id(0)
        lane = tl.arange(0, BLOCK_V)
        lrow = logits_ptr + row.to(tl.int64) * stride_l
        mv = tl.full([BLOCK_V], float("-inf"), tl.float32)
        sv = tl.zeros([BLOCK_V], tl.float32)
        gv = tl.full([BLOCK_V], float("-inf"), tl.float32)
        gi = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lane
            ok = cols < V
            x = tl.load(lrow + cols, mask=ok, other=float("-inf"))
            if GREEDY:
                upd = x > gv
                gv = tl.where(upd, x, gv)
                gi = tl.where(upd, cols, gi)
            xs = x * inv_t
            m_new = tl.maximum(mv, xs)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            sv = sv * tl.exp(mv - m_safe) + tl.exp(xs - m_safe)
            mv = m_new
        m_all = tl.max(mv, axis=0)
        lse = m_all + tl.log(tl.sum(sv * tl.exp(mv - m_all), axis=0))

        kk = tl.arange(0, BLOCK_K)
        kok = kk < K
        vals = tl.load(vals_ptr + row * stride_k + kk, mask=kok, other=float("-inf"))
        ids = tl.load(idx_ptr + row * stride_k + kk, mask=kok, other=0).to(tl.int32)
        scaled = vals * inv_t
        cand = kok
        if NUCLEUS:
            cand = kok & (mass_above(masked_softmax(scaled, kok), ids) < top_p)
        seed = tl.load(seed_ptr + row * seed_stride)
        ctr = row_counter(off_ptr, rid_ptr, row, V, HAS_ROW_IDS)
        if GREEDY:
            g_best = tl.max(gv, axis=0)
            tok = tl.min(tl.where(gv == g_best, gi, V), axis=0)
            tok_logit = g_best * inv_t
            g = tl.zeros([BLOCK_K], tl.float32)
        else:
            g = -tl.log(-tl.log(philox_uniform(seed, ctr + ids)))
            score = tl.where(cand, scaled + g, float("-inf"))
            best = tl.max(score, axis=0)
            tok = tl.min(tl.where(cand & (score == best), ids, V), axis=0)
            tok_logit = tl.max(tl.where(kok & (ids == tok), scaled, float("-inf")), axis=0)
        tl.store(tok_out + row, tok.to(tl.int64))
        tl.store(lp_out + row, tok_logit - lse)

        p = masked_softmax(vals * inv_tm, cand)
        if MIX_NUCLEUS:
            cand = cand & (mass_above(p, ids) < mix_top_p)
            p = tl.where(cand, p, 0.0)
            p = p / tl.sum(p, axis=0)
        if MODE == 4:  # gumbel-soft: over p's support
            p = masked_softmax((vals * inv_tm + g) * inv_tau, cand)
        lam = 1.0
        if MODE == 2 or HAS_ENT:
            H = -tl.sum(tl.where(p > 0, p * tl.log(p), 0.0), axis=0)  # nats
            if HAS_ENT:
                tl.store(ent_out + row, H)
            lam = H * inv_logv / (beta + 1.0)  # used by moi only
        if MODE == 0:
            p = p / tl.sqrt(tl.sum(p * p, axis=0))
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            dok = dk < D
            e = tl.load(
                e_ptr + ids[:, None].to(tl.int64) * stride_e + dk[None, :], mask=kok[:, None] & dok[None, :], other=0.0
            )
            hv = tl.sum(p[:, None] * e.to(tl.float32), axis=0)
            hv = mode_input(hv, e_ptr, tok, stride_e, dk, dok, lam, sigma, seed ^ noise_key, ctr, MODE, GREEDY)
            tl.store(h_out + row * stride_ho + dk, hv, mask=dok)

    @triton.jit
    def _nucleus_tail_kernel(
        logits_ptr,
        e_ptr,
        seed_ptr,
        seed_stride,
        off_ptr,
        rid_ptr,
        ws_ids,
        ws_x,
        tok_out,
        lp_out,
        h_out,
        ent_out,
        V,
        D,
        inv_t,
        inv_tm,
        inv_tau,
        beta,
        sigma,
        inv_logv,
        noise_key,
        top_p,
        mix_top_p,
        stride_l,
        stride_e,
        stride_ho,
        GREEDY: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr,
        MODE: tl.constexpr,
        NUCLEUS: tl.constexpr,
        MIX_NUCLEUS: tl.constexpr,
        HAS_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One row of full-vocabulary sampling with a nucleus (top_k = 0): the log-sum-exp
        and greedy argmax, the sampler's cut (nucleus_cut), the mixture's softmax over the
        candidates and its own cut, then one pass for the race and the mixture's state (as
        _full_partial_kernel's) that also packs the support's ids and scores into the row's
        workspace (ws_ids, ws_x, in id order), and the mixture's columns gathered from those
        rows of E only."""
        row = tl.program_id(0)
        lane = tl.arange(0, BLOCK_V)
        lrow = logits_ptr + row.to(tl.int64) * stride_l
        m, s, g_best, g_tok = lse_argmax(lrow, V, inv_t, BLOCK_V)
        kt = tl.full([], -1, tl.int32)  # -1, kid V: every token a candidate
        kid = tl.full([], V, tl.int32)
        if NUCLEUS:
            kt, kid = nucleus_cut(lrow, V, inv_t, m, s, inv_t, m, s, kt, kid, top_p, False, BLOCK_V)
        mm, sm = cand_softmax(lrow, V, inv_tm, inv_t, m, s, kt, kid, BLOCK_V)
        kt2 = tl.full([], -1, tl.int32)
        kid2 = tl.full([], V, tl.int32)
        if MIX_NUCLEUS:
            kt2, kid2 = nucleus_cut(lrow, V, inv_tm, mm, sm, inv_t, m, s, kt, kid, mix_top_p, True, BLOCK_V)
        seed = tl.load(seed_ptr + row * seed_stride)
        ctr = row_counter(off_ptr, rid_ptr, row, V, HAS_ROW_IDS)
        best = tl.full([], float("-inf"), tl.float32)
        tok = g_tok
        tok_logit = g_best * inv_t
        mx = tl.full([], float("-inf"), tl.float32)
        sx = tl.zeros([], tl.float32)
        qx = tl.zeros([], tl.float32)
        rx = tl.zeros([], tl.float32)
        n_on = tl.zeros([], tl.int32)
        ws = row.to(tl.int64) * V
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lane
            ok = cols < V
            lg = tl.load(lrow + cols, mask=ok, other=float("-inf"))
            cand, on = support(lg, cols, ok, inv_t, m, s, kt, kid, inv_tm, mm, sm, kt2, kid2)
            g = tl.zeros([BLOCK_V], tl.float32)
            if not GREEDY:
                g = -tl.log(-tl.log(philox_uniform(seed, ctr + cols)))
                score = tl.where(cand, lg * inv_t + g, float("-inf"))
                t_best = tl.max(score, axis=0)
                t_tok = tl.min(tl.where(score == t_best, cols, V), axis=0)
                upd = t_best > best  # strict: ties keep the lower token
                tok = tl.where(upd, t_tok, tok)
                tok_logit = tl.where(upd, t_best - tl.sum(tl.where(cols == t_tok, g, 0.0), axis=0), tok_logit)
                best = tl.maximum(best, t_best)
            xs = lg * inv_tm
            if MODE == 4:  # gumbel-soft
                xs = (xs + g) * inv_tau
            xs = tl.where(on, xs, float("-inf"))
            at = n_on + tl.cumsum(on.to(tl.int32), axis=0) - 1  # the support packed in id order
            tl.store(ws_ids + ws + at, cols, mask=on)
            tl.store(ws_x + ws + at, xs, mask=on)
            n_on += tl.sum(on.to(tl.int32), axis=0)
            mx_new = tl.maximum(mx, tl.max(xs, axis=0))
            ax = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - mx_new))
            px = tl.where(on, tl.exp(xs - mx_new), 0.0)
            if MODE == 2 or HAS_ENT:  # the entropy's sum, rescaled to the new max (0 before any token)
                rx = tl.where(sx > 0, ax * (rx + (mx - mx_new) * sx), 0.0)
                rx += tl.sum(tl.where(on, px * (xs - mx_new), 0.0), axis=0)
            sx = sx * ax + tl.sum(px, axis=0)
            qx = qx * ax * ax + tl.sum(px * px, axis=0)
            mx = mx_new
        tl.store(tok_out + row, tok.to(tl.int64))
        tl.store(lp_out + row, tok_logit - (m + tl.log(s)))
        if MODE == 0:  # hrpo: (acc/s) / (sqrt(q)/s)
            scale = 1.0 / tl.sqrt(qx)
        else:
            scale = 1.0 / sx
        lam = 1.0
        if MODE == 2 or HAS_ENT:  # sum p log p = r/s - log s
            H = -(rx / sx - tl.log(sx))  # nats
            if HAS_ENT:
                tl.store(ent_out + row, H)
            lam = H * inv_logv / (beta + 1.0)  # used by moi only
        jj = tl.arange(0, BLOCK_J)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            dok = dk < D
            hv = tl.zeros([BLOCK_D], tl.float32)
            for j0 in range(0, n_on, BLOCK_J):
                jok = j0 + jj < n_on
                ids = tl.load(ws_ids + ws + j0 + jj, mask=jok, other=0)
                w = tl.where(jok, tl.exp(tl.load(ws_x + ws + j0 + jj, mask=jok, other=0.0) - mx), 0.0)
                e = tl.load(
                    e_ptr + ids[:, None].to(tl.int64) * stride_e + dk[None, :],
                    mask=jok[:, None] & dok[None, :],
                    other=0.0,
                )
                hv += tl.sum(w[:, None] * e.to(tl.float32), axis=0)
            hv = hv * scale
            hv = mode_input(hv, e_ptr, tok, stride_e, dk, dok, lam, sigma, seed ^ noise_key, ctr, MODE, GREEDY)
            tl.store(h_out + row * stride_ho + dk, hv, mask=dok)

    return dict(
        full_partial=_full_partial_kernel,
        full_reduce=_full_reduce_kernel,
        topk_tail=_topk_tail_kernel,
        nucleus_tail=_nucleus_tail_kernel,
    )


_kernels = lazy_kernels(globals(), _define_kernels)


def full_vocab_config(D: int) -> dict:
    """Tile sizes of the one-pass kernel. The program keeps acc (BLOCK_B x BLOCK_D fp32) in
    registers and stages one (BLOCK_V x BLOCK_D) weight tile, so tiles shrink as d grows."""
    block_d = next_pow2(max(D, 16))
    if interpreting():  # small tiles run fastest there
        return dict(block_b=16, block_v=32, block_d=block_d, num_warps=4, num_stages=1)
    block_v = max(16, min(64, 32768 // block_d))
    return dict(block_b=16, block_v=block_v, block_d=block_d, num_warps=8 if block_d <= 1024 else 16, num_stages=1)


def _full_vocab(
    hidden,
    lm_weight,
    embedding,
    temperature,
    greedy,
    seed,
    offset,
    row_ids=None,
    out=None,
    latent=None,
    entropy=None,
    block_b=None,
    block_v=None,
    splits=None,
):
    B, D = hidden.shape
    V = lm_weight.shape[0]
    dev = hidden.device
    cfg = full_vocab_config(D)
    block_b = block_b or cfg["block_b"]
    block_v = block_v or cfg["block_v"]
    hidden = hidden.contiguous()
    tied = lm_weight.data_ptr() == embedding.data_ptr() and lm_weight.stride() == embedding.stride()
    w = lm_weight if lm_weight.stride(-1) == 1 else lm_weight.contiguous()
    e = w if tied else (embedding if embedding.stride(-1) == 1 else embedding.contiguous())
    if not tied and e.dtype != w.dtype:
        e = e.to(w.dtype)
    if hidden.dtype != w.dtype:
        hidden = hidden.to(w.dtype)
    n_rb = cdiv(B, block_b)
    n_tiles = cdiv(V, block_v)
    if splits is None:
        splits = max(1, min(n_tiles, cdiv(2 * num_sms(dev), n_rb)))
    per_split = cdiv(n_tiles, max(1, min(splits, n_tiles))) * block_v
    n_splits = cdiv(V, per_split)
    f32 = dict(dtype=torch.float32, device=dev)
    ws_acc = torch.empty(n_splits, B, D, **f32)
    ws_m, ws_s, ws_mx, ws_sx, ws_qx, ws_rx, ws_score, ws_logit = (torch.empty(n_splits, B, **f32) for _ in range(8))
    ws_tok = torch.empty(n_splits, B, dtype=torch.int32, device=dev)
    tok, lp, h = sample_outputs(out, B, D, dev, "sample_and_mix")
    k = _kernels()
    mode = kernel_args(latent, temperature, V)
    noise = _noise_args(seed, offset, row_ids)
    ws = (ws_acc, ws_m, ws_s, ws_mx, ws_sx, ws_qx, ws_rx, ws_score, ws_tok, ws_logit)
    k["full_partial"][(n_rb * n_splits,)](
        hidden,
        w,
        e,
        *noise,
        *ws,
        B,
        V,
        D,
        n_rb,
        per_split,
        1.0 / temperature,
        mode["inv_tm"],
        mode["inv_tau"],
        hidden.stride(0),
        w.stride(0),
        e.stride(0),
        TIED=tied,
        GREEDY=bool(greedy),
        HAS_ROW_IDS=row_ids is not None,
        MODE=mode["MODE"],
        MIX_SHARED=mode["MODE"] != 4 and mode["inv_tm"] == 1.0 / temperature,
        HAS_ENT=entropy is not None,
        # the interpreter's bf16 tl.dot is wrong (triton 3.9): fp32 dots there; fp16 tests cover the split
        FP32_DOT=w.dtype == torch.float32 or (interpreting() and w.dtype == torch.bfloat16),
        BLOCK_B=block_b,
        BLOCK_V=block_v,
        BLOCK_D=cfg["block_d"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    k["full_reduce"][(B,)](
        *ws,
        tok,
        lp,
        h,
        lp if entropy is None else entropy,  # any pointer when unused
        e,
        *noise,
        B,
        V,
        D,
        n_splits,
        h.stride(0),
        e.stride(0),
        mode["beta"],
        mode["sigma"],
        mode["inv_logv"],
        NOISE_KEY,
        MODE=mode["MODE"],
        GREEDY=bool(greedy),
        HAS_ROW_IDS=row_ids is not None,
        HAS_ENT=entropy is not None,
        BLOCK_S=next_pow2(max(n_splits, 2)),
        BLOCK_D=min(next_pow2(max(D, 16)), 128 if n_splits <= 64 else 32),
        num_warps=4 if n_splits <= 128 else 8,
    )
    return tok, lp, h


def _lm_logits(hidden: torch.Tensor, lm_weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits (B, V): one cuBLAS GEMM in the weights' dtype with fp32 output; on the CPU an
    fp32 GEMM on the weight's cached fp32 copy (the same numbers), oneDNN-packed so that a row's
    bits do not depend on the batch (_common.cpu_logits)."""
    if lm_weight.dtype != torch.float32 and on_gpu_path(hidden):
        return mm_f32(hidden.to(lm_weight.dtype), lm_weight.T)
    return hidden.float() @ lm_weight.T if hidden.is_cuda else cpu_logits(hidden, lm_weight)


def _ext_logits(hidden: torch.Tensor, lm_weight: torch.Tensor) -> torch.Tensor:
    """The CPU engine's lm-head: a bf16 weight through the extension's bf16 brgemm with fp32
    logits (csrc/lm_head_cpu.cpp: 6-7x the fp32 GEMM on the weight's upcast copy at SmolLM2's
    head, no 113 MB fp32 copies kept; a row's bits independent of the batch), packed once per
    version of the weight; otherwise _lm_logits."""
    mod = load_extension()
    if lm_weight.dtype != torch.bfloat16 or lm_weight.shape[1] % 2 or not _brgemm(mod):
        return _lm_logits(hidden, lm_weight)
    packed = derived(lm_weight, "brgemm-bf16", lambda w: mod.lm_head_pack_bf16(w.contiguous()))
    return mod.lm_head_bf16(hidden.to(torch.bfloat16).contiguous(), packed, lm_weight.shape[0])


def _brgemm(mod) -> bool:
    """Whether the loaded extension has the bf16 lm-head and this CPU runs ATen's bf16 brgemm."""
    return mod is not None and hasattr(mod, "lm_head_bf16") and mod.lm_head_bf16_supported()


def _noise_args(seed: torch.Tensor, offset: torch.Tensor, row_ids: torch.Tensor | None) -> tuple:
    """The noise arguments every sampling kernel takes, in their order: the seed, its stride (1:
    one key per row, 0: one for all), the offset and the row ids (any pointer when absent)."""
    return seed, seed.numel() > 1, offset, seed if row_ids is None else row_ids


def _tail_tiles(D: int) -> dict:
    """Both tail kernels' vocabulary and hidden tiles and warps (small under the interpreter)."""
    interp = interpreting()
    return dict(
        BLOCK_V=256 if interp else 2048,
        BLOCK_D=min(next_pow2(max(D, 16)), 64 if interp else 256),
        num_warps=4 if interp else 8,
    )


def _tail_numbers(mode: dict) -> tuple:
    """A mode's runtime numbers (latent_input.kernel_args) in the order both tail kernels take them."""
    numbers = ("inv_tm", "inv_tau", "beta", "sigma", "inv_logv")
    return (*(mode[n] for n in numbers), NOISE_KEY, mode["top_p"], mode["mix_top_p"])


def _tail_flags(mode: dict, entropy: torch.Tensor | None) -> dict:
    """The tail kernels' compile-time switches for a mode, its nuclei and the entropy output."""
    return dict(
        MODE=mode["MODE"], NUCLEUS=mode["top_p"] < 1, MIX_NUCLEUS=mode["mix_top_p"] < 1, HAS_ENT=entropy is not None
    )


def _topk_tail(
    logits,
    embedding,
    k,
    temperature,
    greedy,
    seed,
    offset,
    row_ids=None,
    out=None,
    latent=None,
    top_p=1.0,
    entropy=None,
):
    """Top-k tail on fp32 logits (B, V). On CUDA with k <= 128 and the extension built, the
    extension's one-block-per-row kernel (radix select, race, gathered mixture); otherwise
    torch.topk and one Triton program per row for the full-vocabulary log-prob, the race
    among the k candidates (the sampler's nucleus among them) and the gathered mixture."""
    # the CUDA kernel knows no other mode, cuts no nucleus and writes no entropy
    plain = (latent is None or (latent.mode == "hrpo" and latent.top_p == 1)) and top_p == 1 and entropy is None
    if on_gpu_path(logits) and k <= MAX_TOPK and load_extension() is not None and (plain or not logits.is_cuda):
        return topk_sample_mix(
            logits,
            embedding,
            k,
            temperature,
            greedy,
            seed=seed,
            offset=offset,
            row_ids=row_ids,
            out=out,
            latent=latent,
            top_p=top_p,
            entropy=entropy,
        )
    B, V = logits.shape
    D = embedding.shape[1]
    logits = logits.contiguous()
    vals, idx = torch.topk(logits, k, dim=-1, sorted=False)
    e = embedding if embedding.stride(-1) == 1 else embedding.contiguous()
    tok, lp, h = sample_outputs(out, B, D, logits.device, "sample_and_mix")
    mode = kernel_args(latent, temperature, min(k, V), top_p)
    _kernels()["topk_tail"][(B,)](
        logits,
        vals.contiguous(),
        idx.contiguous(),
        e,
        *_noise_args(seed, offset, row_ids),
        tok,
        lp,
        h,
        lp if entropy is None else entropy,  # any pointer when unused
        V,
        D,
        k,
        1.0 / temperature,
        *_tail_numbers(mode),
        logits.stride(0),
        k,
        e.stride(0),
        h.stride(0),
        GREEDY=bool(greedy),
        HAS_ROW_IDS=row_ids is not None,
        **_tail_flags(mode, entropy),
        BLOCK_K=next_pow2(max(k, 16)),
        **_tail_tiles(D),
    )
    return tok, lp, h


def _nucleus_tail(logits, embedding, temperature, greedy, seed, offset, row_ids, out, latent, top_p, entropy=None):
    """Full-vocabulary sampling with a nucleus on fp32 logits (B, V): one program per row of
    _nucleus_tail_kernel (the cut by a threshold search, no sort)."""
    B, V = logits.shape
    D = embedding.shape[1]
    logits = logits.contiguous()
    e = embedding if embedding.stride(-1) == 1 else embedding.contiguous()
    tok, lp, h = sample_outputs(out, B, D, logits.device, "sample_and_mix")
    mode = kernel_args(latent, temperature, V, top_p)
    ws_ids = torch.empty(B, V, dtype=torch.int32, device=logits.device)  # each row's support, packed
    ws_x = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    _kernels()["nucleus_tail"][(B,)](
        logits,
        e,
        *_noise_args(seed, offset, row_ids),
        ws_ids,
        ws_x,
        tok,
        lp,
        h,
        lp if entropy is None else entropy,  # any pointer when unused
        V,
        D,
        1.0 / temperature,
        *_tail_numbers(mode),
        logits.stride(0),
        e.stride(0),
        h.stride(0),
        GREEDY=bool(greedy),
        HAS_ROW_IDS=row_ids is not None,
        **_tail_flags(mode, entropy),
        BLOCK_J=32,
        **_tail_tiles(D),
    )
    return tok, lp, h


def sample_and_mix_triton(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    embedding: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    *,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    latent: LatentParams | None = None,
    top_p: float = 1.0,
    entropy: torch.Tensor | None = None,
    **tiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused path (CUDA, or CPU tensors under TRITON_INTERPRET=1). Same outputs as the
    seeded reference: the noise is philox_uniform(seed, offset + row_ids[row] * V + token)
    (row_ids: (B,) int64, default arange(B); seed: one, or one per row, seed[row]); a missing
    seed is drawn from `generator`.
    `out` takes preallocated outputs; `latent` the mode whose next input is the third output
    (None: hrpo's h_hat); `entropy` (B,) fp32 is filled with the mixture's entropy in nats
    (computed in the same pass, as MoI's); `tiles` overrides tile sizes of the full-vocabulary
    kernel (block_b, block_v, splits). top_p < 1 (the sampler's nucleus) or a latent nucleus: with
    top_k in [1, 128] (the k candidates ranked) or top_k 0 (the lm-head GEMM, then
    _nucleus_tail's threshold search); see nucleus_is_fused."""
    V = lm_weight.shape[0]
    if not nucleus_is_fused(top_k, V, latent, top_p):
        raise ValueError(f"sample_and_mix_triton: a nucleus needs top_k 0 or <= {MAX_TOPK}, got top_k {top_k}")
    _kernels()
    if temperature <= 0:
        raise ValueError(f"sample_and_mix: temperature must be > 0, got {temperature}")
    if latent is not None and latent.mode == "soft-noise":
        check_noise_width(hidden.shape[1], V)
    seed, offset = seed_offset(seed, offset, generator, hidden.device)
    check_seed(seed, hidden.shape[0], "sample_and_mix")
    row_ids = row_ids_tensor(row_ids, hidden.shape[0], hidden.device)
    if 0 < top_k < V:
        if top_k > MAX_TOPK_TRITON:
            raise ValueError(f"sample_and_mix_triton: top_k {top_k} > {MAX_TOPK_TRITON}")
        logits = _lm_logits(hidden, lm_weight)
        k = int(top_k)
        return _topk_tail(logits, embedding, k, temperature, greedy, seed, offset, row_ids, out, latent, top_p, entropy)
    if top_p < 1 or (latent is not None and latent.top_p < 1):
        logits = _lm_logits(hidden, lm_weight)
        return _nucleus_tail(logits, embedding, temperature, greedy, seed, offset, row_ids, out, latent, top_p, entropy)
    if not full_vocab_fits(hidden.shape[1], lm_weight):
        raise NotImplementedError(
            f"sample_and_mix_triton: the full-vocabulary kernel takes d <= 2048 (16-bit "
            f"weights) or 1024 (fp32), got d {hidden.shape[1]} in {lm_weight.dtype}"
        )
    return _full_vocab(
        hidden, lm_weight, embedding, temperature, greedy, seed, offset, row_ids, out, latent, entropy, **tiles
    )


def nucleus_is_fused(top_k: int, V: int, latent: LatentParams | None, top_p: float) -> bool:
    """Whether the fused kernels cut the nuclei asked for (none asked: True). They rank the
    candidates of a top-k tail with k <= 128 (O(k^2), no sort) and search the full
    vocabulary's threshold (top_k 0 or >= V: _nucleus_tail); a k in (128, V) runs the reference."""
    if top_p == 1 and (latent is None or latent.top_p == 1):
        return True
    return top_k <= MAX_TOPK or top_k >= V


def sampling_is_fused(
    hidden: torch.Tensor, lm_weight: torch.Tensor, top_k: int, latent: LatentParams | None = None, top_p: float = 1.0
) -> bool:
    """Whether sample_and_mix runs its fused kernels for these inputs, the path with no host
    sync (the reference reads the seed on the host, so a CUDA graph cannot hold it)."""
    if not (0 < top_k < lm_weight.shape[0]) and not full_vocab_fits(hidden.shape[-1], lm_weight):
        return False
    return nucleus_is_fused(top_k, lm_weight.shape[0], latent, top_p) and use_fused(hidden)


def sample_and_mix(
    hidden,
    lm_weight,
    embedding,
    temperature,
    top_k=0,
    greedy=False,
    generator=None,
    *,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int | None = None,
    row_ids: torch.Tensor | None = None,
    impl: str | None = None,
    latent: LatentParams | None = None,
    top_p: float = 1.0,
    entropy: torch.Tensor | None = None,
):
    """Dispatcher: the Triton kernels for CUDA tensors, the reference otherwise (and under
    HRPO_KERNELS=reference). impl="ext" on CPU tensors with 1 <= top_k <= 128 < V and a
    seed: the lm-head GEMM, then the extension's C++ top-k twin (the CPU engine's path; it
    computes h_hat from the k kept rows of E instead of a (B, V) @ (V, d) product).

    seed / offset (int64 device tensors of one element) drive the Philox noise of the fused
    path; the engine passes them so that a step needs no host sync and can be captured in
    a CUDA graph, and advances offset by >= B * V per step. When absent on CUDA, one seed is
    drawn from `generator` per call (offset 0). The reference path ignores them and draws
    its noise from `generator` unless `seed` is given. Seeded, both paths draw
    u[b, v] = philox_uniform(seed, offset + row_ids[b] * V + v) and sample the same tokens
    (row_ids default arange(B); stable row ids keep a row's noise when rows are removed).

    latent: the latent mode (hrpo_kernels/latent_input.py) whose next input is the third
    output; None is hrpo's h_hat. top_p: the sampler's nucleus, cut inside the top-k
    (latent_input.sampling_support); fused with top_k 0 or <= 128 (nucleus_is_fused).
    entropy: a (B,) fp32 buffer every path fills with the entropy of the mixture distribution in
    nats (latent_input.mixture_entropy), from the pass that forms the mixture (Soft Thinking's
    cold stop reads it)."""
    V = lm_weight.shape[0]
    if entropy is not None and latent is not None and latent.mode == "gumbel-soft":
        raise ValueError("sample_and_mix: gumbel-soft's fused pass mixes noisy weights; it reports no entropy of p")
    if latent is not None and latent.is_h_hat:
        latent = None  # the paths' own h_hat, and the unseeded reference's draws unchanged
    if impl == "ext" and not hidden.is_cuda and seed is not None and 0 < top_k <= MAX_TOPK and top_k < V:
        logits = _ext_logits(hidden, lm_weight)
        return topk_sample_mix(
            logits,
            embedding,
            top_k,
            temperature,
            greedy,
            seed,
            offset,
            row_ids=row_ids,
            impl="ext",
            latent=latent,
            top_p=top_p,
            entropy=entropy,
        )
    fused = sampling_is_fused(hidden, lm_weight, top_k, latent, top_p)
    run = sample_and_mix_triton if fused else sample_and_mix_reference
    return run(
        hidden,
        lm_weight,
        embedding,
        temperature,
        top_k,
        greedy,
        generator,
        seed=seed,
        offset=offset,
        row_ids=row_ids,
        latent=latent,
        top_p=top_p,
        entropy=entropy,
    )
