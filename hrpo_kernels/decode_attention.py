"""Decode-step attention over a static KV cache: one new query token per row.

    out[b, h] = softmax(scale * q[b, h] . K[b, :n_b, h // G]) @ V[b, :n_b, h // G]

with n_b = min(seqlens[b], Tmax), G = H // Hkv query heads per KV head (grouped-query
attention), softmax and accumulation in fp32, the result in q's dtype. Rows with n_b = 0
give zeros. Cache slots at or beyond n_b are never used, whatever they hold (NaN included):
the engine's cache is a static buffer whose tail is stale or uninitialised.

`decode_attention_reference` is the specification and the CPU path; the Triton split-KV
kernels (flash-decoding) are the CUDA path, flash-attn's kernel where it is installed.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ._common import cdiv, interpreting, next_pow2, num_sms, use_fused
from ._common import empty as _empty
from ._triton_helpers import lazy_kernels


def _check(q, k_cache, v_cache, seqlens) -> tuple[int, int, int, int, int]:
    """(B, H, Hkv, Tmax, Dh) of valid inputs; a one-line ValueError naming the problem."""
    op = "decode_attention"
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be (B, H, Dh), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must both be (B, Tmax, Hkv, Dh), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, H, Dh = q.shape
    Bc, T, Hkv, Dc = k_cache.shape
    if Bc != B:
        raise ValueError(f"{op}: q has B={B} rows but the cache has {Bc}")
    if Dc != Dh:
        raise ValueError(f"{op}: q has Dh={Dh} but the cache has Dh={Dc}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: H={H} is not a multiple of Hkv={Hkv}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{op}: q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if tuple(seqlens.shape) != (B,) or seqlens.is_floating_point() or seqlens.dtype == torch.bool:
        raise ValueError(f"{op}: seqlens must be ({B},) integers, got {tuple(seqlens.shape)} {seqlens.dtype}")
    return B, H, Hkv, T, Dh


def decode_attention_reference(q, k_cache, v_cache, seqlens, scale, *, max_len: int | None = None):
    """q (B, H, Dh), k_cache / v_cache (B, Tmax, Hkv, Dh), seqlens (B,) -> (B, H, Dh) in q's
    dtype. max_len (a host int >= every seqlens[b]) restricts the work to the first max_len
    slots: the CPU engine knows it, and the cost is linear in the slots scanned.

    One SDPA call (the fastest CPU option measured) with the G query heads of a KV head as
    G query rows against it, and a boolean mask of the valid slots."""
    B, H, Hkv, _, Dh = _check(q, k_cache, v_cache, seqlens)
    if max_len is not None:
        k_cache, v_cache = k_cache[:, :max_len], v_cache[:, :max_len]
    valid = torch.arange(k_cache.shape[1], device=q.device) < seqlens.to(q.device)[:, None]  # (B, T)
    qg = q.float().view(B, Hkv, H // Hkv, Dh)
    no_slot = ~valid.any(1).view(B, 1, 1, 1)

    def attend(k, v):
        k, v = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # (B, Hkv, T, Dh)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
        return out.masked_fill(no_slot, 0.0)  # SDPA gives NaN for a row without a slot

    # A masked slot adds exactly 0 to its row unless it holds inf or NaN, which turn the row
    # into NaN (an infinite score plus the mask's -inf, or 0 times an infinite value). So on
    # CPU attend to the cache as it is, and only if that gave NaN again with the stale tail
    # zeroed (a full copy of the cache: 2-3x the time); on CUDA always (the check would sync).
    out = None if q.is_cuda else attend(k_cache, v_cache)
    if out is None or out.isnan().any():
        keep = valid[:, :, None, None]
        out = attend(torch.where(keep, k_cache, 0), torch.where(keep, v_cache, 0))
    return out.reshape(B, H, Dh).to(q.dtype)


# ----------------------------------------------------------------------------------------
# Triton split-KV path (flash-decoding). Programs (b, kv head, split) each walk one chunk of
# the row's slots for all G query heads of their KV head, so every K/V tile is read once
# per group; the G heads ride as rows of tl.dot, padded to 16. Each keeps an online
# softmax (m, denom, acc) in fp32 and writes it as a partial; a reduce kernel merges a row's
# partials. The grid depends on shapes only and seqlens stays on the device (no host sync,
# capturable in a CUDA graph); chunks at or beyond a row's length do no work and write
# nothing, and the reduce reads only the chunks below the length.
# ----------------------------------------------------------------------------------------
triton = tl = dot_p = None  # bound by lazy_kernels at the first launch (_triton_helpers.py)
LOG2E = 1.4426950408889634
PROGRAMS_PER_SM = 4  # split the slots until B * Hkv * n_splits reaches this many per SM


def _define_kernels() -> dict:
    @triton.jit
    def _partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        len_ptr,
        ws_acc,
        ws_m,
        ws_l,
        H,
        T,
        Dh,
        G,
        chunk,
        n_splits,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        FP32_DOT: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (row, KV head, split): scores in log2 units (qk_scale = scale * log2 e)."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n = tl.minimum(tl.load(len_ptr + b).to(tl.int32), T)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)  # lo >= hi: an empty chunk, no iteration, no store
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < G
        d_ok = d < Dh
        heads = kvh * G + g
        b64 = b.to(tl.int64)
        q = tl.load(
            q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        k_base = k_ptr + b64 * stride_kb + kvh * stride_kh
        v_base = v_ptr + b64 * stride_vb + kvh * stride_vh
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < hi
            tile = t_ok[:, None] & d_ok[None, :]  # masked loads: the stale tail is never read
            kt = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=tile, other=0.0)
            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))  # 16-bit products are exact in the fp32 accumulator
            s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a valid slot
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=tile, other=0.0)
            acc = acc * alpha[:, None] + dot_p(p, vt, FP32_DOT)
            m = m_new
        slot = (b64 * H + heads) * n_splits + split
        ok = g < tl.where(lo < hi, G, 0)  # the real heads, of a chunk that did work
        tl.store(ws_m + slot, m, mask=ok)
        tl.store(ws_l + slot, denom, mask=ok)
        tl.store(ws_acc + slot[:, None] * Dh + d[None, :], acc, mask=ok[:, None] & d_ok[None, :])

    @triton.jit
    def _reduce_kernel(
        ws_acc,
        ws_m,
        ws_l,
        len_ptr,
        out_ptr,
        H,
        T,
        Dh,
        chunk,
        n_splits,
        stride_ob,
        stride_oh,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (row, head): merge the partials of the chunks below the row's length, each
        rescaled by 2^(m_split - m); an empty row gives zeros."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        n = tl.minimum(tl.load(len_ptr + b).to(tl.int32), T)
        sp = tl.arange(0, BLOCK_S)
        ok = sp < tl.cdiv(n, chunk)  # only these chunks wrote a partial
        slot = bh.to(tl.int64) * n_splits + sp
        m = tl.load(ws_m + slot, mask=ok, other=float("-inf"))
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # skipped chunks: 2^-inf = 0
        denom = tl.sum(tl.load(ws_l + slot, mask=ok, other=0.0) * w, axis=0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < Dh
        acc = tl.load(ws_acc + slot[:, None] * Dh + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)

    return dict(partial=_partial_kernel, reduce=_reduce_kernel)


_kernels = lazy_kernels(globals(), _define_kernels)


def split_plan(B: int, Hkv: int, T: int, block_t: int, device: torch.device, n_splits: int | None = None):
    """(n_splits, chunk): chunks of whole tiles, enough of them that B * Hkv * n_splits
    programs fill the SMs PROGRAMS_PER_SM times over (from shapes only, never lengths)."""
    n_tiles = max(1, cdiv(T, block_t))
    if n_splits is None:
        n_splits = cdiv(PROGRAMS_PER_SM * num_sms(device), B * Hkv)
    tiles_per_split = cdiv(n_tiles, max(1, min(n_splits, n_tiles)))
    return cdiv(n_tiles, tiles_per_split), tiles_per_split * block_t


def decode_attention_triton(
    q, k_cache, v_cache, seqlens, scale, *, n_splits: int | None = None, block_t: int | None = None
):
    """The split-KV kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1); same contract as
    the reference. n_splits (an upper bound: chunks are whole tiles) and block_t (a power of
    two >= 16) are for tests and tuning."""
    B, H, Hkv, T, Dh = _check(q, k_cache, v_cache, seqlens)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the caches' last dimension must be contiguous")
    k = _kernels()
    dev = q.device
    interp = interpreting()
    block_t = block_t or (16 if interp else 64)  # interpreter: small tiles run fastest
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = _empty((B, H, Dh), dtype=q.dtype, device=dev)
    if B == 0:
        return out
    n_splits, chunk = split_plan(B, Hkv, T, block_t, dev, n_splits)
    G = H // Hkv
    ws_acc = _empty((B, H, n_splits, Dh), dtype=torch.float32, device=dev)
    ws_m = _empty((B, H, n_splits), dtype=torch.float32, device=dev)
    ws_l = _empty((B, H, n_splits), dtype=torch.float32, device=dev)
    block_d = next_pow2(max(Dh, 16))
    k["partial"][(B, Hkv, n_splits)](
        q,
        k_cache,
        v_cache,
        seqlens,
        ws_acc,
        ws_m,
        ws_l,
        H,
        T,
        Dh,
        G,
        chunk,
        n_splits,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        # fp32 caches: exact fp32 dots; the interpreter's bf16 tl.dot is wrong (triton 3.9)
        FP32_DOT=q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16),
        BLOCK_G=max(16, next_pow2(G)),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )
    k["reduce"][(B * H,)](
        ws_acc,
        ws_m,
        ws_l,
        seqlens,
        out,
        H,
        T,
        Dh,
        chunk,
        n_splits,
        out.stride(0),
        out.stride(1),
        BLOCK_S=next_pow2(n_splits),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------
# flash-attn (optional extra): its split-KV decode kernel takes this cache layout as is.
# ----------------------------------------------------------------------------------------
@functools.cache
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_ok(q: torch.Tensor) -> bool:
    """flash-attn installed, and a dtype and head size its kvcache kernel takes unpadded."""
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and _flash_installed()
    )


def decode_attention_flash(q, k_cache, v_cache, seqlens, scale):
    from flash_attn import flash_attn_with_kvcache

    _check(q, k_cache, v_cache, seqlens)
    out = flash_attn_with_kvcache(
        q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seqlens.to(torch.int32), softmax_scale=scale, causal=False
    )
    return out.squeeze(1)


def decode_attention(q, k_cache, v_cache, seqlens, scale, *, impl: str | None = None, max_len: int | None = None):
    """Dispatcher. impl None: for CUDA tensors flash-attn where installed (fp16/bf16), else
    the Triton kernels; the reference otherwise and under HRPO_KERNELS=reference. impl
    "reference" / "triton" / "flash" forces one ("triton" runs CPU tensors under the
    interpreter). max_len: a host int >= every seqlens[b]; only the first max_len slots are
    scanned (the CPU engine knows it; a CUDA graph would freeze it). Each path checks the
    shapes (ValueError)."""
    if impl not in (None, "reference", "triton", "flash"):
        raise ValueError(f"decode_attention: impl must be None, 'reference', 'triton' or 'flash', got {impl!r}")
    if max_len is not None:
        k_cache, v_cache = k_cache[:, :max_len], v_cache[:, :max_len]
    if impl is None:
        impl = ("flash" if _flash_ok(q) else "triton") if use_fused(q, k_cache, v_cache, seqlens) else "reference"
    if impl == "flash":
        return decode_attention_flash(q, k_cache, v_cache, seqlens, scale)
    if impl == "triton":
        return decode_attention_triton(q, k_cache, v_cache, seqlens, scale)
    return decode_attention_reference(q, k_cache, v_cache, seqlens, scale)
