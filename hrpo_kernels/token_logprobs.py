"""Log-probs of target tokens under a linear lm-head at a temperature, chunked over tokens
so that at most (chunk x V) logits exist at once in the forward pass.

The reference relies on torch autograd, which keeps each chunk's logits for the backward;
the fused kernel of the kernels issue recomputes them instead.
"""

from __future__ import annotations

import torch

from ._common import empty as _empty
from ._common import forced_reference, interpreting, mm_f32, num_sms, use_fused
from ._triton_helpers import lazy_kernels


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """hidden (N, d), weight (V, d), targets (N,) -> fp32 log p(target) (N,)."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"token_logprobs: {hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        logits = mm_f32(h, weight.T) / temperature  # fp32 logits, as the sampler's: 16-bit ones are off by ~1/256
        t = targets[start : start + chunk_size, None]
        out.append((logits.gather(-1, t) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# Fused path. Forward: one Triton kernel per (row block, V split) streams the lm-head in
# (BLOCK_V x BLOCK_K) tiles, tl.dot into a (BLOCK_N x BLOCK_V) fp32 tile and folds it into
# an online logsumexp (running max m, rescaled sum s), the target's logit and, optionally,
# sum p*x for the entropy; V splits are merged on the host (N x splits numbers).
# Backward: over V chunks of width vc, a Triton kernel recomputes the logits tile by tile
# and writes grad_logits = (g (onehot - p) - g_H p (log p + H)) / T for all N rows of the
# chunk, then cuBLAS: grad_hidden += gl @ W[chunk] (fp32), grad_W[chunk] = gl^T @ hidden.
# The only (., V)-shaped buffer is (N, vc) with N * vc <= max(V, N) * d: memory stays
# O(N d + V d). Triton is imported on first use (see gated_blend.py).
# ----------------------------------------------------------------------------------------
# bound by lazy_kernels at the first launch (_triton_helpers.py), logits_tile by _define_kernels
triton = tl = logits_tile = None

# Defaults when not autotuning (and in the interpreter): 64 x 128 tiles, K step 64.
DEFAULT_BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64)
_SPLIT_ALIGN = 256  # V splits and chunks are multiples of every BLOCK_V used


def _logits_tile(
    h_rows,
    w_cols,
    rmask,
    cmask,
    D,
    stride_hd,
    stride_wd,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """hidden[rows] @ W[cols]^T, a (BLOCK_N, BLOCK_V) fp32 tile in K steps of BLOCK_K, from the
    rows' pointers h_rows (BLOCK_N, 1) and the columns' w_cols (1, BLOCK_V): both kernels'
    logits; masked rows and columns read zeros."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(
            h_rows + kk[None, :] * stride_hd,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_cols + kk[:, None] * stride_wd,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter's dot reads bf16 as raw int16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc=acc)
    return acc


