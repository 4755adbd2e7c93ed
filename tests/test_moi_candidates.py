"""Mixture of Inputs normalises the entropy by the log of the candidate count, as its authors'
code does (EvanZhuang/mixinputs, mixinputs/gpu_model_runner.py, the "Bayesian Mix" block:
H / log n over the n mixed candidates), on every path, against numbers worked out by hand."""

import math

import pytest
import torch

from hrpo_kernels._ext import load_extension
from hrpo_kernels.latent_input import LatentParams, latent_input_reference
from hrpo_kernels.sample_and_mix import sample_and_mix, sample_and_mix_reference, sample_and_mix_triton

# tokens 0..3 with p = (1/2, 1/4, 1/8, 1/8) at temperature 1; E rows e_0..e_3
E4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
L4 = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()


def _want_top2():
    """Top-2: p = (2/3, 1/3) on tokens 0, 1; H / log 2 = h(1/3) = log2(3) - 2/3 bits; beta 1:
    lambda = h / 2 on p @ E = (2/3, 1/3), 1 - lambda on E[1] = (0, 1) (token 1 drawn)."""
    lam = (math.log2(3) - 2 / 3) / 2
    return torch.tensor([[lam * 2 / 3, lam / 3 + (1 - lam)]])


def test_reference_normalises_by_the_top_k_count():
    got = latent_input_reference(L4, E4, torch.tensor([1]), LatentParams("moi", beta=1.0), 1.0, 2, greedy=True)
    torch.testing.assert_close(got, _want_top2(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["triton", "cpp"])
def test_fused_paths_normalise_by_the_top_k_count(path):
    """hidden = L4 with lm_weight = I, E = E4 padded to d = 4: token 1's draw under seed 3 is
    read back and the expected input built from it (the draw is the race's, not this test's)."""
    if path == "cpp" and load_extension() is None:
        pytest.skip("the C++ extension did not build")
    eye, e = torch.eye(4), torch.cat([E4, torch.zeros(4, 2)], 1)
    kw = dict(seed=torch.tensor([3]), offset=torch.tensor([0]), latent=LatentParams("moi", beta=1.0))
    run = sample_and_mix_triton if path == "triton" else lambda *a, **k: sample_and_mix(*a, impl="ext", **k)
    tok, _, h = run(L4, eye, e, 1.0, 2, **kw)
    ref_tok, _, _ = sample_and_mix_reference(L4, eye, e, 1.0, 2, **kw)
    assert tok.tolist() == ref_tok.tolist()
    lam = (math.log2(3) - 2 / 3) / 2
    mix = torch.tensor([2 / 3, 1 / 3])
    want = lam * mix + (1 - lam) * E4[tok.item()]
    torch.testing.assert_close(h[0, :2], want, atol=1e-6, rtol=0)
