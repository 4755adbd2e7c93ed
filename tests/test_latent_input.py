"""The latent-input op (hrpo_kernels/latent_input.py): each mode's next input against numbers
worked out by hand on a 4-token vocabulary with 2-dim embeddings, the fused Triton path
(interpreter on the CPU) against the reference in fp32 and bf16 on odd shapes with poisoned
outputs, and the noise reproducible and independent of the batch layout. The C++ twin is
tested in test_ext_cpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from hrpo_kernels._common import triton_available
from hrpo_kernels.latent_input import MODES, NOISE_KEY, LatentParams, latent_input_reference, noisy_input_logdensity
from hrpo_kernels.philox import philox_uniform
from hrpo_kernels.sample_and_mix import sample_and_mix, sample_and_mix_reference, sample_and_mix_triton

# E rows: tokens 0..3; logits log p with p = (1/2, 1/4, 1/8, 1/8) at temperature 1.
E4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
P4 = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
L4 = P4.log()
TOK1 = torch.tensor([1])


def _ref(params, top_k=0, greedy=True, temperature=1.0, **noise):
    return latent_input_reference(L4, E4, TOK1, params, temperature, top_k, greedy, **noise)


def test_soft_is_the_probability_weighted_mixture():
    # p @ E = 0.5 (1,0) + 0.25 (0,1) + 0.125 (1,1) + 0.125 (-1,0) = (0.5, 0.375)
    assert torch.allclose(_ref(LatentParams("soft")), torch.tensor([[0.5, 0.375]]))


def test_hrpo_divides_the_mixture_by_the_norm_of_p():
    norm = math.sqrt(0.25 + 0.0625 + 2 * 0.015625)  # ||p||_2 = sqrt(0.34375)
    assert torch.allclose(_ref(LatentParams("hrpo")), torch.tensor([[0.5 / norm, 0.375 / norm]]))


def test_moi_blends_the_sampled_token_by_normalised_entropy():
    # H = 1.75 bits of a 2-bit vocabulary = 0.875; beta 1: lambda = 0.875 / 2 = 0.4375 on p @ E,
    # 0.5625 on E[1] = (0, 1): (0.21875, 0.1640625 + 0.5625)
    assert torch.allclose(_ref(LatentParams("moi", beta=1.0)), torch.tensor([[0.21875, 0.7265625]]))
    # beta 3: lambda = 0.875 / 4 = 0.21875: (0.109375, 0.08203125 + 0.78125)
    assert torch.allclose(_ref(LatentParams("moi", beta=3.0)), torch.tensor([[0.109375, 0.86328125]]))


def test_mixture_temperature_top_k_and_top_p():
    # T_mix 1/2 squares p: (4, 1, 0.25, 0.25) / 5.5 -> p @ E = (4/5.5, 1.25/5.5)
    want = torch.tensor([[4 / 5.5, 1.25 / 5.5]])
    assert torch.allclose(_ref(LatentParams("soft", temperature=0.5)), want)
    # top-k 2 keeps tokens 0, 1 renormalised to (2/3, 1/3)
    assert torch.allclose(_ref(LatentParams("soft"), top_k=2), torch.tensor([[2 / 3, 1 / 3]]))
    # nucleus 0.7: tokens 0 (mass before 0) and 1 (0.5 < 0.7), not 2 (0.75): (2/3, 1/3)
    assert torch.allclose(_ref(LatentParams("soft", top_p=0.7)), torch.tensor([[2 / 3, 1 / 3]]))
    # nucleus 0.5: token 1 has 0.5 before it, not < 0.5: token 0 alone
    assert torch.allclose(_ref(LatentParams("soft", top_p=0.5)), torch.tensor([[1.0, 0.0]]))


def test_gumbel_soft_greedy_sharpens_by_tau():
    # g = 0 (greedy): softmax(log p / 0.5) = p^2 / sum p^2, as T_mix 1/2 above
    assert torch.allclose(_ref(LatentParams("gumbel-soft", gumbel_tau=0.5)), torch.tensor([[4 / 5.5, 1.25 / 5.5]]))


def test_gumbel_soft_noise_is_the_race_noise():
    seed, offset = 11, 40
    u = philox_uniform(seed, offset + torch.arange(4))  # row 0: counters offset + v
    w = (P4.log() - torch.log(-torch.log(u))) / 0.5
    w = torch.softmax(w, dim=-1)
    got = _ref(LatentParams("gumbel-soft", gumbel_tau=0.5), greedy=False, seed=seed, offset=offset)
    assert torch.allclose(got, w @ E4, atol=1e-6)


def test_soft_noise_adds_sigma_box_muller_normals():
    seed, offset, sigma = 5, 100, 0.3
    key = seed ^ NOISE_KEY
    u1 = philox_uniform(key, offset + torch.tensor([0, 1]))  # row 0, dims 0 and 1: counters offset + c
    u2 = philox_uniform(key + 1, offset + torch.tensor([0, 1]))  # under the second key
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    got = _ref(LatentParams("soft-noise", noise_std=sigma), greedy=False, seed=seed, offset=offset)
    assert torch.allclose(got, torch.tensor([[0.5, 0.375]]) + sigma * z, atol=1e-6)
    # greedy draws no noise
    assert torch.allclose(_ref(LatentParams("soft-noise", noise_std=sigma)), torch.tensor([[0.5, 0.375]]))


def test_noisy_modes_need_a_seed_and_bad_params_are_named():
    with pytest.raises(ValueError, match="needs a seed"):
        _ref(LatentParams("soft-noise"), greedy=False)
    with pytest.raises(ValueError, match="latent mode must be one of"):
        LatentParams("fuzzy")
    with pytest.raises(ValueError, match="gumbel_tau"):
        LatentParams("gumbel-soft", gumbel_tau=0.0)
    with pytest.raises(ValueError, match="top_p"):
        LatentParams("soft", top_p=1.5)


def test_hrpo_mode_is_sample_and_mix_h_hat():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    for top_k in (0, 5):
        tok, _, h_hat = sample_and_mix_reference(h, w, w, 0.8, top_k, seed=3)
        x = latent_input_reference(h @ w.T, w, tok, LatentParams("hrpo"), 0.8, top_k, seed=3)
        assert torch.allclose(x, h_hat, atol=1e-6)


# ----------------------------------------------------------------------------- fused paths
triton_only = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
ALL = [
    LatentParams("hrpo"),
    LatentParams("soft", temperature=0.7),
    LatentParams("moi", beta=0.5),
    LatentParams("soft-noise", noise_std=0.2),
    LatentParams("gumbel-soft", gumbel_tau=0.3),
]
assert [p.mode for p in ALL] == list(MODES)


def _model(B, V, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.4).to(dtype)
    e = torch.randn(V, D, generator=g).to(dtype)
    return h, w, e


def _poisoned(B, D):
    return (torch.full((B,), -1, dtype=torch.int64), torch.full((B,), float("nan")), torch.full((B, D), float("nan")))


@triton_only
@pytest.mark.parametrize("params", ALL, ids=lambda p: p.mode)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("greedy", [False, True])
def test_triton_matches_reference(params, dtype, top_k, greedy):
    B, V, D = 5, 67, 13  # odd shapes: partial tiles in every dimension
    h, w, e = _model(B, V, D, dtype, seed=top_k)
    seed, offset = torch.tensor([1234]), torch.tensor([77])
    rid = torch.tensor([3, 0, 9, 4, 1])
    out = _poisoned(B, D)
    tok, lp, x = sample_and_mix_triton(
        h, w, e, 0.9, top_k, greedy, seed=seed, offset=offset, row_ids=rid, out=out, latent=params, splits=3
    )
    rtok, rlp, rx = sample_and_mix_reference(
        h, w, e, 0.9, top_k, greedy, seed=1234, offset=77, row_ids=rid, latent=params
    )
    assert torch.equal(tok, rtok)
    assert torch.allclose(lp, rlp, atol=2e-5)
    assert not x.isnan().any()
    tol = 2e-5 if dtype == torch.float32 else 2e-4
    assert torch.allclose(x, rx, atol=tol, rtol=tol), (x - rx).abs().max()


@triton_only
@pytest.mark.parametrize("params", ALL[3:], ids=lambda p: p.mode)
@pytest.mark.parametrize("top_k", [0, 7])
def test_noise_follows_the_row_not_the_batch_layout(params, top_k):
    """A row's next input depends on (seed, offset, row id) only: the batch reversed with its
    row ids gives the same inputs per row, and another offset other ones."""
    B, V, D = 4, 53, 9
    h, w, e = _model(B, V, D, torch.float32, seed=5)
    rid = torch.arange(B)
    args = dict(seed=torch.tensor([9]), latent=params)
    _, _, x = sample_and_mix_triton(h, w, w, 1.0, top_k, offset=torch.tensor([0]), row_ids=rid, **args)
    _, _, x_rev = sample_and_mix_triton(
        h.flip(0), w, w, 1.0, top_k, offset=torch.tensor([0]), row_ids=rid.flip(0), **args
    )
    assert torch.allclose(x_rev.flip(0), x, atol=1e-6)
    _, _, x_again = sample_and_mix_triton(h, w, w, 1.0, top_k, offset=torch.tensor([0]), row_ids=rid, **args)
    assert torch.equal(x_again, x)
    _, _, x_next = sample_and_mix_triton(h, w, w, 1.0, top_k, offset=torch.tensor([B * V]), row_ids=rid, **args)
    assert not torch.allclose(x_next, x, atol=1e-3)


def test_dispatcher_routes_a_nucleus_to_the_reference():
    h, w, e = _model(2, 30, 6, torch.float32)
    params = LatentParams("soft", top_p=0.6)
    _, _, x = sample_and_mix(h, w, e, 1.0, 0, seed=torch.tensor([1]), offset=torch.tensor([0]), latent=params)
    logits = h @ w.T
    p = torch.softmax(logits, -1)
    sp, idx = p.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < 0.6
    q = torch.zeros_like(p).scatter_(-1, idx, sp * keep)
    assert torch.allclose(x, (q / q.sum(-1, keepdim=True)) @ e, atol=1e-6)


def test_noisy_input_logdensity_by_hand():
    # mu = p @ E = (0.5, 0.375); x - mu = (0.1, -0.2): -0.05 / (2 * 0.25) - (2 / 2) log(2 pi 0.25)
    params = LatentParams("soft-noise", noise_std=0.5)
    x = torch.tensor([[0.6, 0.175]])
    want = -0.1 - math.log(math.pi / 2)
    got = noisy_input_logdensity(L4, E4, x, params, 1.0)
    assert got.shape == (1,) and abs(float(got) - want) < 1e-6
    # gradient: d/dlogits flows through p (the mean), not zero
    logits = L4.clone().requires_grad_(True)
    noisy_input_logdensity(logits, E4, x, params, 1.0).sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="soft-noise"):
        noisy_input_logdensity(L4, E4, x, LatentParams("soft"), 1.0)
