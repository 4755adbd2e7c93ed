"""The extension's CUDA ops against their torch references:
`pytest benchmarks/test_ops_ext.py --benchmark-only` (skipped without CUDA).

topk_sample_mix on precomputed fp32 logits, V = 151936, d = 1536, bf16 embedding, k = 50,
B = 32/128/256 (names `topk_sample_mix-<cuda|torch>-d1536-b<B>`), and the step controller
(names `step_controller-<cuda|torch>-d1536-b<B>`). extra_info: device median time (CUDA
events via bench_ms), bytes and bandwidth against the copy (topk), speedup over the reference. The first call builds the
extension (ninja JIT, minutes) unless `hrpo_kernels._C` was installed by setup.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import memo_ms, record_bandwidth, synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V, D, K, TEMPERATURE = 151936, 1536, 50, 0.5


@pytest.fixture(scope="module")
def ext():
    from hrpo_kernels import _ext

    mod = _ext.load_extension(verbose=False)
    if mod is None or not mod.has_cuda():
        pytest.skip("the CUDA extension did not build")
    return mod


@pytest.fixture(scope="module")
def emb():
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(V, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)


def _topk_fns(emb, B):
    from hrpo_kernels.topk_sample import topk_sample_mix, topk_sample_mix_reference

    g = torch.Generator(device="cuda").manual_seed(B)
    logits = torch.randn(B, V, device="cuda", generator=g) * 3.0
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = (
        torch.empty(B, dtype=torch.int64, device="cuda"),
        torch.empty(B, device="cuda"),
        torch.empty(B, D, device="cuda"),
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    return logits, {
        "cuda": lambda: topk_sample_mix(logits, emb, K, TEMPERATURE, seed=seed, offset=offset, out=out),
        "torch": lambda: topk_sample_mix_reference(logits, emb, K, TEMPERATURE, generator=gen),
    }


@pytest.mark.parametrize("B", [32, 128, 256], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("impl", ["cuda", "torch"])
def test_topk_sample_mix(benchmark, copy_gbps, ext, emb, impl, B):
    from hrpo_kernels.topk_sample import topk_sample_mix_reference

    logits, fns = _topk_fns(emb, B)
    if impl == "cuda":  # correctness at the real shape before timing
        tok, lp, h = fns["cuda"]()
        _, idx = torch.topk(logits, K, dim=-1)
        assert bool((idx == tok[:, None]).any(-1).all())
        _, lp_ref, h_ref = topk_sample_mix_reference(logits, emb, K, TEMPERATURE, tokens=tok)
        torch.testing.assert_close(lp, lp_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    ms = memo_ms(("topk", impl, B), fns[impl])
    nbytes = B * V * 4 + B * K * D * 2 + B * (12 + 4 * D)  # one logits read, k rows, outputs

    benchmark.name = f"topk_sample_mix-{impl}-d{D}-b{B}"
    benchmark.pedantic(synced(fns[impl]), rounds=5, warmup_rounds=1)
    info = dict(impl=impl, d=D, batch=B, vocab=V, k=K, emb_dtype="bf16", device=torch.cuda.get_device_name())
    if impl == "cuda":
        info["speedup_vs_torch"] = memo_ms(("topk", "torch", B), fns["torch"]) / ms
    record_bandwidth(benchmark, copy_gbps, ms, nbytes, **info)


def _step_case(B, T=1024):
    from hrpo_kernels.step_controller import StepBuffers

    g = torch.Generator(device="cuda").manual_seed(B)
    table = torch.randint(0, 5, (5, V), device="cuda", generator=g)
    table[4] = 4
    return dict(
        table=table,
        state=torch.zeros(B, dtype=torch.int64, device="cuda"),
        finished=torch.zeros(B, dtype=torch.bool, device="cuda"),
        tokens=torch.randint(2, V, (B,), device="cuda", generator=g),
        logprobs=-torch.rand(B, device="cuda", generator=g),
        h_hat=torch.randn(B, D, device="cuda", generator=g),
        eos=torch.tensor([0, 1], device="cuda"),
        t=torch.zeros(1, dtype=torch.int64, device="cuda"),
        bufs=StepBuffers.allocate(B, T, D, device="cuda", latent_dtype=torch.bfloat16),
        T=T,
    )


@pytest.mark.parametrize("B", [32, 128, 256], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("impl", ["cuda", "torch"])
def test_step_controller(benchmark, ext, impl, B):
    from hrpo_kernels.step_controller import step_controller, step_controller_reference

    c = _step_case(B)

    def args():
        return (
            c["table"],
            c["state"],
            c["finished"],
            c["tokens"],
            c["logprobs"],
            c["h_hat"],
            c["eos"],
            2,
            c["t"],
            c["T"] * 4,
            c["bufs"],
        )

    fn = step_controller if impl == "cuda" else step_controller_reference

    def run():
        c["t"].zero_()  # on the device: every timed step writes column 0 (the CUDA path never syncs)
        return fn(*args())

    if impl == "cuda":  # one step against the reference
        ref = _step_case(B)
        step_controller(*args())
        step_controller_reference(
            ref["table"],
            ref["state"],
            ref["finished"],
            ref["tokens"],
            ref["logprobs"],
            ref["h_hat"],
            ref["eos"],
            2,
            ref["t"],
            ref["T"] * 4,
            ref["bufs"],
        )
        for x, y in zip(c["bufs"].tensors(), ref["bufs"].tensors()):
            assert torch.equal(x, y)
        assert torch.equal(c["state"], ref["state"]) and int(c["t"]) == int(ref["t"]) == 1
    ms = memo_ms(("step", impl, B), run)

    benchmark.name = f"step_controller-{impl}-d{D}-b{B}"
    benchmark.pedantic(synced(run), rounds=5, warmup_rounds=1)
    info = dict(impl=impl, d=D, batch=B, latent_dtype="bf16", device=torch.cuda.get_device_name(), median_us=ms * 1e3)
    if impl == "cuda":
        ref_case = _step_case(B)
        ref_args = (
            ref_case["table"],
            ref_case["state"],
            ref_case["finished"],
            ref_case["tokens"],
            ref_case["logprobs"],
            ref_case["h_hat"],
            ref_case["eos"],
            2,
            ref_case["t"],
            ref_case["T"] * 4,
            ref_case["bufs"],
        )

        def ref_run():
            ref_case["t"].zero_()
            return step_controller_reference(*ref_args)

        info["speedup_vs_torch"] = memo_ms(("step", "torch", B), ref_run) / ms
    benchmark.extra_info.update(info)
