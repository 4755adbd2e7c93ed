"""The LoRA linear op against peft's math (its reference) and against peft itself."""

import pytest
import torch

from hrpo_kernels.lora_linear import lora_linear, lora_linear_reference


def make(dtype, adapter_dtype, bias, seed=0, shape=(3, 7), d_in=40, d_out=24, r=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g).to(dtype)
    w = torch.randn(d_out, d_in, generator=g).to(dtype) / d_in**0.5
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(adapter_dtype)
    bb = (torch.randn(d_out, r, generator=g) * 0.3).to(adapter_dtype)
    return x, w, b, a, bb


@pytest.mark.parametrize(
    "dtype,adapter_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 2e-2),
        (torch.bfloat16, torch.bfloat16, 3e-2),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_the_reference(dtype, adapter_dtype, tol, bias):
    x, w, b, a, bb = make(dtype, adapter_dtype, bias)
    up = torch.randn(3, 7, 24).to(dtype)
    outs = []
    for fn in (lora_linear, lora_linear_reference):
        xi, ai, bi = x.clone().requires_grad_(), a.clone().requires_grad_(), bb.clone().requires_grad_()
        y = fn(xi, w, b, ai, bi, 2.0)
        (y.float() * up.float()).sum().backward()
        outs.append((y, xi.grad, ai.grad, bi.grad))
    (y, gx, ga, gb), (y_ref, gx_ref, ga_ref, gb_ref) = outs
    assert y.dtype == y_ref.dtype and y.shape == (3, 7, 24)
    for got, want in ((y, y_ref), (gx, gx_ref), (ga, ga_ref), (gb, gb_ref)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_hand_computed_one_by_one():
    """x = 2, W = 3, b = 1, A = 0.5, B = 4, s = 2: y = 2*3 + 1 + 2*(2*0.5)*4 = 15;
    dy/dx = 3 + 2*4*0.5 = 7, dy/dA = 2*4*2 = 16, dy/dB = 2*(2*0.5) = 2."""
    x, a, b = (torch.tensor([[v]], requires_grad=True) for v in (2.0, 0.5, 4.0))
    y = lora_linear(x, torch.tensor([[3.0]]), torch.tensor([1.0]), a, b, 2.0)
    y.sum().backward()
    assert y.item() == 15.0 and x.grad.item() == 7.0 and a.grad.item() == 16.0 and b.grad.item() == 2.0


def test_trainable_base_weight_is_refused():
    x, w, b, a, bb = make(torch.float32, torch.float32, True)
    with pytest.raises(ValueError, match="base weight and bias must be frozen"):
        lora_linear(x, w.requires_grad_(), b, a, bb, 1.0)


@pytest.mark.parametrize("rows", [1, 200])  # one decode row keeps the adapter path; many merge it
def test_without_gradients_the_values_stay(rows):
    x, w, b, a, bb = make(torch.float32, torch.float32, True, shape=(rows,))
    with torch.no_grad():
        got = lora_linear(x, w, b, a.requires_grad_(), bb.requires_grad_(), 2.0)
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, lora_linear_reference(x, w, b, a, bb, 2.0).detach(), rtol=1e-5, atol=1e-5)
