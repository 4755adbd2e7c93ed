"""Helpers shared by the op files: dispatch policy, Triton availability, launch geometry."""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced_reference() -> bool:
    """HRPO_KERNELS=reference routes every op to its pure-torch reference."""
    return os.environ.get("HRPO_KERNELS", "").strip().lower() == "reference"


def use_fused(*tensors: torch.Tensor) -> bool:
    """The dispatch rule of every op: fused kernels for CUDA tensors, the reference otherwise."""
    return not forced_reference() and all(t.is_cuda for t in tensors) and triton_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def empty(*shape, **kwargs) -> torch.Tensor:
    """Every output buffer of a fused path comes from here (tests patch it to fill with NaN)."""
    return torch.empty(*shape, **kwargs)


def num_sms(device: torch.device, default: int = 4) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return default


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_MM_F32_OUT: dict[str, bool] = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result for bf16/fp16 operands, through torch.mm(out_dtype=) where
    this torch and device have it (one cuBLAS GEMM, fp32 accumulate and output), else by
    upcasting the operands (exact, slower)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    dev = a.device.type
    if _MM_F32_OUT.get(dev, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_F32_OUT[dev] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_F32_OUT[dev] = False
    return a.float() @ b.float()


def seed_offset(seed, offset, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One-element int64 seed and Philox offset on `device` for the sampling kernels; a
    missing seed is drawn from `generator` (one host draw: engines pass device tensors)."""
    if seed is None:
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev, dtype=torch.int64)
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    offset = torch.as_tensor(offset, dtype=torch.int64).reshape(1).to(device)
    return seed, offset


def row_ids_tensor(row_ids, B: int, device) -> torch.Tensor | None:
    """None, or the sampling kernels' stable row identities as a contiguous (B,) int64 tensor
    on `device` (row b's noise counter is offset + row_ids[b] * V + token)."""
    if row_ids is None:
        return None
    ids = torch.as_tensor(row_ids, device=device).to(torch.int64).reshape(-1).contiguous()
    if ids.numel() != B:
        raise ValueError(f"row_ids must hold one id per row: got {ids.numel()} for {B} rows")
    return ids


def sample_outputs(out, B: int, D: int, device, op: str):
    """(tokens (B,) int64, logprobs (B,) fp32, h_hat (B, D) fp32): `out` checked, or new."""
    if out is None:
        return (
            torch.empty(B, dtype=torch.int64, device=device),
            torch.empty(B, dtype=torch.float32, device=device),
            torch.empty(B, D, dtype=torch.float32, device=device),
        )
    tok, lp, h = out
    if tok.shape != (B,) or lp.shape != (B,) or h.shape != (B, D) or h.stride(-1) != 1:
        raise ValueError(f"{op}: out must be (tokens (B,), logprobs (B,), h_hat (B, d) row-major)")
    return tok, lp, h
