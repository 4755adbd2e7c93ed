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
