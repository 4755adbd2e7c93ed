"""The decode-step tail on the GPU: `pytest benchmarks/test_ops_sample_and_mix.py --benchmark-only`.

Qwen2.5-1.5B/3B-like heads: V = 151936, d = 1536 and 2048, B = 32/128/256, bf16, tied.
Variants (names `sample_and_mix-<variant>-d<d>-b<B>`):
  gemm          the lm-head GEMM alone (cuBLAS, bf16 logits): the yardstick
  eager_topk50  the reference's ops with top-k 50 (GEMM, top-k, softmax, sample, mixture)
  fused_topk50  cuBLAS GEMM (fp32 out) + the Triton top-k tail
  eager_full    the reference's ops over the full vocabulary
  fused_full    the one-pass Triton kernel + its split reduction
Times are device medians from triton.testing.do_bench (CUDA events), the pytest-benchmark
rounds are wall clock with a synchronize. extra_info: median ms, modelled bytes, achieved
GB/s, the device copy bandwidth of this run, the ratio to the GEMM and the speedup over the
eager tail (goal: fused <= 1.5x GEMM, >= 5x faster than eager). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import memo_ms, record_bandwidth, synced
from hrpo_kernels.sample_and_mix import (
    full_vocab_config,
    sample_and_mix_reference,
    sample_and_mix_triton,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V = 151936
TEMPERATURE = 0.5
TOP_K = 50


@pytest.fixture(scope="module", params=[1536, 2048], ids=lambda d: f"d{d}")
def head(request):
    d = request.param
    g = torch.Generator(device="cuda").manual_seed(d)
    E = (torch.randn(V, d, device="cuda", generator=g) * 0.02).to(torch.bfloat16)  # tied: E is the head
    return d, E


def _case(d, E, B):
    g = torch.Generator(device="cuda").manual_seed(B)
    hidden = (torch.randn(B, d, device="cuda", generator=g) * 2.0).to(torch.bfloat16)
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {
        "gemm": lambda: hidden @ E.T,
        "eager_topk50": lambda: sample_and_mix_reference(hidden, E, E, TEMPERATURE, TOP_K, False, gen),
        "fused_topk50": lambda: sample_and_mix_triton(
            hidden, E, E, TEMPERATURE, TOP_K, False, seed=seed, offset=offset
        ),
        "eager_full": lambda: sample_and_mix_reference(hidden, E, E, TEMPERATURE, 0, False, gen),
        "fused_full": lambda: sample_and_mix_triton(hidden, E, E, TEMPERATURE, 0, False, seed=seed, offset=offset),
    }


def _bytes(variant: str, d: int, B: int) -> int:
    """Modelled DRAM traffic: the head read once plus the unavoidable intermediates."""
    weights = V * d * 2 + B * d * 2
    outs = B * (8 + 4 + 4 * d)
    if variant == "gemm":
        return weights + B * V * 2  # bf16 logits written
    if variant == "fused_topk50":
        return weights + B * V * 4 * 3 + outs  # fp32 logits written, read by topk and the tail
    if variant == "fused_full":
        cfg = full_vocab_config(d)
        n_rb = -(-B // cfg["block_b"])
        n_splits = max(
            1, min(-(-V // cfg["block_v"]), -(-2 * torch.cuda.get_device_properties(0).multi_processor_count // n_rb))
        )
        return weights + 2 * n_splits * B * d * 4 + outs  # + the split partials, written and read
    return weights + outs  # eager: compulsory bytes only (its real traffic is several times this)


def _time(variant, d, B, fns) -> float:
    return memo_ms(("sample_and_mix", variant, d, B), fns[variant])


@pytest.mark.parametrize("B", [32, 128, 256], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("variant", ["gemm", "eager_topk50", "fused_topk50", "eager_full", "fused_full"])
def test_sample_and_mix_tail(benchmark, head, copy_gbps, variant, B):
    d, E = head
    fns = _case(d, E, B)
    if variant.startswith("fused"):  # sanity at the real shape before timing
        tok, lp, h_hat = fns[variant]()
        assert bool(((tok >= 0) & (tok < V)).all()) and bool((lp <= 1e-4).all()) and bool(torch.isfinite(h_hat).all())
    ms = _time(variant, d, B, fns)
    gemm_ms = _time("gemm", d, B, fns)
    nbytes = _bytes(variant, d, B)

    benchmark.name = f"sample_and_mix-{variant}-d{d}-b{B}"
    benchmark.pedantic(synced(fns[variant]), rounds=5, warmup_rounds=1)
    info = dict(
        variant=variant,
        d=d,
        batch=B,
        vocab=V,
        dtype="bf16",
        tied=True,
        device=torch.cuda.get_device_name(),
        floor_E_once_us=(V * d * 2) / (copy_gbps * 1e9) * 1e6,
        ratio_to_gemm=ms / gemm_ms,
    )
    if variant.startswith("fused"):
        eager = "eager_topk50" if variant == "fused_topk50" else "eager_full"
        info["speedup_vs_eager"] = _time(eager, d, B, fns) / ms
    record_bandwidth(benchmark, copy_gbps, ms, nbytes, **info)
