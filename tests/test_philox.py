"""hrpo_kernels.philox (pure torch) against Random123's known answers and the C++ twin of
hrpo_kernels/csrc/philox.h; the seeded sampling reference against the extension's tokens."""

from __future__ import annotations

import pytest
import torch

from hrpo_kernels import _ext
from hrpo_kernels.philox import philox4x32_10, philox_uniform
from hrpo_kernels.sample_and_mix import sample_and_mix, sample_and_mix_reference
from hrpo_kernels.topk_sample import sample_from_logits_reference, topk_sample_mix

KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter words, key words -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """The CPU-only extension, built as tests/test_ext_cpu.py builds it (the same key in the same
    session root: one compile serves both)."""
    try:
        mod = _ext.build_extension(
            cpu_only=True, build_directory=tmp_path_factory.getbasetemp() / "hrpo_ext_root", extra_cflags=["-O2"]
        )
    except Exception as exc:  # a broken toolchain is a test failure, not a skip
        pytest.fail(f"CPU-only extension build failed: {exc}")
    _ext.set_extension(mod)
    yield mod
    _ext.set_extension(None)


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_known_answers(ctr, key, want):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    got = tuple(int(w) for w in philox4x32_10(*words, *key))
    assert got == want


def test_known_answers_vectorised():
    """All three vectors in one call, in a batch with other counters (no cross-talk)."""
    ctr = torch.tensor([list(c) for c, _, _ in KAT], dtype=torch.int64)
    for i, (_, key, want) in enumerate(KAT):
        out = philox4x32_10(*ctr.T, *key)
        assert tuple(int(w[i]) for w in out) == want


def _counters():
    g = torch.Generator().manual_seed(0)
    small = torch.arange(2000, dtype=torch.int64)
    wide = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    edges = torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, -1, -(2**63), 2**31, 2**31 - 1])
    return torch.cat([small, wide, edges])


@pytest.mark.parametrize("seed", [0, 123, 2**32 - 1, 2**32 + 7, 2**62 + 12345, 2**64 - 1])
def test_uniform_bit_equal_to_cpp(ext, seed):
    ctr = _counters()
    got = philox_uniform(seed, ctr)
    assert got.dtype == torch.float32 and got.shape == ctr.shape
    signed_seed = seed - 2**64 if seed >= 2**63 else seed  # the binding takes int64, read as uint64
    want = torch.tensor([ext.philox_uniform(signed_seed, int(c)) for c in ctr], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_uniform_range_and_mean():
    u = philox_uniform(99, torch.arange(200_000))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert torch.equal(u, philox_uniform(99, torch.arange(200_000)))
    assert not torch.equal(u, philox_uniform(100, torch.arange(200_000)))


@pytest.mark.parametrize("k", [1, 5, 50, 128])
@pytest.mark.parametrize("temperature", [0.5, 1.3])
def test_seeded_reference_tokens_equal_extension(ext, k, temperature):
    B, V, D = 64, 300, 16
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(B, V, generator=g) * 3
    emb = torch.randn(V, D, generator=g)
    for seed, offset in [(7, 0), (2**40 + 3, 5 * B * V), (1, 2**33)]:
        s, o = torch.tensor([seed]), torch.tensor([offset])
        tok_x, lp_x, h_x = topk_sample_mix(logits, emb, k, temperature, seed=s, offset=o, impl="ext")
        tok_r, lp_r, h_r = topk_sample_mix(logits, emb, k, temperature, seed=s, offset=o, impl="reference")
        assert torch.equal(tok_x, tok_r)
        torch.testing.assert_close(lp_x, lp_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h_x, h_r, atol=1e-5, rtol=1e-4)


def test_seeded_reference_row_ids():
    """Row b's noise depends on row_ids[b] only: a subset of rows with their ids gives the
    same tokens as the full batch; seeding is deterministic, the generator path unchanged."""
    B, V, D = 40, 200, 8
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=g)
    emb = torch.randn(V, D, generator=g)
    for k in (0, 20):
        full = sample_from_logits_reference(logits, emb, k, 0.8, seed=11, offset=1000)[0]
        again = sample_from_logits_reference(logits, emb, k, 0.8, seed=11, offset=1000, row_ids=torch.arange(B))[0]
        assert torch.equal(full, again)
        keep = torch.tensor([3, 17, 18, 39])
        sub = sample_from_logits_reference(logits[keep], emb, k, 0.8, seed=11, offset=1000, row_ids=keep)[0]
        assert torch.equal(sub, full[keep])
        other = sample_from_logits_reference(logits, emb, k, 0.8, seed=12, offset=1000)[0]
        assert not torch.equal(full, other)


def test_seeded_full_vocab_matches_manual_race():
    """top_k 0: the race over every token with the documented counter."""
    B, V = 5, 50
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1))
    emb = torch.eye(V)
    tok = sample_from_logits_reference(logits, emb, 0, 1.0, seed=5, offset=77, row_ids=torch.tensor([9, 1, 4, 0, 2]))[0]
    ids = torch.tensor([9, 1, 4, 0, 2])[:, None]
    u = philox_uniform(5, 77 + ids * V + torch.arange(V))
    want = (torch.softmax(logits, -1) / -torch.log(u)).argmax(-1)
    assert torch.equal(tok, want)


def test_sample_and_mix_threads_seed():
    B, V, D = 6, 120, 16
    g = torch.Generator().manual_seed(2)
    hidden, w, e = torch.randn(B, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    rows = torch.tensor([5, 0, 2, 8, 1, 3])
    a = sample_and_mix(hidden, w, e, 0.7, 30, seed=21, offset=9, row_ids=rows)
    b = sample_and_mix_reference(hidden, w, e, 0.7, 30, seed=21, offset=9, row_ids=rows)
    logits = hidden @ w.T
    c = sample_from_logits_reference(logits, e, 30, 0.7, seed=21, offset=9, row_ids=rows)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z)