def _tlp_fwd_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    m_ptr,
    s_ptr,
    x_ptr,
    t_ptr,
    N,
    V,
    D,
    v_per_split,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    n_splits,
    inv_t,
    ENTROPY: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_hn
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = logits_tile(
            h_rows, w_cols, rmask, cmask, D, stride_hd, stride_wd, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K
        )
        x = tl.where(cmask[None, :], acc * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        if ENTROPY:
            t = t * alpha + tl.sum(p * tl.where(cmask[None, :], x, 0.0), axis=1)  # p = 0 there
        xt += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        m = m_new
    off = rows64 * n_splits + split
    tl.store(m_ptr + off, m, mask=rmask)
    tl.store(s_ptr + off, s, mask=rmask)
    tl.store(x_ptr + off, xt, mask=rmask)
    if ENTROPY:
        tl.store(t_ptr + off, t, mask=rmask)


def _tlp_grad_logits_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_ptr,
    g_ptr,
    gent_ptr,
    ent_ptr,
    gl_ptr,
    N,
    D,
    v0,
    vc,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gl,
    inv_t,
    HAS_G: tl.constexpr,
    HAS_GENT: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """gl[:, j] for the vocabulary columns v0 + j, j < vc: one (BLOCK_N x BLOCK_V) tile each."""
    pid = tl.program_id(0)
    n_row = tl.cdiv(N, BLOCK_N)
    n_col = tl.cdiv(vc, BLOCK_V)
    # grouped order: GROUP_N row blocks sweep the columns together, so W tiles stay in L2
    per_group = GROUP_N * n_col
    group = pid // per_group
    first = group * GROUP_N
    size = tl.minimum(n_row - first, GROUP_N)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_hn
    lc = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    cmask = lc < vc
    w_cols = w_ptr + (v0 + lc).to(tl.int64)[None, :] * stride_wv
    acc = logits_tile(h_rows, w_cols, rmask, cmask, D, stride_hd, stride_wd, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    x = acc * inv_t
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    logp = x - lse[:, None]
    p = tl.exp(logp)
    grad = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
        onehot = tl.where((v0 + lc)[None, :] == tgt[:, None], 1.0, 0.0)
        grad += g[:, None] * (onehot - p)
    if HAS_GENT:
        ge = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        grad -= ge[:, None] * p * (logp + ent[:, None])
    grad = grad * inv_t
    tl.store(
        gl_ptr + rows64[:, None] * stride_gl + lc[None, :],
        grad.to(gl_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def _autotune_configs(grouped: bool):
    cfgs = []
    for bn, bv, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]:
        meta = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
        if grouped:
            meta["GROUP_N"] = 8
        cfgs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return cfgs


def _define_kernels() -> dict:
    globals()["logits_tile"] = triton.jit(_logits_tile)  # where the kernels' bodies find it
    fwd = triton.jit(_tlp_fwd_kernel)
    gl = triton.jit(_tlp_grad_logits_kernel)
    kernels = dict(fwd=fwd, gl=gl)
    if not interpreting():
        kernels["fwd_tuned"] = triton.autotune(_autotune_configs(False), key=["V", "D"])(fwd)
        kernels["gl_tuned"] = triton.autotune(_autotune_configs(True), key=["vc", "D"])(gl)
    return kernels


_kernels = lazy_kernels(globals(), _define_kernels)


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the product kept in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_(mm_f32(a, b))


class _TokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, cfg):
        k = _kernels()
        N, D = hidden.shape
        V = weight.shape[0]
        in_dtype = hidden.dtype
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        dev = hidden.device
        tgt = targets.reshape(-1).to(torch.int64).contiguous()
        inv_t = 1.0 / float(temperature)
        ieee = weight.dtype == torch.float32
        tuned = cfg.get("blocks") is None and "fwd_tuned" in k
        blocks = cfg.get("blocks") or DEFAULT_BLOCKS
        bn_nominal = 128 if tuned else blocks["BLOCK_N"]
        splits = cfg.get("v_splits")
        if splits is None:  # enough programs for two waves, each split at least 4096 wide
            row_blocks = triton.cdiv(N, bn_nominal)
            splits = max(1, min(triton.cdiv(2 * num_sms(dev, default=1), row_blocks), triton.cdiv(V, 4096)))
        align = _SPLIT_ALIGN if tuned else blocks["BLOCK_V"]
        v_per = triton.cdiv(triton.cdiv(V, splits), align) * align
        splits = triton.cdiv(V, v_per)
        part = [_empty((N, splits), dtype=torch.float32, device=dev) for _ in range(4)]
        args = (
            hidden,
            weight,
            tgt,
            *part,
            N,
            V,
            D,
            v_per,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            splits,
            inv_t,
        )
        if tuned:
            k["fwd_tuned"][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](
                *args, ENTROPY=want_entropy, IEEE=ieee, UPCAST=interpreting()
            )
        else:
            k["fwd"][(triton.cdiv(N, blocks["BLOCK_N"]), splits)](
                *args,
                ENTROPY=want_entropy,
                IEEE=ieee,
                UPCAST=interpreting(),
                num_warps=cfg.get("num_warps", 4),
                **blocks,
            )
        m, s, xt, t = part
        if splits == 1:
            m, s, xt, t = m[:, 0], s[:, 0], xt[:, 0], t[:, 0]
            lse = m + torch.log(s)
            ent = lse - t / s if want_entropy else None
        else:
            mx = m.amax(1)
            scale = torch.exp(m - mx[:, None])
            tot = (s * scale).sum(1)
            lse = mx + torch.log(tot)
            xt = xt.sum(1)
            ent = lse - (t * scale).sum(1) / tot if want_entropy else None
        lp = xt - lse
        if ent is None:
            ent = lse.new_zeros(0)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, tgt, lse, ent)
        ctx.inv_t, ctx.cfg, ctx.want_entropy = inv_t, cfg, want_entropy
        ctx.in_dtype = in_dtype
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        k = _kernels()
        hidden, weight, tgt, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w) or (g_lp is None and g_ent is None):
            return None, None, None, None, None, None
        if not ctx.want_entropy:
            g_ent = None
        N, D = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        cfg = ctx.cfg
        tuned = cfg.get("blocks") is None and "gl_tuned" in k
        blocks = None if tuned else dict(cfg.get("blocks") or DEFAULT_BLOCKS)
        align = _SPLIT_ALIGN if tuned else blocks["BLOCK_V"]
        vc = cfg.get("chunk_v")
        if vc is None:  # the (N, vc) buffer holds no more elements than max(weight, hidden)
            vc = max(align, (max(V, N) * D // max(N, 1)) // align * align)
        vc = min(vc, triton.cdiv(V, align) * align)
        gl = _empty((N, vc), dtype=weight.dtype, device=dev)
        gh = torch.zeros((N, D), dtype=torch.float32, device=dev) if need_h else None
        gw = _empty((V, D), dtype=weight.dtype, device=dev) if need_w else None
        g = g_lp.float().contiguous() if g_lp is not None else lse
        ge = g_ent.float().contiguous() if g_ent is not None else lse
        ieee = weight.dtype == torch.float32
        for v0 in range(0, V, vc):
            w = min(vc, V - v0)
            args = (
                hidden,
                weight,
                tgt,
                lse,
                g,
                ge,
                ent if g_ent is not None else lse,
                gl,
                N,
                D,
                v0,
                w,
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                gl.stride(0),
                ctx.inv_t,
            )
            flags = dict(HAS_G=g_lp is not None, HAS_GENT=g_ent is not None, IEEE=ieee, UPCAST=interpreting())
            if tuned:
                k["gl_tuned"][lambda meta, w=w: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(w, meta["BLOCK_V"]),)](
                    *args, **flags
                )
            else:
                grid = (triton.cdiv(N, blocks["BLOCK_N"]) * triton.cdiv(w, blocks["BLOCK_V"]),)
                k["gl"][grid](
                    *args, **flags, GROUP_N=cfg.get("group_n", 8), num_warps=cfg.get("num_warps", 4), **blocks
                )
            g_chunk = gl[:, :w]
            if need_h:
                _acc_mm(gh, g_chunk, weight[v0 : v0 + w])
            if need_w:
                torch.mm(g_chunk.t(), hidden, out=gw[v0 : v0 + w])
        grad_h = gh.to(ctx.in_dtype) if need_h else None
        return grad_h, gw, None, None, None, None


def token_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    blocks: dict | None = None,
    v_splits: int | None = None,
    chunk_v: int | None = None,
    num_warps: int = 4,
):
    """The fused op (CUDA, or CPU tensors under TRITON_INTERPRET=1): fp32 log p(target) (N,)
    and, with return_entropy, the fp32 entropy (N,) of softmax(logits / T), both with
    autograd. blocks (BLOCK_N, BLOCK_V, BLOCK_K; dot shapes need >= 16), v_splits and
    chunk_v (the backward's V chunk) are for tests; left out, CUDA autotunes."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if hidden.shape[0] != targets.numel():
        raise ValueError(f"token_logprobs: {hidden.shape[0]} hidden rows but {targets.numel()} targets")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if hidden.shape[0] == 0:
        lp = token_logprobs_reference(hidden, weight, targets, temperature)
        return (lp, lp.clone()) if return_entropy else lp
    cfg = dict(blocks=blocks, v_splits=v_splits, chunk_v=chunk_v, num_warps=num_warps)
    lp, ent = _TokenLogprobsFn.apply(hidden, weight, targets, float(temperature), bool(return_entropy), cfg)
    return (lp, ent) if return_entropy else lp


# ----------------------------------------------------------------------------------------
# CPU path: the reference's chunked math, but autograd keeps only hidden and one logsumexp
# per row: the backward recomputes each chunk's logits instead of holding N x V of them
# (at a real vocabulary, 8 x 1024 completion tokens would keep 5 GB of fp32 logits).
# ----------------------------------------------------------------------------------------


class _ChunkedLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        lp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(lp)
        for lo in range(0, hidden.shape[0], chunk_size):
            logits = mm_f32(hidden[lo : lo + chunk_size], weight.T) / temperature  # the reference's math
            lse[lo : lo + chunk_size] = torch.logsumexp(logits, dim=-1)
            lp[lo : lo + chunk_size] = logits.gather(-1, targets[lo : lo + chunk_size, None]).squeeze(-1)
        lp -= lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = float(temperature), chunk_size
        return lp

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for lo in range(0, hidden.shape[0], ctx.chunk_size):
            h, t = hidden[lo : lo + ctx.chunk_size], targets[lo : lo + ctx.chunk_size]
            # d log p(t) / d logits = (onehot(t) - softmax) / T for logits scaled by 1/T
            p = torch.exp(mm_f32(h, weight.T) / ctx.temperature - lse[lo : lo + ctx.chunk_size, None])
            gc = g[lo : lo + ctx.chunk_size, None] / ctx.temperature
            gl = p.mul_(-gc).scatter_add_(-1, t[:, None], gc)
            if need_h:
                gh[lo : lo + ctx.chunk_size] = (gl @ weight.float()).to(hidden.dtype)
            if need_w:
                gw.addmm_(gl.t(), h.float())
        return gh, gw.to(weight.dtype) if need_w else None, None, None, None


def token_logprobs_chunked(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """The reference's values with O(chunk x V) memory in the backward too (the CPU path)."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"token_logprobs: {hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    return _ChunkedLogprobsFn.apply(hidden, weight, targets.to(torch.int64), float(temperature), int(chunk_size))


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """Dispatcher: the fused kernel on CUDA (when triton imports), else the chunked CPU path
    (HRPO_KERNELS=reference: the reference). chunk_size only shapes the CPU chunking."""
    if use_fused(hidden, weight, targets):
        return token_logprobs_triton(hidden, weight, targets, temperature)
    if forced_reference():
        return token_logprobs_reference(hidden, weight, targets, temperature, chunk_size)
    return token_logprobs_chunked(hidden, weight, targets, temperature, chunk_size)
