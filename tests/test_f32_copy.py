"""The CPU's cached fp32 copy of a 16-bit lm-head (hrpo_kernels._common.f32_copy): made once per
version of the weight, replaced after an in-place update, dropped with the weight."""

from __future__ import annotations

import gc

import torch

from hrpo_kernels import _common
from hrpo_kernels._common import f32_copy
from hrpo_kernels.sample_and_mix import _lm_logits


def test_the_copy_is_made_once_per_version_of_the_weight():
    w = torch.tensor([[0.5, -1.25], [3.0, 0.125]], dtype=torch.bfloat16)
    first = f32_copy(w)
    assert first.dtype == torch.float32 and first.tolist() == [[0.5, -1.25], [3.0, 0.125]]
    assert f32_copy(w) is first  # no second upcast while w is unchanged
    w.mul_(2)  # an in-place update (an optimizer step on the weight)
    second = f32_copy(w)
    assert second is not first and second.tolist() == [[1.0, -2.5], [6.0, 0.25]]
    fp32 = torch.ones(2)
    assert f32_copy(fp32) is fp32


def test_the_copy_goes_with_the_weight():
    w = torch.randn(3, 4).to(torch.bfloat16)
    f32_copy(w)
    key = (id(w), "f32")
    assert key in _common._DERIVED
    del w
    gc.collect()
    assert key not in _common._DERIVED


def test_cpu_logits_of_a_row_do_not_depend_on_the_batch():
    """A row's logits have the same bits alone and among others (a served request's greedy
    tokens must not depend on who else decodes); MKL's sgemm, which F.linear and @ use on the CPU,
    takes another path for one row and does not give them."""
    g = torch.Generator().manual_seed(0)
    w, hidden = torch.randn(477, 256, generator=g), torch.randn(32, 256, generator=g)
    alone = _lm_logits(hidden[:1], w)
    for n in (2, 3, 8, 32):
        assert torch.equal(_lm_logits(hidden[:n], w)[:1], alone), n
    torch.testing.assert_close(alone, hidden[:1] @ w.T)


def test_cpu_logits_follow_the_weight():
    hidden = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 2.0]], dtype=torch.bfloat16)
    assert _lm_logits(hidden, w).tolist() == [[1.0, -1.5, 6.0], [-1.0, -1.0, -1.0]]
    w[2] = 0.0  # the same tensor, new values: the cached copy must not be used
    assert _lm_logits(hidden, w).tolist() == [[1.0, -1.5, 0.0], [-1.0, -1.0, 0.0]]
