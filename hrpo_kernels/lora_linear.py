"""A frozen linear layer with a LoRA adapter, y = x W^T + b + s (x A^T) B^T, for training.

`lora_linear_reference` is peft's math (the specification). The op computes the same with
fewer passes over the activations: in fp32 the adapter is merged into the weight for the
forward (W + s B A costs out x in x r once, against tokens x (in + out) x r for the adapter
path and two elementwise passes over the output), in 16-bit the scale is folded into the
small x A^T; the backward forms dX with one GEMM against the merged weight (fp32)
and the adapters' gradients from x and the saved x A^T. The base weight and bias are frozen
(LoRA training): the op gives them no gradient and refuses them requiring one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import forced_reference


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float):
    """peft's LoRA Linear: the adapter path runs in the adapter's dtype, the sum in the base's."""
    out = F.linear(x, weight, bias)
    return out + (F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling).to(out.dtype)


def _forward(x2, weight, bias, lora_a, lora_b, scaling: float, keep_u: bool):
    """(y, x A^T or None, the merged weight or None) for rows x2 (tokens, in)."""
    # Merging costs out x in x r; worth it once the adapter path (tokens x (in + out) x r)
    # costs more, i.e. not for one-token decode steps.
    many = x2.shape[0] * (weight.shape[0] + weight.shape[1]) > weight.shape[0] * weight.shape[1]
    if many and x2.dtype == weight.dtype == lora_a.dtype == lora_b.dtype == torch.float32:
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
        u = x2 @ lora_a.t() if keep_u else None  # only the adapters' gradients need it
        return F.linear(x2, merged, bias), u, merged
    # the adapter's product in its own dtype, as peft adds it; the scale folded into u
    u = x2.to(lora_a.dtype) @ lora_a.t()
    y = F.linear(x2, weight, bias)
    y += ((u * scaling) @ lora_b.t()).to(y.dtype)
    return y, u, None


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, u, merged = _forward(x2, weight, bias, lora_a, lora_b, scaling, keep_u=True)
        ctx.save_for_backward(x2, u, weight if merged is None else merged, lora_a, lora_b)
        ctx.scaling, ctx.shape, ctx.merged = float(scaling), shape, merged is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, u, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g2 = gy.reshape(-1, gy.shape[-1])
        ga = g2.to(lora_b.dtype)
        v = ga @ lora_b  # (tokens, r)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g2 @ weight  # merged: the adapter's share is in it
            if not ctx.merged:
                gx = gx + ((v * s) @ lora_a).to(gx.dtype)
            gx = gx.view(ctx.shape)
        grad_a = (v.t() @ x2.to(lora_a.dtype)).mul_(s) if ctx.needs_input_grad[3] else None
        grad_b = (ga.t() @ u).mul_(s) if ctx.needs_input_grad[4] else None
        return gx, None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float):
    """Dispatcher: the op with autograd for x and the adapters (the base weight and bias
    frozen), on every device; HRPO_KERNELS=reference gives the reference."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad False)")
    if forced_reference():
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)):
        y, _, _ = _forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, float(scaling), keep_u=False)
        return y.view(*x.shape[:-1], y.shape[-1])  # evaluation: nothing kept for a backward
    return _LoraLinearFn.apply(x, weight, bias, lora_a, lora_b, float(scaling))
