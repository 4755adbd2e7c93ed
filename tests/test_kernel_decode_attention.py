"""decode_attention: the Triton split-KV kernels against the reference, the reference
against a per-row loop, the stale cache tail, and the dispatcher.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (impl="triton");
every buffer the kernels allocate (output and split workspace) starts as NaN."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from hrpo_kernels import decode_attention, decode_attention_reference

da = importlib.import_module("hrpo_kernels.decode_attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the same sums in another order. fp16 / bf16: one rounding of the output (the
# kernel's 16-bit dots are exact products, p is split into two halves for P @ V).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
SEED = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def make(B, H, Hkv, Dh, T, dtype, seed, batch_view=False):
    """q, k_cache, v_cache; with batch_view the caches are [1:B+1, :T] of a bigger buffer
    (an offset and a batch stride that is not T * Hkv * Dh)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Dh, generator=g).to(dtype).to(DEV)
    pad = 1 if batch_view else 0
    k, v = (
        torch.randn(B + 2 * pad, T + 3 * pad, Hkv, Dh, generator=g).to(dtype).to(DEV)[pad : pad + B, :T] for _ in "kv"
    )
    return q, k, v


def lens(*n):
    return torch.tensor(n, dtype=torch.int32, device=DEV)


def poison(monkeypatch):
    real = da._empty

    def nan_empty(*args, **kwargs):
        x = real(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(da, "_empty", nan_empty)


def naive(q, k, v, seqlens, scale):
    """Row by row, head by head: softmax over the row's first seqlens[b] slots, in fp64."""
    B, H, Dh = q.shape
    G = H // k.shape[2]
    out = torch.zeros(B, H, Dh, dtype=torch.float64)
    for b in range(B):
        n = int(seqlens[b])
        for h in range(H):
            kb, vb = k[b, :n, h // G].double().cpu(), v[b, :n, h // G].double().cpu()
            if n:
                out[b, h] = torch.softmax(kb @ q[b, h].double().cpu() * scale, 0) @ vb
    return out


def close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_splits", [None, 1, 2, 3])
def test_triton_matches_reference(monkeypatch, dtype, n_splits):
    """B=3, H=6 over Hkv=2, Dh=40 (not a power of two), Tmax=37 in 16-slot tiles (3 tiles,
    the last ragged); lengths 1, Tmax and 0; the caches a batch slice of a bigger buffer."""
    poison(monkeypatch)
    q, k, v = make(3, 6, 2, 40, 37, dtype, 10 * (n_splits or 0) + SEED[dtype], batch_view=True)
    assert not k.is_contiguous()
    seqlens = lens(1, 37, 0)
    out = da.decode_attention_triton(q, k, v, seqlens, 40**-0.5, n_splits=n_splits, block_t=16)
    ref = decode_attention_reference(q, k, v, seqlens, 40**-0.5)
    assert out.dtype == dtype and out.shape == (3, 6, 40)
    close(out, ref, dtype, f"{dtype} n_splits={n_splits}")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_triton
@pytest.mark.parametrize(
    "B,H,Hkv,Dh,T,seqlens,n_splits",
    [
        (5, 8, 1, 16, 50, (17, 0, 50, 1, 16), 4),  # MQA; lengths at and past tile edges
        (2, 4, 4, 64, 33, (33, 32), 2),  # MHA (G = 1, padded to 16 rows)
        (2, 24, 8, 32, 20, (5, 20), None),  # G = 3 (Llama-3.2-3B's grouping)
        (1, 32, 2, 16, 40, (40,), 5),  # G = 16: no padding
    ],
)
def test_triton_shapes(monkeypatch, B, H, Hkv, Dh, T, seqlens, n_splits):
    poison(monkeypatch)
    q, k, v = make(B, H, Hkv, Dh, T, torch.float32, B * H + T)
    s = lens(*seqlens)
    out = da.decode_attention_triton(q, k, v, s, 0.3, n_splits=n_splits, block_t=16)
    close(out, decode_attention_reference(q, k, v, s, 0.3), torch.float32, f"H={H} Hkv={Hkv}")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_captures_in_a_cuda_graph():
    """No host sync and a grid from shapes only: one captured call serves new lengths."""
    q, k, v = make(4, 12, 2, 128, 300, torch.bfloat16, 11)
    seqlens = lens(300, 1, 0, 150)
    da.decode_attention_triton(q, k, v, seqlens, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention_triton(q, k, v, seqlens, 0.1)
    for new in ((5, 300, 17, 0), (0, 64, 65, 299)):
        seqlens.copy_(lens(*new))
        graph.replay()
        close(out, decode_attention_reference(q, k, v, seqlens, 0.1), torch.bfloat16, f"replay {new}")


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4), (5, 1)])
def test_reference_matches_per_row_loop(H, Hkv):
    """GQA (G = 3), MHA and MQA; ragged lengths with an empty row; max_len >= the lengths
    changes nothing."""
    B, Dh, T = 4, 24, 11
    q, k, v = make(B, H, Hkv, Dh, T, torch.float32, H * 10 + Hkv)
    seqlens = lens(3, 0, 11, 1)
    ref = decode_attention_reference(q, k, v, seqlens, 0.4)
    close(ref, naive(q, k, v, seqlens, 0.4), torch.float32, f"H={H} Hkv={Hkv}")
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))
    short = lens(3, 0, 5, 1)
    torch.testing.assert_close(
        decode_attention_reference(q, k, v, short, 0.4, max_len=5), decode_attention_reference(q, k, v, short, 0.4)
    )


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stale_tail_is_ignored(impl, dtype):
    """Slots at or beyond a row's length hold NaN, inf and huge values: the output must not
    change (a masked score times a NaN value row is still NaN unless the row is skipped)."""
    B, H, Hkv, Dh, T = 4, 4, 2, 16, 37
    q, k, v = make(B, H, Hkv, Dh, T, dtype, 5)
    seqlens = lens(20, 0, 37, 1)
    kw = dict(impl=impl)
    clean = decode_attention(q, k, v, seqlens, 0.25, **kw)
    k2, v2 = k.clone(), v.clone()
    big = torch.finfo(dtype).max
    for b, n in enumerate(seqlens.tolist()):
        k2[b, n:], v2[b, n:] = float("nan"), float("inf")
        k2[b, n + 1 :: 3], v2[b, n + 2 :: 3] = big, -big
    dirty = decode_attention(q, k2, v2, seqlens, 0.25, **kw)
    assert torch.equal(dirty, clean)


