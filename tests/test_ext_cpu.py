"""The C++ twins of the extension (CPU-only JIT build) against the pure-torch references,
Philox known answers, and a compile check of every hrpo_kernels/csrc/*.cu with nvcc."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import torch

from hrpo.core.marker import kmp_automaton
from hrpo_kernels import _ext
from hrpo_kernels.gated_blend import gated_blend, gated_blend_ext, gated_blend_reference
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.sample_and_mix import sample_and_mix, sample_and_mix_reference
from hrpo_kernels.step_controller import StepBuffers, step_controller, step_controller_reference
from hrpo_kernels.topk_sample import topk_sample_mix, topk_sample_mix_reference

CSRC = _ext.CSRC  # the extension's sources, inside the package
BUILD_BUDGET_S = 120.0


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """Build the CPU-only extension once; install it as the dispatchers' extension. The root is
    one folder per session, so tests/test_ext_build.py loads this same build (or builds it first)."""
    build_dir = tmp_path_factory.getbasetemp() / "hrpo_ext_root"
    start = time.perf_counter()
    try:
        mod = _ext.build_extension(cpu_only=True, build_directory=build_dir, extra_cflags=["-O2"])
    except Exception as exc:  # a broken toolchain is a test failure, not a skip
        pytest.fail(f"CPU-only extension build failed: {exc}")
    elapsed = time.perf_counter() - start
    print(f"\n[hrpo ext] CPU-only JIT build: {elapsed:.1f} s")
    assert elapsed < BUILD_BUDGET_S * 1.5, f"extension build took {elapsed:.0f} s"
    _ext.set_extension(mod)
    yield mod
    _ext.set_extension(None)


def test_first_build_is_announced(tmp_path, monkeypatch, capsys):
    """A build that compiles says so on stderr (it takes a minute); loading the published build
    of the same key stays quiet. The compile and import steps are stubbed."""

    def fake_compile(name, build_dir, *args):
        (build_dir / f"{name}.so").write_bytes(b"module")

    monkeypatch.setattr(_ext, "_compile", fake_compile)
    monkeypatch.setattr(_ext, "_import_so", lambda path: path)
    first = _ext.build_extension(cpu_only=True, build_directory=tmp_path)
    assert "compiling the C++ extension" in capsys.readouterr().err
    assert _ext.build_extension(cpu_only=True, build_directory=tmp_path) == first
    assert capsys.readouterr().err == ""


def _seed(v):
    return torch.tensor([v], dtype=torch.int64)


def _poisoned(B, D):
    return (
        torch.full((B,), -7, dtype=torch.int64),
        torch.full((B,), float("nan")),
        torch.full((B, D), float("nan")),
    )


# ---------------------------------------------------------------------------------- Philox

KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter words, key words -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ext, ctr, key, want):
    assert tuple(ext.philox4x32_10(list(ctr), list(key))) == want


def test_philox_uniform_range_and_mean(ext):
    u = torch.tensor([ext.philox_uniform(123, c) for c in range(20000)])
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01  # sd of the mean ~ 0.002


# --------------------------------------------------------------------------- topk_sample_mix

B, V, D = 3, 300, 40


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 50, 128])
@pytest.mark.parametrize("temperature", [0.5, 1.3])
@pytest.mark.parametrize("greedy", [False, True])
def test_topk_twin_matches_reference(ext, emb_dtype, k, temperature, greedy):
    g = torch.Generator().manual_seed(1000 * k + int(10 * temperature) + greedy)
    logits = torch.randn(B, V, generator=g) * 3
    emb = torch.randn(V, D, generator=g).to(emb_dtype)
    out = _poisoned(B, D)
    tok, lp, h = topk_sample_mix(
        logits, emb, k, temperature, greedy, seed=_seed(42), offset=_seed(7), out=out, impl="ext"
    )
    assert all(o is r for o, r in zip(out, (tok, lp, h)))
    _, idx = torch.topk(logits, k, dim=-1)
    assert bool((idx == tok[:, None]).any(-1).all()), "sampled token outside the top-k set"
    if greedy:
        assert torch.equal(tok, logits.argmax(-1))
    _, lp_ref, h_ref = topk_sample_mix_reference(logits, emb, k, temperature, greedy, tokens=tok)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(h).all() and torch.isfinite(lp).all()


def test_topk_fp16_embedding_and_strided_logits(ext):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(B, V + 13, generator=g)
    logits = wide[:, :V]  # row stride V + 13
    emb = torch.randn(V, D, generator=g).half()
    tok, lp, h = topk_sample_mix(logits, emb, 17, 0.7, seed=_seed(1), offset=_seed(0), impl="ext")
    _, lp_ref, h_ref = topk_sample_mix_reference(logits, emb, 17, 0.7, tokens=tok)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_topk_ties_take_lowest_ids(ext):
    # 10 equal logits at the top, k = 4: the twin takes the 4 lowest ids among them
    logits = torch.zeros(2, V)
    tied = torch.tensor([3, 17, 18, 90, 91, 150, 151, 200, 260, 299])
    logits[:, tied] = 5.0
    emb = torch.eye(V, D)
    tok, _, h = topk_sample_mix(logits, emb, 4, 1.0, seed=_seed(3), offset=_seed(0), impl="ext")
    assert set(tok.tolist()) <= {3, 17, 18, 90}
    want = torch.zeros(D)
    want[[3, 17, 18]] = 0.5  # p = 1/4 each, ||p|| = 1/2; id 90 >= D has a zero row
    torch.testing.assert_close(h[0], want)


def test_topk_determinism(ext):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(64, V, generator=g) * 0.5  # flat: many plausible tokens
    emb = torch.randn(V, D, generator=g)
    a = topk_sample_mix(logits, emb, 50, 1.0, seed=_seed(11), offset=_seed(1000), impl="ext")[0]
    b = topk_sample_mix(logits, emb, 50, 1.0, seed=_seed(11), offset=_seed(1000), impl="ext")[0]
    c = topk_sample_mix(logits, emb, 50, 1.0, seed=_seed(11), offset=_seed(1000 + 64 * V), impl="ext")[0]
    d = topk_sample_mix(logits, emb, 50, 1.0, seed=_seed(12), offset=_seed(1000), impl="ext")[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_topk_twin_row_ids(ext):
    """Stable row ids in the noise counter: the twin's tokens equal the seeded reference's, and
    rows [2, 0] run alone with their ids draw what they drew in the full batch."""
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(5, V, generator=g)  # flat: the noise decides
    emb = torch.randn(V, D, generator=g)
    ids = torch.tensor([7, 2, 0, 4, 1])
    noise = dict(seed=_seed(2**40 + 3), offset=_seed(11))
    for k in (5, 50, 128):
        tok, lp, h = topk_sample_mix(logits, emb, k, 0.9, row_ids=ids, impl="ext", **noise)
        tok_r, lp_r, h_r = topk_sample_mix(logits, emb, k, 0.9, row_ids=ids, impl="reference", **noise)
        assert torch.equal(tok, tok_r)
        torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_r, rtol=1e-4, atol=1e-5)
        full = topk_sample_mix(logits, emb, k, 0.9, impl="ext", **noise)[0]
        part = topk_sample_mix(logits[[2, 0]], emb, k, 0.9, row_ids=torch.tensor([2, 0]), impl="ext", **noise)[0]
        assert torch.equal(part, full[[2, 0]])
    assert not torch.equal(tok, full), "the ids must move the noise"
    with pytest.raises(ValueError, match="row_ids"):
        topk_sample_mix(logits, emb, 5, 0.9, row_ids=torch.arange(4), impl="ext", **noise)


CHI2_DF9_P001 = 27.877  # chi-square critical value, df = 9, p = 0.001


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    n = counts.sum()
    expected = p * n
    assert float(expected.min()) >= 5
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_setup():
    g = torch.Generator().manual_seed(77)
    row = torch.randn(V, generator=g) * 1.5
    k, temperature = 10, 1.3
    vals, idx = torch.topk(row / temperature, k)
    return row, k, temperature, idx, torch.softmax(vals, -1)


def test_topk_twin_chi_square(ext):
    row, k, temperature, idx, p = _chi2_setup()
    rows = 2000
    logits = row.expand(rows, V).contiguous()
    emb = torch.zeros(V, 8)
    counts = torch.zeros(k)
    for step in range(10):  # 20000 draws: 2000 rows x 10 offsets
        tok = topk_sample_mix(logits, emb, k, temperature, seed=_seed(2024), offset=_seed(step * rows * V), impl="ext")[
            0
        ]
        counts += (tok[:, None] == idx[None, :]).sum(0).float()
    assert counts.sum() == 10 * rows
    assert _chi2(counts, p) < CHI2_DF9_P001


def test_topk_reference_chi_square():
    row, k, temperature, idx, p = _chi2_setup()
    logits = row.expand(20000, V).contiguous()
    g = torch.Generator().manual_seed(3)
    tok = topk_sample_mix_reference(logits, torch.zeros(V, 8), k, temperature, generator=g)[0]
    counts = (tok[:, None] == idx[None, :]).sum(0).float()
    assert counts.sum() == 20000
    assert _chi2(counts, p) < CHI2_DF9_P001


def test_topk_dispatch(ext, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    emb = torch.randn(V, D, generator=g)
    called = []
    real = ext.topk_sample_mix
    monkeypatch.setattr(
        _ext,
        "_cached",
        type(
            "Spy",
            (),
            {
                "has_cuda": staticmethod(lambda: False),
                "topk_sample_mix": staticmethod(lambda *a: (called.append(1), real(*a))),
            },
        )(),
    )
    tok, _, _ = topk_sample_mix(logits, emb, 5, 1.0, greedy=True)  # CPU default: the reference
    assert torch.equal(tok, logits.argmax(-1)) and not called
    topk_sample_mix(logits, emb, 5, 1.0, impl="ext")
    assert called
    monkeypatch.setenv("HRPO_KERNELS", "reference")
    called.clear()
    topk_sample_mix(logits, emb, 5, 1.0)
    assert not called
    with pytest.raises(ValueError, match="temperature"):
        topk_sample_mix(logits, emb, 5, 0.0)
    with pytest.raises(ValueError, match="k <= 128"):
        topk_sample_mix(logits, emb, 129, 1.0, impl="ext")


def test_sample_and_mix_ext_path_matches_reference(ext, monkeypatch):
    """The CPU engine's sampling (sample_and_mix impl="ext": lm-head GEMM, then the C++ twin
    over OpenMP threads) draws the reference's tokens under one seed and row ids; top_k = 0
    (full vocabulary), which the twin does not take, stays on the reference."""
    g = torch.Generator().manual_seed(3)
    rows, d = 37, 24
    hidden, lm = torch.randn(rows, d, generator=g), torch.randn(V, d, generator=g) * 0.5
    emb = torch.randn(V, d, generator=g)
    noise = dict(seed=_seed(5), offset=_seed(V * 11), row_ids=torch.randperm(rows, generator=g) * 3)
    calls = []
    real = ext.topk_sample_mix
    monkeypatch.setattr(ext, "topk_sample_mix", lambda *a: (calls.append(1), real(*a))[1])
    for top_k, twin in ((20, True), (0, False)):
        calls.clear()
        tok, lp, h = sample_and_mix(hidden, lm, emb, 0.7, top_k, impl="ext", **noise)
        tok_ref, lp_ref, h_ref = sample_and_mix_reference(hidden, lm, emb, 0.7, top_k, **noise)
        assert bool(calls) == twin
        assert torch.equal(tok, tok_ref)
        torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


LATENT_MODES = [
    LatentParams("hrpo", temperature=0.6),
    LatentParams("soft"),
    LatentParams("moi", beta=0.7),
    LatentParams("soft-noise", noise_std=0.25),
    LatentParams("gumbel-soft", gumbel_tau=0.4),
]


@pytest.mark.parametrize("params", LATENT_MODES, ids=lambda p: p.mode)
@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("greedy", [False, True])
def test_topk_twin_latent_modes_match_reference(ext, params, emb_dtype, greedy):
    """The C++ twin's next input of every latent mode (hrpo_kernels/latent_input.py) against the
    reference, with stable row ids, on poisoned outputs; k 13 of V 300, d 40."""
    g = torch.Generator().manual_seed(params.mode_id + 10 * greedy)
    logits = torch.randn(B, V, generator=g) * 2
    emb = torch.randn(V, D, generator=g).to(emb_dtype)
    rid = torch.tensor([4, 0, 2])
    out = _poisoned(B, D)
    tok, lp, x = topk_sample_mix(
        logits,
        emb,
        13,
        0.9,
        greedy,
        seed=_seed(8),
        offset=_seed(3 * V),
        row_ids=rid,
        out=out,
        impl="ext",
        latent=params,
    )
    rtok, rlp, rx = topk_sample_mix(
        logits, emb, 13, 0.9, greedy, seed=_seed(8), offset=_seed(3 * V), row_ids=rid, impl="reference", latent=params
    )
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, rx, rtol=1e-5, atol=2e-5)


def _gate_float64(e, h, w_r, b_r, w_i, b_i, lam):
    """The gate's formula in float64 (c = 8): blended rows and a, for every row."""
    e, h = e.double(), h.double()
    r = torch.sigmoid(e @ w_r.double().T + b_r.double())
    i = torch.sigmoid(e @ w_i.double().T + b_i.double())
    a = torch.exp(-8.0 * torch.nn.functional.softplus(-lam.double()) * r)
    return a * e + torch.sqrt(1 - a * a + 1e-8) * (i * h), a


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gated_blend_twin_matches_reference(ext, h_dtype):
    """The C++ gate forward (one GEMM, then a polynomial-exp epilogue) against the reference
    on an odd shape, saturated gate logits and a wide spread of Lambda; rows outside the
    mask pass e through bit for bit."""
    g = torch.Generator().manual_seed(11)
    rows, d = 13, 40
    e = torch.randn(rows, d, generator=g) * 3
    e[0] *= 40  # gate logits far into sigmoid's tails
    h = torch.randn(rows, d, generator=g).to(h_dtype)
    mask = torch.rand(rows, generator=g) < 0.6
    mask[:2] = torch.tensor([True, False])
    w_r, w_i = torch.randn(d, d, generator=g) * 0.3, torch.randn(d, d, generator=g) * 0.3
    b_r, b_i = torch.randn(d, generator=g), torch.randn(d, generator=g)
    lam = torch.linspace(-6.0, 9.0, d)
    with torch.no_grad():
        out, a = gated_blend(e, h, mask, w_r, b_r, w_i, b_i, lam, impl="ext")
    out_ref, a_ref = gated_blend_reference(e, h, mask, w_r, b_r, w_i, b_i, lam)
    torch.testing.assert_close(a, a_ref, rtol=2e-6, atol=1e-7)
    # Near a = 1, sqrt(1 - a^2) turns one ulp of a into a relative error of up to ~1e-2 (both
    # fp32 paths miss float64 there, in either direction), so out is checked against float64
    # with a bound that a's own error explains: |d out / d a| |a - a64| plus a few ulp.
    out64, a64 = _gate_float64(e, h, w_r, b_r, w_i, b_i, lam)
    s64 = torch.sqrt(1 - a64 * a64 + 1e-8)
    ih = (out64 - a64 * e.double()) / s64
    slope = e.double().abs() + a64 / s64 * ih.abs()
    tol = 4e-7 * (a64 * e.double().abs() + s64 * ih.abs()) + slope * ((a.double() - a64).abs() + 1e-7)
    err = (out.double() - out64).abs()
    assert (err[mask] <= tol[mask]).all(), f"max excess {(err - tol)[mask].max().item():.3g}"
    assert torch.equal(out[~mask], e[~mask])
    with pytest.raises(ValueError, match="e must be"):
        gated_blend_ext(e.double(), h, mask, w_r, b_r, w_i, b_i, lam)
    e16, weights = e.bfloat16(), (w_r, b_r, w_i, b_i, lam)  # a bf16 model's embeddings: the reference's
    with torch.no_grad():
        got16 = gated_blend(e16, h, mask, *weights, impl="ext")
        assert all(torch.equal(x, y) for x, y in zip(got16, gated_blend_reference(e16, h, mask, *weights)))
    grad_path, _ = gated_blend(e, h, mask, w_r.requires_grad_(), b_r, w_i, b_i, lam, impl="ext")
    assert grad_path.requires_grad  # under autograd: the reference, not the forward-only twin


