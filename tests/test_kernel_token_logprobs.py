"""The fused token_logprobs (Triton) against the reference, forward and backward.

Without CUDA the kernels run on CPU tensors under the Triton interpreter; the launcher is
called directly (the dispatcher picks the reference on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from hrpo_kernels.token_logprobs import token_logprobs_reference, token_logprobs_triton

tlp = importlib.import_module("hrpo_kernels.token_logprobs")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles so that V = 300 takes several tiles per split, several splits, several
# backward chunks, and ragged last ones everywhere (300 = 2 * 128 + 44; d = 40 = 2 * 16 + 8).
SMALL = dict(blocks=dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16), v_splits=3, chunk_v=128)
# fp32: dot products of 40 terms, fp32 accumulation. bf16: the reference's logits are
# rounded to bf16 by the matmul; the kernel keeps fp32, so compare both against the
# reference on the same (bf16-valued) inputs upcast to fp32, and the bf16 reference loosely.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 1e-2)}


def entropy_reference(hidden, weight, temperature):
    logp = torch.log_softmax((hidden.float() @ weight.float().T) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def make(N, V, d, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * scale).to(dtype).to(DEV)
    w = (torch.randn(V, d, generator=g) * scale / d**0.25).to(dtype).to(DEV)
    t = torch.randint(0, V, (N,), generator=g)
    t[0], t[-1] = 0, V - 1  # the first and the last (ragged tile's) vocabulary entries
    return h, w, t.to(DEV)


def poison(monkeypatch):
    real = tlp._empty

    def nan_empty(*args, **kwargs):
        x = real(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(tlp, "_empty", nan_empty)


def close(actual, expected, tol, what):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "dtype,N,temperature,weight_grad,entropy,seed",
    [
        (torch.float32, 7, 0.7, True, True, 0),
        (torch.float32, 37, 1.3, False, False, 1),
        (torch.bfloat16, 7, 0.7, True, True, 2),
        (torch.bfloat16, 21, 1.0, False, True, 3),
    ],
)
def test_matches_reference(monkeypatch, dtype, N, temperature, weight_grad, entropy, seed):
    V, d = 300, 40
    poison(monkeypatch)
    h, w, t = make(N, V, d, dtype, seed, scale=1.5)
    h.requires_grad_(True)
    w.requires_grad_(weight_grad)
    res = token_logprobs_triton(h, w, t, temperature, return_entropy=entropy, **SMALL)
    lp, ent = res if entropy else (res, None)
    assert lp.dtype == torch.float32 and lp.shape == (N,)
    # the reference on the same values in fp32: the kernel's arithmetic is fp32 throughout
    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(weight_grad)
    ref = token_logprobs_reference(h32, w32, t, temperature, chunk_size=16)
    close(lp, ref, TOL[torch.float32], "logprobs")
    if dtype == torch.bfloat16:  # and the reference in bf16, whose logits are rounded
        close(lp, token_logprobs_reference(h.detach(), w.detach(), t, temperature), (2e-2, 5e-2), "bf16 ref")
    g = torch.Generator().manual_seed(seed + 1)
    g_lp = torch.randn(N, generator=g).to(DEV)
    outs, grads, ref_outs = [lp], [g_lp], [ref]
    if entropy:
        ref_ent = entropy_reference(h32, w32, temperature)
        close(ent, ref_ent, TOL[torch.float32], "entropy")
        outs.append(ent), ref_outs.append(ref_ent), grads.append(torch.randn(N, generator=g).to(DEV))
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(ref_outs, grads)
    assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()
    close(h.grad, h32.grad, TOL[dtype], "grad hidden")
    if weight_grad:
        assert w.grad.dtype == dtype
        close(w.grad, w32.grad, TOL[dtype], "grad weight")
    else:
        assert w.grad is None


def test_default_blocks_one_split_and_lp_only_grad(monkeypatch):
    """Default tile sizes (one V tile split, one backward chunk); temperature != 1."""
    poison(monkeypatch)
    h, w, t = make(5, 300, 40, torch.float32, 4)
    h.requires_grad_(True)
    lp = token_logprobs_triton(h, w, t, 0.5, blocks=dict(BLOCK_N=16, BLOCK_V=128, BLOCK_K=32))
    h32 = h.detach().clone().requires_grad_(True)
    ref = token_logprobs_reference(h32, w, t, 0.5)
    close(lp, ref, TOL[torch.float32], "logprobs")
    lp.sum().backward()
    ref.sum().backward()
    close(h.grad, h32.grad, TOL[torch.float32], "grad hidden")


def test_peaked_distribution_and_non_contiguous_hidden():
    """Large logits (a near-deterministic policy) and a strided hidden view as in the trainer."""
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(3, 6, 40, generator=g) * 4).to(DEV)
    h = big[:, 2]  # (3, 40) with row stride 240
    assert not h.is_contiguous()
    w = (torch.randn(300, 40, generator=g) * 2).to(DEV)
    t = torch.tensor([1, 150, 299]).to(DEV)
    lp, ent = token_logprobs_triton(h, w, t, 0.9, return_entropy=True, **SMALL)
    close(lp, token_logprobs_reference(h, w, t, 0.9), TOL[torch.float32], "logprobs")
    close(ent, entropy_reference(h, w, 0.9), (1e-4, 1e-4), "entropy")
    assert (lp > -1e3).all() and (ent >= -1e-5).all()


def test_dispatcher(monkeypatch):
    h, w, t = make(4, 300, 40, torch.float32, 6)
    monkeypatch.setenv("HRPO_KERNELS", "reference")
    assert not tlp.use_fused(h, w, t)
    assert torch.equal(tlp.token_logprobs(h, w, t, 0.7), token_logprobs_reference(h, w, t, 0.7))
    monkeypatch.delenv("HRPO_KERNELS")
    assert tlp.use_fused(h, w, t) == (DEV == "cuda")
    with pytest.raises(ValueError):
        token_logprobs_triton(h, w, t[:3])