def refuse(what):
    def fn(*args, **kwargs):
        raise AssertionError(f"{what} must not be called")

    return fn


@pytest.mark.skipif(DEV == "cuda", reason="CPU routing")
def test_dispatcher_routes_cpu_to_reference(monkeypatch):
    q, k, v = make(2, 4, 2, 8, 9, torch.float32, 3)
    seqlens = lens(4, 9)
    ref = decode_attention_reference(q, k, v, seqlens, 0.5)
    with monkeypatch.context() as mp:
        mp.setattr(da, "decode_attention_triton", refuse("the Triton path"))
        mp.setattr(da, "decode_attention_flash", refuse("the flash path"))
        torch.testing.assert_close(decode_attention(q, k, v, seqlens, 0.5), ref, rtol=0, atol=0)
        torch.testing.assert_close(decode_attention(q, k, v, seqlens, 0.5, max_len=9), ref, rtol=0, atol=0)
    if importlib.util.find_spec("triton") is not None:  # impl="triton" forces the kernels, even on CPU
        monkeypatch.setattr(da, "decode_attention_reference", refuse("the reference"))
        close(decode_attention(q, k, v, seqlens, 0.5, impl="triton"), ref, torch.float32, "impl=triton")


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 6, 8), (2, 9, 5, 8), (2,)), r"H=6 is not a multiple of Hkv=5"),
        (((2, 6), (2, 9, 2, 8), (2,)), r"q must be \(B, H, Dh\)"),
        (((2, 6, 8), (3, 9, 2, 8), (2,)), r"B=2 rows but the cache has 3"),
        (((2, 6, 8), (2, 9, 2, 16), (2,)), r"Dh=8 but the cache has Dh=16"),
        (((2, 6, 8), (2, 9, 2, 8), (3,)), r"seqlens must be \(2,\)"),
        (((2, 6, 8), (2, 9, 8), (2,)), r"k_cache and v_cache must both be"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    qs, ks, ss = shapes
    q, k = torch.zeros(qs), torch.zeros(ks)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, k, torch.zeros(ss, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="impl must be"):
        decode_attention(
            torch.zeros(2, 4, 8), torch.zeros(2, 3, 2, 8), torch.zeros(2, 3, 2, 8), lens(1, 1), 1.0, impl="cuda"
        )
