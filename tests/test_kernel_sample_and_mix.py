"""The fused sample_and_mix kernels against the reference.

Without a GPU the Triton launcher runs on CPU tensors under TRITON_INTERPRET=1 (set in
conftest.py, before anything imports triton). Small odd shapes, fresh inputs per case, outputs
poisoned before every call.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from hrpo_kernels import sample_and_mix, sample_and_mix_reference
from hrpo_kernels._common import triton_available
from hrpo_kernels.philox import philox_uniform
from hrpo_kernels.sample_and_mix import sample_and_mix_triton

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16/fp16 inputs: the reference upcasts to fp32, so only summation order and the two-half
# split of p in the mixture differ; fp32: ieee dots.
TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}
# chi-square critical values at p = 0.001 for the degrees of freedom used below
CHI2_CRIT_0001 = {4: 18.467, 36: 67.985}


def _inputs(B, V, D, dtype, tied, seed, scale=0.35):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g)
    w = torch.randn(V, D, generator=g) * scale
    e = w if tied else torch.randn(V, D, generator=g)
    h, w = h.to(DEV, dtype), w.to(DEV, dtype)
    e = w if tied else e.to(DEV, dtype)
    return h, w, e


def _poisoned(B, D):
    return (
        torch.full((B,), -1, dtype=torch.int64, device=DEV),
        torch.full((B,), float("nan"), device=DEV),
        torch.full((B, D), float("nan"), device=DEV),
    )


def _scalar(x):
    return torch.tensor([x], dtype=torch.int64, device=DEV)


def _check(h, w, e, temperature, top_k, greedy, out, tol):
    tok, lp, hh = out
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and hh.dtype == torch.float32
    assert bool(((tok >= 0) & (tok < w.shape[0])).all()), tok
    ref_tok, ref_lp, ref_h = sample_and_mix_reference(h, w, e, temperature, top_k, greedy=True)
    scaled = (h.float() @ w.float().T) / temperature
    if greedy:
        assert torch.equal(tok, ref_tok)
    elif 0 < top_k < w.shape[0]:  # the sample lies in the top-k set
        kth = scaled.topk(top_k, dim=-1).values[:, -1]
        assert bool((scaled.gather(-1, tok[:, None]).squeeze(-1) >= kth - 1e-4).all())
    want_lp = torch.log_softmax(scaled, -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(hh, ref_h, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("top_k", [0, 1, 5, 50])
@pytest.mark.parametrize("temperature", [0.5, 1.3])
def test_matches_reference(dtype, tied, top_k, temperature):
    B, V, D = 3, 300, 40
    case = hash((str(dtype), tied, top_k, temperature)) % 10_000
    for greedy in (False, True):
        h, w, e = _inputs(B, V, D, dtype, tied, case + greedy)
        out = _poisoned(B, D)
        res = sample_and_mix_triton(h, w, e, temperature, top_k, greedy, seed=_scalar(case), offset=_scalar(7), out=out)
        assert all(a is b for a, b in zip(res, out))
        _check(h, w, e, temperature, top_k, greedy, out, TOL[dtype])


@pytest.mark.parametrize("B,splits,block_v", [(1, 1, 32), (3, 1, 64), (20, None, 32), (37, 4, 16)])
def test_full_vocab_tilings(B, splits, block_v):
    """Row blocks (B > 16), one split or many, tiles that straddle split ends."""
    V, D = 300, 40
    for tied in (True, False):
        h, w, e = _inputs(B, V, D, torch.float32, tied, B * 10 + tied)
        for greedy in (False, True):
            out = _poisoned(B, D)
            sample_and_mix_triton(
                h,
                w,
                e,
                0.8,
                0,
                greedy,
                seed=_scalar(3),
                offset=_scalar(0),
                out=out,
                splits=splits,
                block_v=block_v,
            )
            _check(h, w, e, 0.8, 0, greedy, out, TOL[torch.float32])


def _race_gap(h, w, temperature, top_k, seed, offset, row_ids):
    """Per row, the gap between the seeded reference's two best race scores: a token may flip
    between paths (logits summed in another order, x * (1/T) for x / T) only where it is ~0."""
    scaled = (h.float() @ w.float().T) / temperature
    B, V = scaled.shape
    ids = torch.arange(B, device=DEV) if row_ids is None else row_ids
    u = philox_uniform(seed, offset + ids[:, None] * V + torch.arange(V, device=DEV))
    score = scaled - torch.log(-torch.log(u))
    if 0 < top_k < V:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        score = score.masked_fill(scaled < kth, float("-inf"))
    top2 = score.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("top_k", [0, 5, 50])
@pytest.mark.parametrize("B,row_ids", [(3, None), (5, [7, 2, 0, 4, 1])], ids=["arange", "ids"])
def test_seeded_tokens_equal_reference(top_k, B, row_ids):
    """The Triton noise is the shared convention: with the same (seed, offset, row_ids) the
    kernels sample the reference's tokens (C++ twin and CUDA extension: tests/test_philox.py)."""
    V, D, temperature, seed, offset = 300, 40, 0.8, 2**40 + 17, 12345
    h, w, e = _inputs(B, V, D, torch.float32, False, 31 * B + top_k, scale=0.15)
    ids = None if row_ids is None else torch.tensor(row_ids, device=DEV)
    out = sample_and_mix_triton(
        h, w, e, temperature, top_k, False, seed=_scalar(seed), offset=_scalar(offset), row_ids=ids
    )
    ref = sample_and_mix_reference(h, w, e, temperature, top_k, seed=seed, offset=offset, row_ids=ids)
    sure = _race_gap(h, w, temperature, top_k, seed, offset, ids) > 1e-4
    assert int(sure.sum()) >= B - 1
    assert torch.equal(out[0][sure], ref[0][sure])
    assert not torch.equal(ref[0], sample_and_mix_reference(h, w, e, temperature, top_k, greedy=True)[0])
    tol = TOL[torch.float32]
    torch.testing.assert_close(out[1][sure], ref[1][sure], rtol=tol, atol=tol)
    torch.testing.assert_close(out[2], ref[2], rtol=tol, atol=tol)


