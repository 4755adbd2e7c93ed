import torch

from hrpo.model.gate import HybridGate, lambda_init
from hrpo_kernels import gated_blend_reference

C = 8.0  # the paper's constant, written here rather than read from the module under test


def test_lambda_init_matches_float64():
    torch.manual_seed(0)
    gate = HybridGate(257, r_min=0.99, r_max=0.999)
    lam = gate.lam.detach().double()
    u = torch.sigmoid(lam) ** C  # the property the init must give
    assert gate.lam.dtype == torch.float32
    assert (u >= 0.99 - 1e-6).all() and (u <= 0.999 + 1e-6).all()
    u64 = torch.empty(1000, dtype=torch.float64).uniform_(0.99, 0.999)
    expect = -torch.log(u64 ** (-1 / C) - 1)
    torch.testing.assert_close(lambda_init(u64.float()).double(), expect, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.sigmoid(expect) ** C, u64, rtol=0, atol=1e-12)


def test_linear_init():
    torch.manual_seed(0)
    gate = HybridGate(512)
    for lin in (gate.w_r, gate.w_i):
        assert lin.weight.dtype == torch.float32
        assert abs(lin.weight.std().item() - 0.02) < 1e-3
        assert abs(lin.weight.mean().item()) < 1e-3
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))


def blend_float64(e, h, w_r, b_r, w_i, b_i, lam):
    e, h = e.double(), h.double()
    r = 1 / (1 + torch.exp(-(e @ w_r.double().T + b_r.double())))
    i = 1 / (1 + torch.exp(-(e @ w_i.double().T + b_i.double())))
    softplus = torch.log1p(torch.exp(-lam.double()))
    a = torch.exp(-C * softplus * r)
    return a * e + torch.sqrt(1 - a * a + 1e-8) * (i * h), a


def test_blend_against_float64_and_mask_passthrough():
    torch.manual_seed(1)
    d = 40
    gate = HybridGate(d)
    with torch.no_grad():  # a gate that mixes strongly, so both terms matter
        gate.lam.uniform_(-2, 2)
        gate.w_r.bias.uniform_(-1, 1)
    e = torch.randn(3, 7, d)
    h = torch.randn(3, 7, d)
    mask = torch.rand(3, 7) > 0.4
    out, a = gate(e, h, mask)
    expect, a64 = blend_float64(e, h, gate.w_r.weight, gate.w_r.bias, gate.w_i.weight, gate.w_i.bias, gate.lam)
    torch.testing.assert_close(out[mask].double(), expect[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), a64, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~mask], e[~mask])
    assert (a[mask] < 0.9).any(), "the test gate should mix strongly"


def test_blend_keeps_dtype_and_gradients_reach_every_gate_parameter():
    torch.manual_seed(2)
    gate = HybridGate(16)
    e = torch.randn(5, 16, dtype=torch.bfloat16)
    out, _ = gate(e, torch.randn(5, 16), torch.ones(5, dtype=torch.bool))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_starts_on_token_embeddings():
    torch.manual_seed(3)
    gate = HybridGate(64)
    e = torch.randn(10, 64)
    _, a = gate(e, torch.randn(10, 64), torch.ones(10, dtype=torch.bool))
    assert (a > 0.99).all()


def test_reference_is_exported_with_spec_signature():
    e = torch.randn(2, 4)
    out, a = gated_blend_reference(
        e,
        e,
        torch.zeros(2, dtype=torch.bool),
        torch.eye(4),
        torch.zeros(4),
        torch.eye(4),
        torch.zeros(4),
        torch.zeros(4),
    )
    assert torch.equal(out, e) and a.shape == (2, 4)
