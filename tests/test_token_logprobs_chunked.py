"""The CPU path of token_logprobs (chunked, recomputing logits in the backward) against the
reference: the same values and gradients, and no (N x V) tensor kept for the backward."""

import pytest
import torch

from hrpo_kernels import token_logprobs
from hrpo_kernels.token_logprobs import token_logprobs_chunked, token_logprobs_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_values_and_gradients_match_the_reference(dtype, chunk):
    """fp32: equal to the reference within float rounding. bf16: both round the logits to
    bf16 (the matmul's output), so both are held to the fp32 computation on the same
    bf16-valued inputs, and the chunked path may miss it by no more than the reference does."""
    g = torch.Generator().manual_seed(3)
    N, V, d, T = 37, 301, 24, 0.7
    h = (torch.randn(N, d, generator=g) * 2).to(dtype)
    w = (torch.randn(V, d, generator=g) / d**0.25).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)

    def run(fn, h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp = fn(h, w, t, T, **kw)
        (lp * upstream).sum().backward()
        return lp, h.grad.float(), w.grad.float()

    got = run(token_logprobs_chunked, h, w, chunk_size=chunk)
    ref = run(token_logprobs_reference, h, w)
    truth = run(token_logprobs_reference, h.float(), w.float())
    assert got[0].dtype == torch.float32
    for mine, theirs, exact in zip(got, ref, truth):
        if dtype == torch.float32:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        else:
            assert (mine - exact).abs().max() <= 1.5 * (theirs - exact).abs().max() + 1e-3


def test_hand_computed_gradient():
    """d log p(t) / d h = (W[t] - sum_v p_v W[v]) / T, worked out for one row."""
    h = torch.tensor([[1.0, -0.5]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lp = token_logprobs_chunked(h, w, torch.tensor([2]), 0.5)
    logits = torch.tensor([1.0, -0.5, 0.5]) / 0.5
    p = torch.softmax(logits, 0)
    assert lp.item() == pytest.approx(float(torch.log(p[2])), rel=1e-6)
    lp.sum().backward()
    expect = (w[2] - (p[:, None] * w).sum(0)) / 0.5
    torch.testing.assert_close(h.grad[0], expect)


def test_the_backward_keeps_no_logits(monkeypatch):
    """What autograd saves for the backward is hidden, weight, targets and one number per
    row, never a (rows x vocabulary) tensor."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    N, V, d = 64, 5000, 8
    h = torch.randn(N, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = token_logprobs(h, torch.randn(V, d), torch.randint(0, V, (N,)), 0.5, chunk_size=16)
    assert saved and not any(shape[-1] == V for shape in saved), saved  # the reference saves (16, V) chunks
    lp.sum().backward()
    assert h.grad.shape == (N, d)


@pytest.mark.parametrize("fn", [token_logprobs_reference, token_logprobs_chunked])
def test_16bit_logits_are_accumulated_and_kept_in_fp32(fn):
    """bf16 hidden states and head: the log-probs are those of the exact fp32 logits (every bf16
    product is exact in fp32), as the sampler computes them, not of logits rounded to bf16
    (which moves a logit of 8 by up to 1/32 and log-probs by as much)."""
    torch.manual_seed(0)
    h = (torch.randn(7, 48) * 2).to(torch.bfloat16)
    w = (torch.randn(300, 48) * 0.5).to(torch.bfloat16)
    t = torch.randint(0, 300, (7,))
    want = torch.log_softmax(h.double() @ w.double().T / 0.7, -1).gather(-1, t[:, None])[:, 0]
    got = fn(h, w, t, 0.7, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
