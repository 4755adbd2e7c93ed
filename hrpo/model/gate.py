"""The learnable HRPO gate (fp32 parameters, whatever the model's dtype)."""

from __future__ import annotations

import torch
from torch import nn

from hrpo_kernels import GATE_C, gated_blend


def lambda_init(u: torch.Tensor, c: float = GATE_C) -> torch.Tensor:
    """Lambda such that sigmoid(Lambda)^c = u: the gate starts letting through a = u^r.

    -log(u^(-1/c) - 1) written with expm1: for u near 1 the direct form cancels to a few
    significant digits in fp32."""
    return -torch.log(torch.expm1(-torch.log(u) / c))


class HybridGate(nn.Module):
    def __init__(self, hidden_size: int, r_min: float = 0.99, r_max: float = 0.999, c: float = GATE_C):
        super().__init__()
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"gate init: need 0 < r_min <= r_max < 1, got r_min={r_min}, r_max={r_max}")
        self.c = c
        self.w_r = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        self.w_i = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        for lin in (self.w_r, self.w_i):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            nn.init.zeros_(lin.bias)
        u = torch.empty(hidden_size, dtype=torch.float32).uniform_(r_min, r_max)
        self.lam = nn.Parameter(lambda_init(u, c))

    def forward(self, e: torch.Tensor, h_hat: torch.Tensor, mask: torch.Tensor, impl: str | None = None):
        """Blend where mask is set; returns (inputs in e's dtype, fp32 gate coefficient a).
        impl: gated_blend's (the rollout engine's CPU path passes "ext")."""
        return gated_blend(
            e, h_hat, mask, self.w_r.weight, self.w_r.bias, self.w_i.weight, self.w_i.bias, self.lam, self.c, impl=impl
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The gate's optimizer groups: both linears (weights and biases together, all with
        weight decay, as the original's `thinking_residual_gate` group: patch.py:34-40) and
        Lambda, which trains at its own rate (patch.py:41-47)."""
        return {"gate": [self.w_r.weight, self.w_r.bias, self.w_i.weight, self.w_i.bias], "lambda": [self.lam]}


def gate_summary(gate: HybridGate) -> dict[str, float]:
    """a at r = 1 (the most the gate can open) averaged over channels, for logging."""
    with torch.no_grad():
        a_floor = torch.exp(-gate.c * nn.functional.softplus(-gate.lam))
    return {"gate_a_min_mean": float(a_floor.mean()), "gate_a_min_min": float(a_floor.min())}
