"""The fused gated_blend (Triton) against the reference, forward and backward.

Without CUDA the kernels run on CPU tensors under the Triton interpreter; the launcher is
called directly (the dispatcher picks the reference on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import importlib

from hrpo_kernels.gated_blend import GATE_C, gated_blend_reference, gated_blend_triton

gb = importlib.import_module("hrpo_kernels.gated_blend")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: elementwise math after a GEMM whose summation order may differ by an ulp; the
# gradients go through a / sqrt(1 - a^2) and two more GEMMs. bf16: output rounding.
TOL = {
    torch.float32: dict(out=(2e-5, 2e-5), a=(1e-5, 1e-6), grad=(1e-4, 1e-4)),
    torch.bfloat16: dict(out=(1.6e-2, 1e-2), a=(1e-5, 1e-6), grad=(2e-2, 2e-2)),
}
# small blocks: several tiles along both axes and a ragged last tile (d = 40, M = 21)
SMALL = dict(block_m=8, block_d=16, bwd_block_m=8, bwd_block_d=16)


def make_inputs(shape, d, dtype, h_dtype, seed, mask_p=0.5, grad=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    e = rnd(*shape, d).to(dtype)
    h = rnd(*shape, d).to(h_dtype)
    mask = torch.rand(*shape, generator=g) < mask_p
    mask.view(-1)[0], mask.view(-1)[-1] = True, False  # both values always present
    w_r, w_i = rnd(d, d, scale=0.3), rnd(d, d, scale=0.3)
    b_r, b_i = rnd(d, scale=0.5), rnd(d, scale=0.5)
    # a mix of strongly mixing channels and channels at the init's a ~ 0.99..0.999
    lam = torch.cat(
        [torch.empty(d // 2).uniform_(-3, 3, generator=g), torch.empty(d - d // 2).uniform_(6, 9, generator=g)]
    )
    params = [w_r, b_r, w_i, b_i, lam]
    tensors = [t.to(DEV) for t in (e, h, mask, *params)]
    if grad:
        for t in tensors[:2] + tensors[3:]:
            t.requires_grad_(True)
    return tensors


def clone_leaves(ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def poison(monkeypatch):
    """Every buffer the fused op allocates starts as NaN, so an element it never writes fails."""
    real_empty = gb._empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(gb, "_empty", nan_empty)


def close(actual, expected, tol, what):
    rtol, atol = tol
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "dtype,h_dtype,shape,seed",
    [
        (torch.float32, torch.float32, (3, 7), 0),
        (torch.bfloat16, torch.float32, (3, 7), 1),
        (torch.bfloat16, torch.bfloat16, (21,), 2),
        (torch.float32, torch.bfloat16, (5,), 3),
    ],
)
def test_forward_backward_match_reference(monkeypatch, dtype, h_dtype, shape, seed):
    d = 40
    poison(monkeypatch)
    ins = make_inputs(shape, d, dtype, h_dtype, seed)
    ref_ins = clone_leaves(ins)
    out, a = gated_blend_triton(*ins, c=GATE_C, **SMALL)
    ref_out, ref_a = gated_blend_reference(*ref_ins, c=GATE_C)
    assert out.dtype == dtype and a.dtype == torch.float32
    assert out.shape == ref_out.shape and a.shape == ref_a.shape
    tol = TOL[dtype]
    mask = ins[2]
    close(out, ref_out, tol["out"], "out")
    close(a, ref_a, tol["a"], "a")
    assert torch.equal(out[~mask], ins[0][~mask]), "rows outside the mask must pass e through bit for bit"
    assert (ref_a[mask] < 0.9).any() and (ref_a[mask] > 0.98).any(), "test data should cover both regimes"
    # both outputs carry gradient (a feeds a gate penalty in some losses)
    g = torch.Generator().manual_seed(seed + 100)
    g_out = torch.randn(out.shape, generator=g).to(dtype).to(DEV)
    g_a = torch.randn(a.shape, generator=g).to(DEV)
    torch.autograd.backward([out, a], [g_out, g_a])
    torch.autograd.backward([ref_out, ref_a], [g_out, g_a])
    names = ["e", "h_hat", "mask", "w_r", "b_r", "w_i", "b_i", "lam"]
    for name, x, rx in zip(names, ins, ref_ins):
        if name == "mask":
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all(), name
        scale = rx.grad.abs().max().clamp_min(1.0)  # sums over rows: compare relative to size
        close(x.grad / scale, rx.grad / scale, tol["grad"], f"grad {name}")


def test_only_out_used_and_frozen_inputs(monkeypatch):
    """The trainer's case: e from a frozen embedding, h_hat constant, a unused."""
    poison(monkeypatch)
    ins = make_inputs((2, 5), 40, torch.float32, torch.float32, 7)
    ins[0].requires_grad_(False)
    ins[1].requires_grad_(False)
    ref_ins = clone_leaves(ins)
    out, _ = gated_blend_triton(*ins, **SMALL)
    ref_out, _ = gated_blend_reference(*ref_ins)
    (out.square().sum()).backward()
    (ref_out.square().sum()).backward()
    for x, rx, name in zip(ins[3:], ref_ins[3:], ["w_r", "b_r", "w_i", "b_i", "lam"]):
        scale = rx.grad.abs().max().clamp_min(1.0)
        close(x.grad / scale, rx.grad / scale, TOL[torch.float32]["grad"], name)


def test_all_masked_off_and_default_blocks_and_no_grad():
    """Every row passes through; default block sizes; inference mode; non-contiguous e."""
    ins = make_inputs((4, 9), 40, torch.bfloat16, torch.float32, 11, grad=False)
    ins[2] = torch.zeros_like(ins[2])
    e_big = torch.randn(4, 12, 40).to(torch.bfloat16).to(DEV)
    ins[0] = e_big[:, 3:]  # a slice like embeds[:, P:]
    with torch.no_grad():
        out, a = gated_blend_triton(*ins)
        ref_out, ref_a = gated_blend_reference(*ins)
    assert torch.equal(out, ins[0])
    close(a, ref_a, TOL[torch.float32]["a"], "a")


def test_weight_cache_follows_in_place_updates():
    ins = make_inputs((6,), 40, torch.float32, torch.float32, 13, grad=False)
    ins[2] = torch.ones_like(ins[2])
    out1, _ = gated_blend_triton(*ins, **SMALL)
    with torch.no_grad():
        ins[3].mul_(-1.0)  # the optimizer's in-place step on w_r
        ins[6].add_(0.5)  # and on b_i
    out2, _ = gated_blend_triton(*ins, **SMALL)
    ref2, _ = gated_blend_reference(*ins)
    assert not torch.allclose(out1, out2)
    close(out2, ref2, TOL[torch.float32]["out"], "out after update")


def test_dispatcher_honours_reference_env(monkeypatch):
    ins = make_inputs((3,), 40, torch.float32, torch.float32, 17, grad=False)
    monkeypatch.setenv("HRPO_KERNELS", "reference")
    out, a = gb.gated_blend(*ins)
    ref_out, ref_a = gated_blend_reference(*ins)
    assert torch.equal(out, ref_out) and torch.equal(a, ref_a)
    monkeypatch.delenv("HRPO_KERNELS")
    assert gb.use_fused(*ins) == (DEV == "cuda")