@pytest.mark.parametrize("top_k", [0, 5])
def test_row_ids_keep_a_rows_noise(top_k):
    """A compacted batch (rows [2, 0] with row_ids [2, 0]) draws what those rows drew in the
    full batch; without the ids they would take rows 0 and 1's noise."""
    B, V, D = 5, 300, 40
    h, w, e = _inputs(B, V, D, torch.float32, True, 8 + top_k, scale=0.05)  # flat p: the noise decides
    run = lambda x, ids=None: sample_and_mix_triton(  # noqa: E731
        x, w, e, 1.0, top_k, False, seed=_scalar(77), offset=_scalar(3), row_ids=ids
    )[0]
    full = run(h)
    keep = torch.tensor([2, 0], device=DEV)
    assert torch.equal(run(h[keep], keep), full[keep])
    assert not torch.equal(run(h[keep]), full[keep])


def test_dispatcher_passes_row_ids(monkeypatch):
    """sample_and_mix hands row_ids to the fused path (it used to refuse them)."""
    sam = importlib.import_module("hrpo_kernels.sample_and_mix")  # the package's name is the function
    seen = {}
    monkeypatch.setattr(sam, "sampling_is_fused", lambda *a: True)
    monkeypatch.setattr(sam, "sample_and_mix_triton", lambda *a, **kw: seen.update(kw))
    ids = torch.tensor([1, 0])
    sam.sample_and_mix(*_inputs(2, 30, 16, torch.float32, True, 0), 1.0, seed=_scalar(1), row_ids=ids)
    assert seen["row_ids"] is ids


def _chi2(tokens, p):
    """Pearson's statistic over the support of p."""
    counts = torch.bincount(tokens.cpu(), minlength=p.numel()).double()
    expected = p.double().cpu() * tokens.numel()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_distribution(top_k):
    """Identical rows x step offsets (1500 draws full-vocab, 600 top-5; the interpreter runs
    one program per row): Pearson's chi-square against p at p = 0.001."""
    V, D, temperature = 37, 16, 0.9
    rows, steps = (150, 4) if top_k else (500, 3)
    h, w, e = _inputs(1, V, D, torch.float32, True, 11, scale=0.15)
    p_ref = torch.softmax((h.float() @ w.float().T)[0] / temperature, -1)
    if top_k:
        vals, idx = p_ref.topk(top_k)
        p = torch.zeros_like(p_ref).scatter_(0, idx, vals / vals.sum())
    else:
        p = p_ref
    support = p > 0
    assert float((p[support] * rows * steps).min()) >= 5, "every bin needs >= 5 expected draws"
    hb = h.expand(rows, D).contiguous()
    draws = []
    for step in range(steps):
        tok, _, _ = sample_and_mix_triton(
            hb, w, w, temperature, top_k, False, seed=_scalar(2024), offset=_scalar(step * rows * V), block_b=64
        )
        draws.append(tok)
    tokens = torch.cat(draws)
    assert bool(support[tokens.cpu()].all()), "a token outside the support was drawn"
    stat = _chi2(tokens, p)
    df = int(support.sum()) - 1
    assert stat < CHI2_CRIT_0001[df], (stat, df)


@pytest.mark.parametrize("top_k", [0, 5])
def test_seed_offset_reproducible(top_k):
    B, V, D = 40, 300, 40
    h, w, e = _inputs(B, V, D, torch.float32, False, 5, scale=0.05)  # flat p: many outcomes
    run = lambda s, o: sample_and_mix_triton(h, w, e, 1.0, top_k, False, seed=_scalar(s), offset=_scalar(o))[0]  # noqa: E731
    a = run(9, 1000)
    assert torch.equal(a, run(9, 1000))
    assert not torch.equal(a, run(9, 1000 + B * V))
    assert not torch.equal(a, run(10, 1000))


def test_dispatcher_cpu_uses_reference(monkeypatch):
    """CPU tensors (and HRPO_KERNELS=reference) take the reference, positional signature
    of hrpo/engine/rollout.py and the new keywords both accepted."""
    h, w, e = _inputs(4, 50, 16, torch.float32, True, 1)
    h, w, e = h.cpu(), w.cpu(), e.cpu()
    want = sample_and_mix_reference(h, w, e, 0.7, 5, False, torch.Generator().manual_seed(0))
    got = sample_and_mix(h, w, e, 0.7, 5, False, torch.Generator().manual_seed(0))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
    monkeypatch.setenv("HRPO_KERNELS", "reference")
    got = sample_and_mix(h, w, e, 0.7, 5, False, torch.Generator().manual_seed(0))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
    # a seed selects the extension's Philox noise instead of the generator's stream
    want = sample_and_mix_reference(h, w, e, 0.7, 5, False, None, seed=1, offset=0)
    got = sample_and_mix(h, w, e, 0.7, 5, False, torch.Generator().manual_seed(0), seed=_scalar(1).cpu(), offset=None)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


def test_rejects_bad_temperature():
    h, w, e = _inputs(2, 30, 16, torch.float32, True, 0)
    with pytest.raises(ValueError):
        sample_and_mix_triton(h, w, e, 0.0, 0, False, seed=_scalar(0), offset=_scalar(0))
