"""Top-p (nucleus) sampling and the latent mixture's nucleus (hrpo_kernels/latent_input.py:
nucleus, sampling_support): which tokens survive and their renormalised probabilities, worked
out by hand on a 5-token vocabulary (a tie included); the top-k-then-top-p order; the draw's
frequencies; the C++ twin and the Triton top-k tail (interpreter) against the reference in
fp32 and bf16 on odd shapes with poisoned outputs; the engine and the scheduler's per-row
top_p against the reference loop and the engine alone."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from conftest import build_model
from test_ext_cpu import ext  # noqa: F401  (the CPU extension, built once per session)
from test_gpu_path import setup as gpu_setup
from test_serve_scheduler import alone

import hrpo.eval as eval_cli
import hrpo.inspect.cli as inspect_cli
import hrpo.serve.__main__ as serve_cli
from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.engine.scheduler import Request, Scheduler
from hrpo.model.hybrid import HybridModel
from hrpo_kernels._common import gpu_path_mode, triton_available
from hrpo_kernels.latent_input import LatentParams, nucleus, sampling_support
from hrpo_kernels.sample_and_mix import (
    nucleus_is_fused,
    sample_and_mix_reference,
    sample_and_mix_triton,
)
from hrpo_kernels.topk_sample import topk_sample_mix

# Tokens 0..4 with p = (1/16, 1/2, 3/16, 3/16, 1/16): ranked 1, 2, 3 (the tie 2 = 3: the lower
# id first), 0, 4 (the tie 0 = 4), with the mass ranked above each 0, 1/2, 11/16, 7/8, 15/16.
P5 = torch.tensor([[1 / 16, 1 / 2, 3 / 16, 3 / 16, 1 / 16]])
I5 = torch.eye(5)
NUCLEI = [  # top_p -> the kept tokens' renormalised probabilities
    (0.3, [0, 1, 0, 0, 0]),  # token 1 alone: 1/2 already reaches 0.3
    (0.6, [0, 8 / 11, 3 / 11, 0, 0]),  # 1 and 2 (1/2 < 0.6 above 2); 3 has 11/16 above: the tie is cut
    (0.75, [0, 8 / 14, 3 / 14, 3 / 14, 0]),
    (0.9, [1 / 15, 8 / 15, 3 / 15, 3 / 15, 0]),  # 0 (7/8 above) in, 4 (15/16 above) out: lower id first
    (1.0, [1 / 16, 1 / 2, 3 / 16, 3 / 16, 1 / 16]),
]


def test_nucleus_at_an_exact_boundary():
    # 1/2 of mass is ranked above token 2: not < 1/2, so at top_p 1/2 token 1 stays alone
    assert nucleus(P5, 0.5).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(nucleus(P5, 0.5 + 2**-20), torch.tensor([[0.0, 8 / 11, 3 / 11, 0.0, 0.0]]))


@pytest.mark.parametrize("top_p, want", NUCLEI)
def test_nucleus_by_hand(top_p, want):
    want = torch.tensor([want], dtype=torch.float32)
    torch.testing.assert_close(nucleus(P5, top_p), want)
    # the sampler's p, through the whole reference with E = I: soft's mixture p @ E is p itself
    got = sample_and_mix_reference(P5.log(), I5, I5, 1.0, greedy=True, latent=LatentParams("soft"), top_p=top_p)
    torch.testing.assert_close(got[2], want)
    # hrpo's h_hat = p / ||p||, from the cut p
    h = sample_and_mix_reference(P5.log(), I5, I5, 1.0, greedy=True, top_p=top_p)[2]
    torch.testing.assert_close(h, want / want.norm())


def test_top_k_first_then_the_nucleus_inside_it():
    # p = (1/16, 1/2, 1/4, 1/8, 1/16). top-k 3 keeps 1, 2, 3 as (4/7, 2/7, 1/7); top_p 0.8 in
    # there: 4/7 < 0.8 above token 2, 6/7 above token 3: tokens 1, 2 as (2/3, 1/3). The nucleus
    # of the full vocabulary at 0.8 also keeps 3 (3/4 above it): the order matters.
    logits = torch.tensor([[1 / 16, 1 / 2, 1 / 4, 1 / 8, 1 / 16]]).log()
    assert sampling_support(logits, 1.0, 3, 0.8).tolist() == [[False, True, True, False, False]]
    assert sampling_support(logits, 1.0, 0, 0.8).tolist() == [[False, True, True, True, False]]
    soft = LatentParams("soft")
    got = sample_and_mix_reference(logits, I5, I5, 1.0, 3, greedy=True, latent=soft, top_p=0.8)[2]
    torch.testing.assert_close(got, torch.tensor([[0.0, 2 / 3, 1 / 3, 0, 0]]))
    # temperature comes first: at T = 1/2, p is (1, 64, 16, 4, 1)/86, top-3 (64, 16, 4)/84;
    # 64/84 < 0.8 above token 2, 80/84 above 3: the same two tokens, as (64, 16)/80
    got = sample_and_mix_reference(logits, I5, I5, 0.5, 3, greedy=True, latent=soft, top_p=0.8)[2]
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.8, 0.2, 0, 0]]))


def test_the_mixtures_own_nucleus_within_the_samplers():
    # the sampler's nucleus 0.9 keeps 0, 1, 2, 3 as (1, 8, 3, 3)/15; the mixture's own 0.6
    # within it: 8/15 < 0.6 above token 2, 11/15 above 3: (8/11, 3/11)
    got = sample_and_mix_reference(
        P5.log(), I5, I5, 1.0, greedy=True, latent=LatentParams("soft", top_p=0.6), top_p=0.9
    )[2]
    torch.testing.assert_close(got, torch.tensor([[0.0, 8 / 11, 3 / 11, 0, 0]]))


def test_the_draw_stays_in_the_nucleus_at_its_renormalised_frequencies():
    n = 4000
    logits = P5.log().expand(n, 5)
    tok = sample_and_mix_reference(logits, I5, I5, 1.0, seed=3, offset=0, top_p=0.6)[0]
    assert set(tok.tolist()) == {1, 2}
    freq = (tok == 1).float().mean().item()
    assert abs(freq - 8 / 11) < 4 * (8 / 11 * 3 / 11 / n) ** 0.5  # 4 standard errors
    # the log-prob stays the policy's, over the full vocabulary
    lp = sample_and_mix_reference(P5.log(), I5, I5, 1.0, seed=3, offset=0, top_p=0.6)[1]
    assert lp.item() == pytest.approx(P5[0, tok[0]].log().item(), abs=1e-6)


def test_bad_top_p_is_named():
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sampling top_p must be in"):
            sample_and_mix_reference(P5.log(), I5, I5, 1.0, top_p=bad)
    w = torch.randn(300, 5)
    with pytest.raises(ValueError, match="a nucleus needs top_k 0 or <= 128, got top_k 200"):
        sample_and_mix_triton(torch.randn(1, 5), w, w, 1.0, 200, top_p=0.5)
    assert nucleus_is_fused(0, 300, None, 0.9) and nucleus_is_fused(20, 300, None, 0.9)
    assert nucleus_is_fused(200, 300, None, 1.0) and not nucleus_is_fused(200, 300, LatentParams(top_p=0.5), 1.0)


# ----------------------------------------------------------------------- fused against the reference
LATENTS = [
    None,
    LatentParams("hrpo", top_p=0.6),
    LatentParams("soft", temperature=0.6, top_p=0.7),
    LatentParams("moi", beta=0.5),
    LatentParams("soft-noise", noise_std=0.2, top_p=0.8),
    LatentParams("gumbel-soft", gumbel_tau=0.4, top_p=0.5),
]


def _inputs(B, V, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, D, generator=g)
    w = (torch.randn(V, D, generator=g) / D**0.25).to(dtype)  # logits spread over a few units
    e = torch.randn(V, D, generator=g).to(dtype)
    return hidden, w, e


def _poisoned(B, D):
    return torch.full((B,), -7, dtype=torch.int64), torch.full((B,), float("nan")), torch.full((B, D), float("nan"))


def _check(got, want, top_p, latent, greedy):
    assert torch.equal(got[0], want[0]), (top_p, latent, greedy)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 128])
def test_cpp_twin_equals_the_reference(ext, dtype, k):  # noqa: F811
    B, V, D = 7, 301, 19
    hidden, w, e = _inputs(B, V, D, dtype, seed=k)
    logits = hidden @ w.float().T
    seed, offset = torch.tensor([11]), torch.tensor([5 * V])
    cut = 0
    for top_p in (0.35, 0.9):
        for latent in LATENTS:
            for greedy in (False, True):
                out = _poisoned(B, D)
                got = topk_sample_mix(
                    logits, e, k, 0.8, greedy, seed, offset, out=out, impl="ext", latent=latent, top_p=top_p
                )
                noise = dict(seed=11, offset=5 * V, latent=latent)
                want = sample_and_mix_reference(hidden, w, e, 0.8, k, greedy, top_p=top_p, **noise)
                _check(got, want, top_p, latent, greedy)
                whole = sample_and_mix_reference(hidden, w, e, 0.8, k, greedy, **noise)
                cut += not torch.equal(got[0], whole[0]) or not torch.allclose(got[2], whole[2])
    assert k == 1 or cut > 0, "no nucleus changed anything: the comparison would prove little"


triton_only = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 100])
def test_triton_top_k_tail_equals_the_reference(dtype, k):
    B, V, D = 5, 203, 24
    hidden, w, e = _inputs(B, V, D, dtype, seed=k + 1)
    seed, offset, rows = torch.tensor([4]), torch.tensor([3 * V]), torch.tensor([9, 2, 0, 6, 3])
    for top_p in (0.4, 0.85):
        for latent in LATENTS:
            for greedy in (False, True):
                noise = dict(row_ids=rows, latent=latent, top_p=top_p)
                got = sample_and_mix_triton(hidden, w, e, 0.7, k, greedy, seed=seed, offset=offset, **noise)
                want = sample_and_mix_reference(hidden, w, e, 0.7, k, greedy, seed=4, offset=3 * V, **noise)
                _check(got, want, top_p, latent, greedy)


@triton_only
@pytest.mark.parametrize("top_p, want", NUCLEI[:-1] + [(1e-6, [0, 1, 0, 0, 0])])
def test_triton_full_vocabulary_nucleus_by_hand(top_p, want):
    # the threshold search's cut, ties included, on the 5-token example (E = I: soft's input is p)
    got = sample_and_mix_triton(P5.log(), I5, I5, 1.0, 0, True, latent=LatentParams("soft"), top_p=top_p)[2]
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float32))
    got = sample_and_mix_triton(P5.log(), I5, I5, 1.0, 0, True, latent=LatentParams("soft", top_p=top_p))[2]
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float32))


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_full_vocabulary_nucleus_equals_the_reference(dtype):
    B, V, D = 3, 251, 20  # one interpreter tile: each of the search's 30 passes is one step
    hidden, w, e = _inputs(B, V, D, dtype, seed=6)
    seed, offset, rows = torch.tensor([2]), torch.tensor([7 * V]), torch.tensor([5, 0, 2])
    cut = 0
    for top_p, latent in zip((0.3, 0.9, 1.0, 0.5, 0.9, 1.0), LATENTS):  # 1.0: the mixture's nucleus alone
        for greedy in (False, True):
            noise = dict(row_ids=rows, latent=latent, top_p=top_p)
            out = _poisoned(B, D)
            got = sample_and_mix_triton(hidden, w, e, 0.7, 0, greedy, seed=seed, offset=offset, out=out, **noise)
            want = sample_and_mix_reference(hidden, w, e, 0.7, 0, greedy, seed=2, offset=7 * V, **noise)
            _check(got, want, top_p, latent, greedy)
            whole = sample_and_mix_reference(hidden, w, e, 0.7, 0, greedy, seed=2, offset=7 * V, row_ids=rows)
            cut += not torch.equal(got[0], whole[0])
    assert cut > 0, "no nucleus changed a token: the comparison would prove little"


@triton_only
def test_a_row_keeps_its_nucleus_draw_whatever_the_batch_around_it():
    B, V, D = 6, 150, 16
    hidden, w, e = _inputs(B, V, D, torch.float32, seed=2)
    seed, offset = torch.tensor([8]), torch.tensor([0])
    noise = dict(seed=seed, offset=offset, top_p=0.7, latent=LatentParams("gumbel-soft", top_p=0.8))
    for k in (30, 0):
        full = sample_and_mix_triton(hidden, w, e, 0.9, k, row_ids=torch.arange(B), **noise)
        part = sample_and_mix_triton(hidden[[4, 1]], w, e, 0.9, k, row_ids=torch.tensor([4, 1]), **noise)
        assert torch.equal(part[0], full[0][[4, 1]])
        torch.testing.assert_close(part[2], full[2][[4, 1]])


# ----------------------------------------------------------------------- the engine and the scheduler
def test_engine_top_p_equals_the_reference_loop(ext, tokenizer):  # noqa: F811
    hm = HybridModel(build_model("qwen2", len(tokenizer), seed=1))
    with torch.no_grad():
        hm.gate.lam.uniform_(2.0, 3.0)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id]
    prompts = [tokenizer.encode(p) for p in ("Tom has 12 apples", "x") for _ in range(3)]
    engine = RolloutEngine(hm, matcher, eos, tokenizer.pad_token_id, EngineOptions(latent_dtype=torch.float32))
    texts = []
    for top_k, top_p in ((20, 0.5), (0, 0.5), (20, 1.0)):
        cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=top_k, top_p=top_p)
        ref = rollout(hm, prompts, cfg, matcher, eos, tokenizer.pad_token_id, seed=5, latent_dtype=torch.float32)
        out = engine.generate(prompts, cfg, seed=5)
        assert torch.equal(ref.completion_ids, out.completion_ids)
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.latents, ref.latents, atol=1e-4, rtol=1e-4)
        texts.append(out.completion_ids)
    assert not torch.equal(texts[0], texts[2]), "top_p 0.5 drew what top_p 1 draws: the test would prove little"


def test_scheduler_rows_with_different_top_p_equal_each_request_alone(tokenizer):
    hm = HybridModel(build_model("qwen2", len(tokenizer), seed=3)).eval()
    engine = RolloutEngine(hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    rng = random.Random(1)
    reqs = [
        Request(tokenizer.encode(text), max_tokens=10, n=2, temperature=1.0, top_k=k, top_p=p, greedy=False, seed=s)
        for text, k, p, s in [("one two", 20, 0.5, 1), ("alpha", 0, 0.7, 2), ("the beta", 20, 1.0, 3)]
    ]
    sched = Scheduler(engine, max_batch=8, max_model_len=48)
    for req in rng.sample(reqs, len(reqs)):
        sched.submit(req)
    while sched.busy():
        sched.step()
    for req in reqs:
        assert [c.tokens for c in req.choices] == alone(engine, req), f"top_p {req.top_p} differs from alone"


def test_the_programs_refuse_a_top_p_outside_0_1_naming_the_flag():
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"--top-p must be a number in \(0, 1\]"):
            eval_cli._check_args(eval_cli.parser().parse_args(["--top-p", bad]))
        with pytest.raises(ConfigError, match=r"--top-p must be a number in \(0, 1\]"):
            inspect_cli._check(inspect_cli.parser().parse_args(["--prompt", "2 + 3?", "--top-p", bad]))
        with pytest.raises(ConfigError, match=r"--top-p in \(0, 1\]"):
            serve_cli.check(serve_cli.parser().parse_args(["--top-p", bad]))


@triton_only
@pytest.mark.parametrize("top_k", [20, 0])
def test_gpu_path_engine_with_top_p_equals_the_reference_loop(top_k):
    """The engine as on CUDA (HRPO_GPU_PATH=cpu: graphs, fused kernels; top-k: the extension's
    twin, top_k 0: the Triton threshold search) draws the reference loop's tokens under a seed."""
    hm, tok, prompts, eos = gpu_setup("llama", torch.float32)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=top_k, top_p=0.6)
    matcher = MarkerMatcher(tok)
    opts = EngineOptions(check_every=3, latent_dtype=torch.float32)
    with gpu_path_mode():
        engine = RolloutEngine(hm, matcher, eos, tok.pad_token_id, opts)
        out = engine.generate(prompts, sampling, seed=4)
    assert engine.graphs and out.stats["graph_captures"] >= 1  # the step was capturable: fused sampling
    ref = rollout(hm, prompts, sampling, matcher, eos, tok.pad_token_id, seed=4, latent_dtype=torch.float32)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=5e-5, rtol=0)
    torch.testing.assert_close(out.latents, ref.latents, atol=1e-4, rtol=1e-4)
    whole = rollout(hm, prompts, replace(sampling, top_p=1.0), matcher, eos, tok.pad_token_id, seed=4)
    assert not torch.equal(whole.completion_ids, ref.completion_ids), "top_p 0.6 changed nothing here"
