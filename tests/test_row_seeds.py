"""One Philox seed per row: the serving scheduler draws the rows of requests with different
seeds in one sampling call, each row keyed by its own request's seed. Every sampling path
(reference, Triton under the interpreter, the C++ twin) must give each row what it gives that
row alone under its seed, in every latent mode that draws noise and with a nucleus."""

from __future__ import annotations

import itertools

import pytest
import torch

from hrpo_kernels import _ext
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.philox import philox4x32_10
from hrpo_kernels.sample_and_mix import sample_and_mix, sample_and_mix_reference, sample_and_mix_triton

# Random123 kat_vectors, philox4x32 10 rounds (as tests/test_ext_cpu.py): counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_philox_takes_one_key_per_row():
    """The three known answers in one call, each row under its own key (the reference's
    per-row path: key words as (rows, 1) tensors against (rows, 1) counters)."""
    ctr = [torch.tensor([[c[i]] for c, _, _ in KAT]) for i in range(4)]
    k0 = torch.tensor([[k[0]] for _, k, _ in KAT])
    k1 = torch.tensor([[k[1]] for _, k, _ in KAT])
    out = philox4x32_10(*ctr, k0, k1)
    assert [tuple(int(w[r, 0]) for w in out) for r in range(len(KAT))] == [want for _, _, want in KAT]


B, V, D = 5, 300, 16
SEEDS = torch.tensor([3, 99, 2**62 + 5, 7, -12345], dtype=torch.int64)  # -12345: a uint64 key >= 2^63
ROW_IDS = torch.tensor([4, 0, 9, 2, 2])  # rows 3 and 4 share a counter: only their seeds tell them apart
OFFSET = torch.tensor([11])
PATHS = {
    "reference": (sample_and_mix_reference, {}),
    "triton": (sample_and_mix_triton, {}),
    "ext": (sample_and_mix, {"impl": "ext"}),
}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, D, generator=g)
    h[4] = h[3]  # the same hidden state and counter: different tokens can only come from the seed
    return h, torch.randn(V, D, generator=g) * 0.5, torch.randn(V, D, generator=g)


@pytest.fixture(params=list(PATHS))
def path(request):
    """(name, sampler, its extra arguments) of each path."""
    if request.param == "ext" and _ext.load_extension() is None:
        pytest.skip("the C++ extension did not build here")
    return (request.param, *PATHS[request.param])


def test_every_path_keys_each_row_by_its_own_seed(path, inputs):
    path, fn, extra = path
    h, W, E = inputs
    rows_3_4_differ = False
    for k, mode, top_p in itertools.product((0, 7), ("hrpo", "soft-noise", "gumbel-soft"), (1.0, 0.9)):
        if path == "ext" and k == 0:
            continue  # the C++ twin is the top-k path
        kw = dict(top_k=k, latent=LatentParams(mode, noise_std=0.5, gumbel_tau=0.5), top_p=top_p, **extra)
        tok, lp, x = fn(h, W, E, 0.8, seed=SEEDS, offset=OFFSET, row_ids=ROW_IDS, **kw)
        for b in range(B):
            t1, l1, x1 = fn(
                h[b : b + 1], W, E, 0.8, seed=SEEDS[b : b + 1], offset=OFFSET, row_ids=ROW_IDS[b : b + 1], **kw
            )
            where = (k, mode, top_p, b)
            assert int(t1) == int(tok[b]), where
            torch.testing.assert_close(l1[0], lp[b], rtol=0, atol=1e-6, msg=str(where))
            torch.testing.assert_close(x1[0], x[b], rtol=1e-5, atol=1e-5, msg=str(where))
        rows_3_4_differ |= int(tok[3]) != int(tok[4]) or not torch.allclose(x[3], x[4])
    assert rows_3_4_differ, "the seed never changed a draw: the check would not see a shared key"


def test_a_seed_per_row_must_cover_every_row(path, inputs):
    _, fn, extra = path
    h, W, E = inputs
    with pytest.raises((ValueError, RuntimeError), match="seed"):
        fn(h, W, E, 0.8, top_k=7, seed=SEEDS[:3], offset=OFFSET, **extra)
