"""The bf16 CPU lm-head with fp32 logits (hrpo_kernels/csrc/lm_head_cpu.cpp, ATen's bf16 brgemm):
against float64 products of the same bf16 values within fp32 summation's bound, a vocabulary
that is not a whole number of blocks, a row's bits independent of the batch, bad input, and
the engine's sampler routing a bf16 head through it."""

from __future__ import annotations

import pytest
import torch

from hrpo_kernels import _ext
from hrpo_kernels.sample_and_mix import _ext_logits, _lm_logits, sample_and_mix

K, V = 96, 1000  # 1000 = 15 blocks of 64 and a tail of 40 columns


@pytest.fixture(scope="module")
def mod():
    m = _ext.load_extension()
    if m is None:
        pytest.skip("the C++ extension did not build here")
    return m


def weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, K, generator=g) * 0.2).bfloat16()


def test_logits_are_fp32_sums_of_the_exact_products(mod):
    if not mod.lm_head_bf16_supported():  # a CPU without bf16 brgemm: the sampler keeps the fp32 GEMM
        h = torch.randn(4, K).bfloat16()
        assert torch.equal(_ext_logits(h, weights()), _lm_logits(h, weights()))
        return
    w = weights()
    packed = mod.lm_head_pack_bf16(w)
    assert packed.shape == (16, K, 64)
    for m in (1, 7, 32):
        h = (torch.randn(m, K, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
        got = mod.lm_head_bf16(h, packed, V)
        assert got.dtype == torch.float32 and got.shape == (m, V) and torch.isfinite(got).all()
        exact = h.double() @ w.double().T  # bf16 x bf16 products are exact; only the sums round
        bound = K * 2.0**-24 * (h.double().abs() @ w.double().abs().T) + 1e-30
        assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() / bound).max()
        # bf16-rounded logits would be ~2^-9 off: far outside the bound (the check sees a rounding)
        assert ((got.bfloat16().double() - exact).abs() > bound).any()


def test_a_rows_bits_do_not_depend_on_the_batch(mod):
    if not mod.lm_head_bf16_supported():
        pytest.skip("no bf16 brgemm on this CPU (the sampler keeps the fp32 GEMM there)")
    w = weights(1)
    packed = mod.lm_head_pack_bf16(w)
    h = torch.randn(32, K).bfloat16()
    batch = mod.lm_head_bf16(h, packed, V)
    assert torch.equal(batch, torch.cat([mod.lm_head_bf16(h[i : i + 1], packed, V) for i in range(32)]))


def test_bad_input_names_what_is_wrong(mod):
    with pytest.raises(RuntimeError, match="even"):
        mod.lm_head_pack_bf16(torch.zeros(64, 95, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16"):
        mod.lm_head_pack_bf16(torch.zeros(64, 96))
    packed = mod.lm_head_pack_bf16(weights())
    with pytest.raises(RuntimeError, match="not a packed"):
        mod.lm_head_bf16(torch.zeros(2, K, dtype=torch.bfloat16), packed, V + 64)


def test_the_engine_sampler_takes_the_bf16_head(mod, monkeypatch):
    """sample_and_mix(impl="ext") on a bf16 head: the brgemm logits (spied), and the same tokens
    as the sampler fed the fp32 GEMM's logits of the same values."""
    w, e = weights(2), weights(3)
    h = torch.randn(6, K).bfloat16()
    seed, offset = torch.tensor([5]), torch.tensor([0])
    calls = []
    inner = mod.lm_head_bf16
    monkeypatch.setattr(mod, "lm_head_bf16", lambda *a: calls.append(1) or inner(*a), raising=False)
    tok, lp, _ = sample_and_mix(h, w, e, 0.8, 20, seed=seed, offset=offset, impl="ext")
    assert len(calls) == int(mod.lm_head_bf16_supported())
    monkeypatch.setattr(mod, "lm_head_bf16_supported", lambda: False, raising=False)
    tok32, lp32, _ = sample_and_mix(h, w, e, 0.8, 20, seed=seed, offset=offset, impl="ext")
    assert torch.equal(tok, tok32)
    torch.testing.assert_close(lp, lp32, rtol=0, atol=1e-5)
