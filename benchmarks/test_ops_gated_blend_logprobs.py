"""GPU benchmarks of the fused gated_blend and token_logprobs against their references:
`pytest benchmarks/test_ops_gated_blend_logprobs.py --benchmark-only` (skipped without CUDA).

Each entry's extra_info carries the median time from CUDA-event timing (triton's do_bench,
L2 flushed between reps), the bytes the op must move at least, the achieved bandwidth,
the device-to-device copy bandwidth measured in the same run, and the floors:
  bytes / copy bandwidth, and for the GEMM-bound parts flops / a nominal dense peak.
Names: gated_blend-{fused,reference}-d{d}-b{B}, token_logprobs-{fused,reference}-d{d}-n{N}[-wgrad].
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import bench_ms, record_bandwidth, synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

V_QWEN = 151936
N_TOKENS = 16384
# nominal dense peaks of an H100/H200 SXM (for the flop floor only; bytes use the measured copy)
PEAK_TFLOPS = {torch.float32: 67.0, torch.bfloat16: 989.0, "tf32": 494.0}


def _record(benchmark, copy_gbps, ms, nbytes, flops=None, flop_dtype=None, **info):
    record_bandwidth(benchmark, copy_gbps, ms, nbytes, **info)
    if flops is not None:
        benchmark.extra_info["flops"] = flops
        benchmark.extra_info["achieved_TFLOPs"] = flops / (ms * 1e-3) / 1e12
        benchmark.extra_info["floor_flops_us"] = flops / (PEAK_TFLOPS[flop_dtype] * 1e12) * 1e6


# ----------------------------------------------------------------------------------------
# gated_blend: the rollout's per-step call (no grad), B rows of width d
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [32, 128, 256])
@pytest.mark.parametrize("d", [1536, 2048])
@pytest.mark.parametrize("method", ["fused", "reference"])
def test_gated_blend(benchmark, copy_gbps, method, d, batch):
    from hrpo.model.gate import HybridGate
    from hrpo_kernels.gated_blend import gated_blend_reference, gated_blend_triton

    torch.manual_seed(0)
    gate = HybridGate(d).cuda()
    e = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(batch, d, device="cuda", dtype=torch.float32)
    mask = torch.rand(batch, device="cuda") < 0.7
    args = (e, h, mask, gate.w_r.weight, gate.w_r.bias, gate.w_i.weight, gate.w_i.bias, gate.lam, gate.c)
    op = gated_blend_triton if method == "fused" else gated_blend_reference
    with torch.no_grad():
        out, a = op(*args)
        ref_out, ref_a = gated_blend_reference(*args)
        torch.testing.assert_close(a, ref_a, rtol=1e-4, atol=1e-5)  # tf32 settings may differ
        assert torch.equal(out[~mask], e[~mask])

        def fn():
            return op(*args)

        ms = bench_ms(fn)
        benchmark.name = f"gated_blend-{method}-d{d}-b{batch}"
        benchmark.pedantic(synced(fn), rounds=50, warmup_rounds=5)
    # at least: both weights (fp32), biases and Lambda, e (bf16), h_hat (fp32), mask,
    # out (bf16) and a (fp32)
    nbytes = 2 * d * d * 4 + 3 * d * 4 + batch * d * (2 + 4 + 2 + 4) + batch
    tf32 = torch.backends.cuda.matmul.allow_tf32
    _record(
        benchmark,
        copy_gbps,
        ms,
        nbytes,
        flops=2 * batch * 2 * d * d,
        flop_dtype="tf32" if tf32 else torch.float32,
        method=method,
        d=d,
        batch=batch,
        goal_us=30.0,
        tf32=tf32,
    )


# ----------------------------------------------------------------------------------------
# token_logprobs: the training forward + backward over N tokens of a Qwen-sized vocabulary
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("d", [1536, 2048])
@pytest.mark.parametrize("method", ["fused", "reference"])
def test_token_logprobs(benchmark, copy_gbps, method, d, weight_grad):
    from hrpo_kernels.token_logprobs import (
        token_logprobs_reference,
        token_logprobs_triton,
    )

    torch.manual_seed(0)
    N, V = N_TOKENS, V_QWEN
    w = (torch.randn(V, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_(weight_grad)
    h = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    if method == "fused":
        op = lambda: token_logprobs_triton(h, w, t, 0.7)  # noqa: E731
    else:
        op = lambda: token_logprobs_reference(h, w, t, 0.7)  # noqa: E731

    def fn():
        h.grad = None
        w.grad = None
        lp = op()
        lp.backward(g)
        return lp

    # correctness on a slice, against the reference in fp32 (the fused path accumulates in fp32)
    with torch.no_grad():
        lp_small = token_logprobs_triton(h[:256].detach(), w.detach(), t[:256], 0.7)
        ref_small = token_logprobs_reference(h[:256].detach().float(), w.detach().float(), t[:256], 0.7)
    torch.testing.assert_close(lp_small, ref_small, rtol=1e-3, atol=1e-2)

    fn()  # autotune / warm up outside the measured region
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = bench_ms(fn)
    benchmark.name = f"token_logprobs-{method}-d{d}-n{N}" + ("-wgrad" if weight_grad else "")
    benchmark.pedantic(synced(fn), rounds=5, warmup_rounds=1)
    # at least: W read in the forward, in the recompute and by grad_hidden (and by grad_W's
    # write), hidden read three times, grad_hidden written; the (N, V) grad_logits in bf16
    # written once and read once per backward GEMM by the chunked backward.
    wb = V * d * 2
    nbytes = 3 * wb + 3 * N * d * 2 + N * d * 2 + (wb if weight_grad else 0)
    nbytes += N * V * 2 * (3 if weight_grad else 2)
    gemms = 4 if weight_grad else 3  # forward, recompute, grad_hidden (, grad_weight)
    _record(
        benchmark,
        copy_gbps,
        ms,
        nbytes,
        flops=2 * N * V * d * gemms,
        flop_dtype=torch.bfloat16,
        method=method,
        d=d,
        n_tokens=N,
        vocab=V,
        weight_grad=weight_grad,
        peak_bytes=peak,
        peak_extra_bytes=peak - base,
        inputs_bytes=base,
    )