# --------------------------------------------------------------------------- step_controller

# A hand-made vocabulary whose pieces split the marker "####" across tokens.
PIECES = ["", "", "#", "##", "###", "a", "#a", "a#", "1", " #", "##1", "####", "b##", "", "x"]
PAD, EOS = 0, 1  # "" pieces: special tokens (13 too)
EOS_IDS = [EOS, 13]


def _table(dtype):
    marker = "####"
    S = len(marker)
    step = kmp_automaton(marker)
    table = torch.zeros(S + 1, len(PIECES), dtype=torch.int64)
    for tok, piece in enumerate(PIECES):
        for start in range(S + 1):
            state = start
            for ch in piece:
                state = step(state, ch)
            table[start, tok] = state
    return table.to(dtype)


def test_marker_table_is_sane():
    table = _table(torch.int64)
    assert table[4].eq(4).all()  # absorbing
    assert table[2, 3] == 4 and table[1, 4] == 4 and table[3, 9] == 1 and table[0, 11] == 4
    assert table[3, 5] == 0 and table[2, 0] == 2


@pytest.mark.parametrize("table_dtype,state_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int32)])
@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hybrid", [True, False])
def test_step_controller_twin_matches_reference(ext, table_dtype, state_dtype, latent_dtype, hybrid):
    Bn, T, d, max_new = 7, 12, 24, 10  # the length limit stops the loop before T
    table = _table(table_dtype)
    hash_heavy = torch.tensor([1.0, 0.3, 4, 3, 2, 1, 2, 2, 1, 2, 1, 0.5, 1, 0.3, 1])
    runs = {}
    for name, fn in (
        ("twin", lambda *a, **kw: step_controller(*a, **kw, impl="ext")),
        ("ref", step_controller_reference),
    ):
        gg = torch.Generator().manual_seed(123)
        state = torch.zeros(Bn, dtype=state_dtype)
        finished = torch.zeros(Bn, dtype=torch.bool)
        finished[5] = True  # already finished before the first step
        t = torch.zeros(1, dtype=torch.int64)
        bufs = StepBuffers.allocate(Bn, T, d, latent_dtype=latent_dtype, pad_id=PAD)
        for tensor in bufs.tensors():  # poison: every written value must come from the step
            if tensor.dtype == torch.bool:
                tensor.fill_(True)
            elif tensor.is_floating_point():
                tensor.fill_(float("nan"))
            else:
                tensor.fill_(-5)
        bufs.latents.zero_()  # columns after the last step stay as allocated
        bufs.tokens.fill_(PAD)
        bufs.logprobs.zero_()
        bufs.think.zero_()
        bufs.mask.zero_()
        lives, ts = [], []
        for _ in range(T + 1):  # one step past T: a no-op
            tokens = torch.multinomial(hash_heavy, Bn, replacement=True, generator=gg)
            logprobs = -torch.rand(Bn, generator=gg) * 5
            h_hat = torch.randn(Bn, d, generator=gg)
            fn(table, state, finished, tokens, logprobs, h_hat, EOS_IDS, PAD, t, max_new, bufs, hybrid)
            lives.append(int(bufs.n_live))
            ts.append(int(t))
        runs[name] = (state.clone(), finished.clone(), bufs, lives, ts)
    (s1, f1, b1, l1, t1), (s2, f2, b2, l2, t2) = runs["twin"], runs["ref"]
    assert torch.equal(s1, s2) and torch.equal(f1, f2)
    assert l1 == l2 and t1 == t2
    for x, y in zip(b1.tensors(), b2.tensors()):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)
    # the scenario covers what it claims
    assert t1[-1] == T, "t must stop advancing at the buffer width"
    assert bool(f1.all()), "the length limit finishes every row"
    assert not bool(b1.mask[5].any()), "an already-finished row is never alive"
    assert bool((b1.tokens[5] == PAD).all())
    assert bool(b1.mask[:, max_new:].logical_not().all())
    if hybrid:
        assert bool(b1.think.any()) and bool((b1.mask & ~b1.think).any()), "thinking and answering both occur"
    else:
        assert not bool(b1.think.any())
    assert bool((b1.tokens == EOS).any() | (b1.tokens == 13).any()), "an EOS ends some row"


