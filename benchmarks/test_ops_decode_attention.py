"""Decode-step attention on the GPU: `pytest benchmarks/test_ops_decode_attention.py --benchmark-only`.

The rollout engine's per-layer call: one query token per row against a static bf16 KV cache
of Tmax = 768 slots, at the attention shapes of Qwen2.5-1.5B/3B and Llama-3.2-1B/3B,
B = 32/128/256, every row at 768 slots ("full") or at seeded random lengths in [1, 768]
("ragged"). Names: decode_attention-{triton,flash,reference}-{model}-b{B}[-ragged];
"reference" is the eager torch specification (on CUDA it always zeroes the stale tail, a
copy of the cache), "flash" runs only where flash-attn is installed.

extra_info: the median time from CUDA-event timing (triton's do_bench), the bytes that must
be read (the K and V slots below each row's length; q, the output and the split workspace
are < 2% and left out), the achieved bandwidth, the device copy bandwidth of this run and
the floor bytes / copy bandwidth. Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.conftest import bench_ms, record_bandwidth, synced
from hrpo_kernels.decode_attention import (
    decode_attention_flash,
    decode_attention_reference,
    decode_attention_triton,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

T_MAX = 768
MODELS = {  # (H, Hkv, Dh)
    "qwen2.5-1.5b": (12, 2, 128),
    "qwen2.5-3b": (16, 2, 128),
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.2-3b": (24, 8, 128),
}
METHODS = {"triton": decode_attention_triton, "flash": decode_attention_flash, "reference": decode_attention_reference}


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("batch", [32, 128, 256])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_decode_attention(benchmark, copy_gbps, method, model, batch, ragged):
    if method == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    H, Hkv, Dh = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(batch)
    q = torch.randn(batch, H, Dh, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, T_MAX, Hkv, Dh, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "kv")
    if ragged:
        seqlens = torch.randint(1, T_MAX + 1, (batch,), device="cuda", generator=g, dtype=torch.int32)
    else:
        seqlens = torch.full((batch,), T_MAX, device="cuda", dtype=torch.int32)
    scale = Dh**-0.5
    op = METHODS[method]

    def fn():
        return op(q, k, v, seqlens, scale)

    with torch.no_grad():
        torch.testing.assert_close(fn(), decode_attention_reference(q, k, v, seqlens, scale), rtol=1.6e-2, atol=1e-2)
        ms = bench_ms(fn)
        benchmark.name = f"decode_attention-{method}-{model}-b{batch}" + ("-ragged" if ragged else "")
        benchmark.pedantic(synced(fn), rounds=20, warmup_rounds=2)
    nbytes = int(seqlens.clamp(max=T_MAX).sum()) * Hkv * Dh * 2 * 2  # K and V, bf16
    record_bandwidth(
        benchmark,
        copy_gbps,
        ms,
        nbytes,
        method=method,
        model=model,
        batch=batch,
        t_max=T_MAX,
        ragged=ragged,
        H=H,
        Hkv=Hkv,
        Dh=Dh,
    )
