"""The HRPO gate: blend a token embedding with the latent mixture of the previous step.

    r = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i)
    a = exp(-c * softplus(-Lambda) * r)
    out = a * e + sqrt(1 - a^2 + 1e-8) * (i * h_hat)      where the thinking mask is set,
    out = e                                                 elsewhere.

`gated_blend_reference` is the specification (pure torch, fp32 math, autograd through
every gate parameter); fused kernels must match it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GATE_C = 8.0
SQRT_EPS = 1e-8


def gated_blend_reference(
    e: torch.Tensor,
    h_hat: torch.Tensor,
    mask: torch.Tensor,
    w_r: torch.Tensor,
    b_r: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    lam: torch.Tensor,
    c: float = GATE_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, a): the model inputs in e's dtype, and the fp32 gate coefficient a.

    e, h_hat: (..., d); mask: (...) bool; w_r, w_i: (d, d) as nn.Linear weights; b_r, b_i,
    lam: (d,). Rows outside the mask pass e through bit for bit.
    """
    e32, h32 = e.float(), h_hat.float()
    r = torch.sigmoid(F.linear(e32, w_r, b_r))
    i = torch.sigmoid(F.linear(e32, w_i, b_i))
    a = torch.exp(-c * F.softplus(-lam) * r)
    blended = a * e32 + torch.sqrt(1.0 - a * a + SQRT_EPS) * (i * h32)
    out = torch.where(mask.unsqueeze(-1), blended.to(e.dtype), e)
    return out, a


def gated_blend(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c: float = GATE_C):
    """Dispatcher: fused kernels plug in here; the reference serves every device for now."""
    return gated_blend_reference(e, h_hat, mask, w_r, b_r, w_i, b_i, lam, c)