def test_step_controller_matches_rollout_semantics(ext):
    """The controller's buffers equal the loop of hrpo/engine/rollout.py on one scripted batch."""
    table = _table(torch.int64)
    seq = torch.tensor([[5, 2, 3, 8, 1, 14], [4, 6, 2, 9, 8, 14], [11, 5, 5, 5, 5, 5]])
    Bn, T = seq.shape
    state = torch.zeros(Bn, dtype=torch.int64)
    finished = torch.zeros(Bn, dtype=torch.bool)
    t = torch.zeros(1, dtype=torch.int64)
    bufs = StepBuffers.allocate(Bn, T, 4, pad_id=PAD)
    for col in range(T):
        step_controller(
            table,
            state,
            finished,
            seq[:, col],
            torch.zeros(Bn),
            torch.zeros(Bn, 4),
            EOS_IDS,
            PAD,
            t,
            T,
            bufs,
            impl="ext",
        )
    assert bufs.tokens.tolist() == [[5, 2, 3, 8, 1, PAD], [4, 6, 2, 9, 8, 14], [11, 5, 5, 5, 5, 5]]
    assert bufs.mask.tolist() == [[True] * 5 + [False], [True] * 6, [True] * 6]
    # row 0: "a" "#" "##" "1" <eos>: "###" then "1", no marker, thinks until its EOS (included);
    # row 1: "###" "#a": the marker completes at col 1; row 2: "####" at col 0
    assert bufs.think.tolist() == [
        [True, True, True, True, True, False],
        [True, False, False, False, False, False],
        [False] * 6,
    ]
    assert int(bufs.n_live) == 0 and int(t) == T


def test_step_controller_errors_are_one_line(ext):
    table = _table(torch.int64)
    bufs = StepBuffers.allocate(3, 4, 2)
    with pytest.raises(RuntimeError) as info:
        step_controller(
            table,
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(2, dtype=torch.bool),
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3),
            torch.zeros(3, 2),
            EOS_IDS,
            PAD,
            torch.zeros(1, dtype=torch.int64),
            4,
            bufs,
            impl="ext",
        )
    assert "finished" in str(info.value).splitlines()[0]


# ------------------------------------------------------------------------------ nvcc compile


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile(tmp_path):
    """Every csrc/*.cu compiles with plain nvcc (no torch headers): a syntax error cannot land."""
    sources = sorted(CSRC.glob("*.cu"))
    assert sources
    procs = [
        (
            src,
            subprocess.Popen(
                ["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for src in sources
    ]
    failures = []
    for src, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src.name}:\n{out}")
    assert not failures, "\n".join(failures)
