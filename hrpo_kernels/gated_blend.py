"""The HRPO gate: blend a token embedding with the latent mixture of the previous step.

    r = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i)
    a = exp(-c * softplus(-Lambda) * r)
    out = a * e + sqrt(1 - a^2 + 1e-8) * (i * h_hat)      where the thinking mask is set,
    out = e                                                 elsewhere.

`gated_blend_reference` is the specification (pure torch, fp32 math, autograd through
every gate parameter); fused kernels must match it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._common import derived, linear, pack, stream_capturing, use_fused
from ._common import empty as _empty
from ._ext import load_extension
from ._triton_helpers import lazy_kernels

GATE_C = 8.0
SQRT_EPS = 1e-8


def gated_blend_reference(
    e: torch.Tensor,
    h_hat: torch.Tensor,
    mask: torch.Tensor,
    w_r: torch.Tensor,
    b_r: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    lam: torch.Tensor,
    c: float = GATE_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, a): the model inputs in e's dtype, and the fp32 gate coefficient a.

    e, h_hat: (..., d); mask: (...) bool; w_r, w_i: (d, d) as nn.Linear weights; b_r, b_i,
    lam: (d,). Rows outside the mask pass e through bit for bit.
    """
    e32, h32 = e.float(), h_hat.float()
    r = torch.sigmoid(F.linear(e32, w_r, b_r))
    i = torch.sigmoid(F.linear(e32, w_i, b_i))
    a = torch.exp(-c * F.softplus(-lam) * r)
    blended = a * e32 + torch.sqrt(1.0 - a * a + SQRT_EPS) * (i * h32)
    out = torch.where(mask.unsqueeze(-1), blended.to(e.dtype), e)
    return out, a


# ----------------------------------------------------------------------------------------
# Fused path: one cuBLAS GEMM for both gate linears + one Triton epilogue (forward), one
# Triton elementwise kernel + cuBLAS GEMMs (backward). Triton is imported on first use only,
# so `import hrpo_kernels` works where it is missing and TRITON_INTERPRET set by a test
# module after this file was imported still takes effect.
# ----------------------------------------------------------------------------------------
# bound by lazy_kernels at the first launch (_triton_helpers.py), blend_tile and gates by _define_kernels
triton = tl = blend_tile = gates = None

FWD_BLOCK_M, FWD_BLOCK_D = 16, 128  # 2048 elements per program, 4 warps
BWD_BLOCK_M, BWD_BLOCK_D = 32, 128  # taller tiles: fewer Lambda partial rows to reduce


def _blend_tile(M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_D) tile of the (M, D) blend: rows, cols, their masks, the
    tile's mask and the rows as an int64 column (row offsets past 2^31 elements)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :], rows.to(tl.int64)[:, None]


def _gates(z_ptr, lam_ptr, r64, cols, cmask, tile, stride_z, D, c):
    """The gate of both passes on one tile: (Lambda, softplus(-Lambda), r = sigmoid(z_r),
    i = sigmoid(z_i), a = exp(-c softplus(-Lambda) r))."""
    zr = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=tile, other=0.0)
    zi = tl.load(z_ptr + r64 * stride_z + D + cols[None, :], mask=tile, other=0.0)
    lam = tl.load(lam_ptr + cols, mask=cmask, other=0.0)
    # softplus(-lam) = max(-lam, 0) + log1p(exp(-|lam|)); log1p via log(u) * y / (u - 1),
    # exact to a few ulp where log(1 + y) would lose the small y (Lambda ~ 7..9 at init).
    y = tl.exp(-tl.abs(lam))
    u = 1.0 + y
    l1p = tl.where(u == 1.0, y, tl.log(u) * y / (u - 1.0))
    sp = tl.maximum(-lam, 0.0) + l1p
    r = 1.0 / (1.0 + tl.exp(-zr))
    i = 1.0 / (1.0 + tl.exp(-zi))
    a = tl.exp(-c * sp[None, :] * r)
    return lam, sp, r, i, a


def _gated_blend_fwd_kernel(
    z_ptr,
    e_ptr,
    h_ptr,
    mask_ptr,
    lam_ptr,
    out_ptr,
    a_ptr,
    M,
    D,
    stride_z,
    stride_e,
    stride_h,
    stride_o,
    stride_a,
    c,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z = [e W_r^T + b_r | e W_i^T + b_i] (M, 2D) fp32 -> out (M, D) e.dtype, a (M, D) fp32."""
    rows, cols, rmask, cmask, tile, r64 = blend_tile(M, D, BLOCK_M, BLOCK_D)
    _, _, _, i, a = gates(z_ptr, lam_ptr, r64, cols, cmask, tile, stride_z, D, c)
    e_raw = tl.load(e_ptr + r64 * stride_e + cols[None, :], mask=tile, other=0.0)
    m = tl.load(mask_ptr + rows, mask=rmask, other=0) != 0
    h = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=tile & m[:, None], other=0.0).to(tl.float32)
    e = e_raw.to(tl.float32)
    blended = a * e + tl.sqrt(1.0 - a * a + 1e-8) * (i * h)
    out = tl.where(m[:, None], blended.to(e_raw.dtype), e_raw)  # bit-exact passthrough
    tl.store(out_ptr + r64 * stride_o + cols[None, :], out, mask=tile)
    tl.store(a_ptr + r64 * stride_a + cols[None, :], a, mask=tile)


def _gated_blend_bwd_kernel(
    z_ptr,
    e_ptr,
    h_ptr,
    mask_ptr,
    lam_ptr,
    go_ptr,
    ga_ptr,
    dz_ptr,
    de_ptr,
    dh_ptr,
    dlam_ptr,
    M,
    D,
    stride_z,
    stride_e,
    stride_h,
    stride_go,
    stride_ga,
    stride_dz,
    stride_de,
    stride_dh,
    c,
    HAS_GO: tl.constexpr,
    HAS_GA: tl.constexpr,
    NEED_DE: tl.constexpr,
    NEED_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grads w.r.t. z = [z_r | z_i] (M, 2D), the direct part of de, dh, and this row block's
    share of dLambda (one row of dlam_ptr per row block, reduced over blocks by the host)."""
    pid_m = tl.program_id(0)
    rows, cols, rmask, cmask, tile, r64 = blend_tile(M, D, BLOCK_M, BLOCK_D)
    lam, sp, r, i, a = gates(z_ptr, lam_ptr, r64, cols, cmask, tile, stride_z, D, c)
    e = tl.load(e_ptr + r64 * stride_e + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + rows, mask=rmask, other=0) != 0
    mt = tile & m[:, None]
    h = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=mt, other=0.0).to(tl.float32)
    # d softplus(-lam) / d lam = -sigmoid(-lam)
    sig_neg_lam = 1.0 / (1.0 + tl.exp(lam))
    s = tl.sqrt(1.0 - a * a + 1e-8)
    if HAS_GO:
        go = tl.load(go_ptr + r64 * stride_go + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    else:
        go = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    gom = tl.where(mt, go, 0.0)  # out's grad reaching the blend (masked rows only)
    # d out / d a = e - a / s * (i * h)   (ds/da = -a / s)
    ga_tot = gom * (e - a / s * (i * h))
    if HAS_GA:
        ga_tot += tl.load(ga_ptr + r64 * stride_ga + cols[None, :], mask=tile, other=0.0)
    ga_tot = tl.where(tile, ga_tot, 0.0)
    # a = exp(-c sp r): da/dr = -c sp a; dr/dz_r = r (1 - r)
    dzr = ga_tot * (-c * sp[None, :] * a) * (r * (1.0 - r))
    dzi = gom * s * h * (i * (1.0 - i))
    tl.store(dz_ptr + r64 * stride_dz + cols[None, :], dzr, mask=tile)
    tl.store(dz_ptr + r64 * stride_dz + D + cols[None, :], dzi, mask=tile)
    # da/dlam = a * (-c r) * dsp/dlam = a c r sigmoid(-lam)
    part = tl.sum(ga_tot * a * r, axis=0) * (c * sig_neg_lam)
    tl.store(dlam_ptr + pid_m * D + cols, part, mask=cmask)
    if NEED_DE:
        de = tl.where(m[:, None], go * a, go)
        tl.store(de_ptr + r64 * stride_de + cols[None, :], de, mask=tile)
    if NEED_DH:
        tl.store(dh_ptr + r64 * stride_dh + cols[None, :], gom * s * i, mask=tile)


def _define_kernels() -> dict:
    globals().update(blend_tile=triton.jit(_blend_tile), gates=triton.jit(_gates))  # where the kernels find them
    return dict(fwd=triton.jit(_gated_blend_fwd_kernel), bwd=triton.jit(_gated_blend_bwd_kernel))


_kernels = lazy_kernels(globals(), _define_kernels)


# The concatenated (2d, d) weight and (2d,) bias, kept while the parameters are unchanged:
# during a rollout the gate runs once per decode step with the same weights, and the cat
# alone would move twice the weight's bytes. Keyed by identity, storage and version counter
# (in-place optimizer steps bump it).
_CAT_CACHE: dict = {}


def _cat_weights(w_r, b_r, w_i, b_i):
    params = (w_r, b_r, w_i, b_i)
    if stream_capturing(w_r):
        # Recorded into the graph, so each replay concatenates the weights as they are then;
        # a cached copy would freeze the gate at its capture-time values across updates.
        return torch.cat([w_r.detach(), w_i.detach()], 0).float(), torch.cat([b_r.detach(), b_i.detach()], 0).float()
    key = tuple(id(p) for p in params)
    stamp = tuple((p.data_ptr(), p._version, tuple(p.shape), p.device, p.dtype) for p in params)
    hit = _CAT_CACHE.get(key)
    if hit is not None and hit[1] == stamp and all(ref() is p for ref, p in zip(hit[0], params)):
        return hit[2], hit[3]
    with torch.no_grad():
        w_cat = torch.cat([w_r.detach(), w_i.detach()], 0).float().contiguous()
        b_cat = torch.cat([b_r.detach(), b_i.detach()], 0).float().contiguous()
    try:
        refs = tuple(weakref.ref(p) for p in params)
    except TypeError:
        return w_cat, b_cat
    if len(_CAT_CACHE) >= 4:
        _CAT_CACHE.pop(next(iter(_CAT_CACHE)))
    _CAT_CACHE[key] = (refs, stamp, w_cat, b_cat)
    return w_cat, b_cat


def _rows(x: torch.Tensor, shape) -> torch.Tensor:
    """(..., d) broadcast to shape, as a (M, d) matrix with unit column stride."""
    x = x.expand(shape).reshape(-1, shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class _GatedBlendFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c, blocks):
        k = _kernels()
        shape = e.shape
        d = shape[-1]
        e2 = _rows(e, shape)
        h2 = _rows(h_hat, shape)
        m = mask.expand(shape[:-1]).reshape(-1).contiguous()
        M = e2.shape[0]
        w_cat, b_cat = _cat_weights(w_r, b_r, w_i, b_i)
        z = torch.addmm(b_cat, e2.float(), w_cat.t())  # (M, 2d) fp32: the one GEMM
        out = _empty((M, d), dtype=e.dtype, device=e.device)
        a = _empty((M, d), dtype=torch.float32, device=e.device)
        bm, bd = blocks[0] or FWD_BLOCK_M, blocks[1] or FWD_BLOCK_D
        lam_c = lam.detach().float().contiguous()
        if M > 0:
            grid = (triton.cdiv(M, bm), triton.cdiv(d, bd))
            k["fwd"][grid](
                z,
                e2,
                h2,
                m,
                lam_c,
                out,
                a,
                M,
                d,
                z.stride(0),
                e2.stride(0),
                h2.stride(0),
                out.stride(0),
                a.stride(0),
                float(c),
                BLOCK_M=bm,
                BLOCK_D=bd,
                num_warps=4,
            )
        ctx.save_for_backward(z, e2, h2, m, lam_c, w_cat)
        ctx.c, ctx.blocks, ctx.shape = float(c), blocks, shape
        ctx.dtypes = (e.dtype, h_hat.dtype, lam.dtype, w_r.dtype, b_r.dtype, w_i.dtype, b_i.dtype)
        ctx.h_shape = h_hat.shape
        ctx.set_materialize_grads(False)
        return out.view(shape), a.view(shape)

    @staticmethod
    def backward(ctx, g_out, g_a):
        k = _kernels()
        z, e2, h2, m, lam_c, w_cat = ctx.saved_tensors
        M, d = e2.shape
        need_e, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = any(ctx.needs_input_grad[3:8])
        if g_out is None and g_a is None:
            return (None,) * 10
        dev = e2.device
        go = _rows(g_out, ctx.shape) if g_out is not None else None
        ga = _rows(g_a.float(), ctx.shape) if g_a is not None else None
        bm, bd = ctx.blocks[2] or BWD_BLOCK_M, ctx.blocks[3] or BWD_BLOCK_D
        n_blocks = triton.cdiv(M, bm) if M > 0 else 0
        dz = _empty((M, 2 * d), dtype=torch.float32, device=dev)
        de = _empty((M, d), dtype=torch.float32, device=dev) if need_e else dz
        dh = _empty((M, d), dtype=torch.float32, device=dev) if need_h else dz
        dlam_part = torch.zeros((max(n_blocks, 1), d), dtype=torch.float32, device=dev)
        if M > 0:
            grid = (n_blocks, triton.cdiv(d, bd))
            k["bwd"][grid](
                z,
                e2,
                h2,
                m,
                lam_c,
                go if go is not None else dz,
                ga if ga is not None else dz,
                dz,
                de,
                dh,
                dlam_part,
                M,
                d,
                z.stride(0),
                e2.stride(0),
                h2.stride(0),
                go.stride(0) if go is not None else 0,
                ga.stride(0) if ga is not None else 0,
                dz.stride(0),
                de.stride(0),
                dh.stride(0),
                ctx.c,
                HAS_GO=go is not None,
                HAS_GA=ga is not None,
                NEED_DE=need_e,
                NEED_DH=need_h,
                BLOCK_M=bm,
                BLOCK_D=bd,
                num_warps=4,
            )
        grads = [None] * 10
        if need_e:
            # direct part + the path through both gate linears, in one GEMM
            grads[0] = torch.addmm(de, dz, w_cat).to(ctx.dtypes[0]).view(ctx.shape)
        if need_h:
            dh = dh.to(ctx.dtypes[1]).view(ctx.shape)
            if tuple(ctx.h_shape) != tuple(ctx.shape):  # h_hat was broadcast: sum it back
                dh = dh.sum_to_size(ctx.h_shape)
            grads[1] = dh
        if need_w:
            dw = dz.t() @ e2.float()  # (2d, d): W_r and W_i grads in one GEMM
            db = dz.sum(0)
            grads[3] = dw[:d].to(ctx.dtypes[3]) if ctx.needs_input_grad[3] else None
            grads[4] = db[:d].to(ctx.dtypes[4]) if ctx.needs_input_grad[4] else None
            grads[5] = dw[d:].to(ctx.dtypes[5]) if ctx.needs_input_grad[5] else None
            grads[6] = db[d:].to(ctx.dtypes[6]) if ctx.needs_input_grad[6] else None
        if ctx.needs_input_grad[7]:
            grads[7] = dlam_part.sum(0).to(ctx.dtypes[2])
        return tuple(grads)


def gated_blend_triton(
    e,
    h_hat,
    mask,
    w_r,
    b_r,
    w_i,
    b_i,
    lam,
    c: float = GATE_C,
    block_m: int | None = None,
    block_d: int | None = None,
    bwd_block_m: int | None = None,
    bwd_block_d: int | None = None,
):
    """The fused op (any device Triton runs on: CUDA, or CPU under TRITON_INTERPRET=1).
    Same contract as `gated_blend_reference`; block sizes (powers of two) are for tests."""
    if e.shape[-1] != w_r.shape[1] or mask.dim() != e.dim() - 1:
        raise ValueError(f"gated_blend: e {tuple(e.shape)}, w_r {tuple(w_r.shape)}, mask {tuple(mask.shape)}")
    blocks = (block_m, block_d, bwd_block_m, bwd_block_d)
    return _GatedBlendFn.apply(e, h_hat, mask.bool(), w_r, b_r, w_i, b_i, lam, float(c), blocks)


def gated_blend_ext(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c: float = GATE_C):
    """Forward only (no autograd), CPU: one GEMM for both gate linears, then the extension's
    C++ epilogue (csrc/gated_blend_cpu.cpp). fp32 e; the rollout engine's CPU path."""
    mod = load_extension()
    if mod is None or not hasattr(mod, "gated_blend_cpu"):
        raise RuntimeError("gated_blend: impl='ext' needs the C++ extension with gated_blend_cpu")
    if e.dtype != torch.float32 or e.dim() != 2 or e.shape[-1] != w_r.shape[1] or mask.shape != e.shape[:1]:
        raise ValueError(
            f"gated_blend ext: e must be (B, d) fp32 with mask (B,), got e {tuple(e.shape)} {e.dtype}, "
            f"mask {tuple(mask.shape)}, w_r {tuple(w_r.shape)}"
        )
    w_cat, b_cat = _cat_weights(w_r, b_r, w_i, b_i)
    with torch.no_grad():  # oneDNN's packed GEMM: a row's bits independent of the batch (_common.cpu_logits)
        lin = linear(e.contiguous(), w_cat, b_cat, derived(w_cat, "packed", pack))
        coef = (-c * F.softplus(-lam.detach().float())).contiguous()
    out, a = torch.empty_like(e), torch.empty(e.shape, dtype=torch.float32, device=e.device)
    mod.gated_blend_cpu(e.contiguous(), h_hat.contiguous(), lin, coef, mask.bool().contiguous(), out, a)
    return out, a


def gated_blend(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c: float = GATE_C, *, impl: str | None = None):
    """Dispatcher: the fused kernels on CUDA (when triton imports), the reference otherwise
    or when HRPO_KERNELS=reference. impl="ext" on fp32 CPU tensors outside autograd: the C++
    forward (`gated_blend_ext`)."""
    if impl == "ext" and e.dtype == torch.float32 and not e.is_cuda and not torch.is_grad_enabled():
        return gated_blend_ext(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c)
    if use_fused(e, h_hat, mask, w_r, b_r, w_i, b_i, lam):
        return gated_blend_triton(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c)
    return gated_blend_reference(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c)
