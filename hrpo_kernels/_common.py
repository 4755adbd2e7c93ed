"""Helpers shared by the op files: dispatch policy, Triton availability, launch geometry, and
the GPU path on the CPU (HRPO_GPU_PATH=cpu).

The GPU path on the CPU: with HRPO_GPU_PATH=cpu (and TRITON_INTERPRET=1, set before triton
is imported), CPU tensors take every op's CUDA branch: the Triton kernels run in the
interpreter, the extension's C++ twins stand in for its .cu kernels, and the rollout engine
runs as on CUDA (seeded noise, host checks every 16 steps, the decode step "captured" into a
StandInGraph and replayed). Only what needs a real device is skipped or replaced (device
properties, cuBLAS's fp32-output GEMM, real graph capture, flash-attn). It exists so that CI
runs the code a GPU runs; the mode is never on unless asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

GPU_PATH_ENV = "HRPO_GPU_PATH"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced_reference() -> bool:
    """HRPO_KERNELS=reference routes every op to its pure-torch reference."""
    return os.environ.get("HRPO_KERNELS", "").strip().lower() == "reference"


def use_fused(*tensors: torch.Tensor) -> bool:
    """The dispatch rule of every op: fused kernels on the GPU path (CUDA tensors, or CPU ones
    under HRPO_GPU_PATH=cpu), the reference otherwise."""
    return not forced_reference() and on_gpu_path(*tensors) and triton_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_path_on_cpu() -> bool:
    """Whether HRPO_GPU_PATH=cpu is set (see the module docstring); a one-line error for any
    other value, or when the Triton interpreter that the mode runs the kernels in is off."""
    value = os.environ.get(GPU_PATH_ENV, "").strip().lower()
    if value in ("", "0"):
        return False
    if value != "cpu":
        raise ValueError(f"{GPU_PATH_ENV}={value!r}: the only mode is 'cpu' (unset it for the normal dispatch)")
    if not (interpreting() and triton_available()):
        raise RuntimeError(
            f"{GPU_PATH_ENV}=cpu runs the Triton kernels in its interpreter: install triton and set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
    return True


@contextlib.contextmanager
def gpu_path_mode():
    """HRPO_GPU_PATH=cpu inside the block, its previous value restored after (for tests)."""
    before = os.environ.get(GPU_PATH_ENV)
    os.environ[GPU_PATH_ENV] = "cpu"
    try:
        gpu_path_on_cpu()  # fail here, not at the first op, when the mode cannot run
        yield
    finally:
        if before is None:
            os.environ.pop(GPU_PATH_ENV, None)
        else:
            os.environ[GPU_PATH_ENV] = before


def on_gpu_path(*where: torch.Tensor | torch.device) -> bool:
    """Whether work on these tensors (or devices) takes the CUDA branches: all on CUDA, or all
    on the CPU under HRPO_GPU_PATH=cpu."""
    devices = [x.device if isinstance(x, torch.Tensor) else torch.device(x) for x in where]
    if all(d.type == "cuda" for d in devices):
        return True
    return all(d.type == "cpu" for d in devices) and gpu_path_on_cpu()


# Ops that make the host wait for the device (a value read on the host, or an output whose
# size depends on the data): a CUDA graph cannot hold them.
_HOST_SYNC_OPS = frozenset(
    {
        torch.ops.aten._local_scalar_dense,
        torch.ops.aten.nonzero,
        torch.ops.aten.equal,
        torch.ops.aten.is_nonzero,
        torch.ops.aten.masked_select,
        torch.ops.aten._unique2,
        torch.ops.aten.unique_dim,
        torch.ops.aten.unique_consecutive,
    }
)


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _HOST_SYNC_OPS:
            raise RuntimeError(
                f"{GPU_PATH_ENV}=cpu: {func.overloadpacket.__name__} in a captured step syncs with "
                "the host, which a CUDA graph cannot hold"
            )
        return func(*args, **(kwargs or {}))


_replaying = False  # inside StandInGraph.replay


class StandInGraph:
    """The CUDA graph of the GPU path on the CPU. Capture records the step without running it,
    as torch.cuda.graph does; replay() runs it as a real replay runs the recorded kernels:
    with ops taking their under-capture branches (stream_capturing is true) and a host sync
    an error, as real capture makes it. What it cannot see: a host value frozen at capture
    (the step's Python runs again at each replay)."""

    def __init__(self, step):
        self._step = step

    def replay(self) -> None:
        global _replaying
        _replaying = True
        try:
            with _NoHostSync():
                self._step()
        finally:
            _replaying = False


def stream_capturing(t: torch.Tensor) -> bool:
    """Whether work on t is being recorded into a CUDA graph (on the CPU: a StandInGraph replay)."""
    if t.is_cuda:
        return torch.cuda.is_current_stream_capturing()
    return _replaying


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


_DERIVED: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor | None]] = {}


def derived(w: torch.Tensor, kind: str, make) -> torch.Tensor | None:
    """make(w), made once per version of `w` (an in-place update makes a new one; it goes when
    `w` does)."""
    key = (id(w), kind)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    _DERIVED[key] = (weakref.ref(w, lambda _: _DERIVED.pop(key, None)), w._version, make(w.detach()))
    return _DERIVED[key][2]


def f32_copy(w: torch.Tensor) -> torch.Tensor:
    """`w` in fp32: on the CPU upcast once per version of `w` and kept (for a 16-bit lm-head or
    embedding the CPU reads every decode step, upcasting it each step took more time than the
    GEMM itself); elsewhere per call (a resident fp32 copy of a large vocabulary would hold GBs
    of GPU memory for the reference paths that use it)."""
    if w.dtype == torch.float32:
        return w
    return derived(w, "f32", lambda x: x.float()) if w.device.type == "cpu" else w.float()


_PACKING: dict[torch.dtype, bool] = {}  # whether oneDNN packing works here, per dtype, decided at first use
_PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_packing(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's prepacked linear (an op torch.compile uses for CPU) for dtype."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=dtype))
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), w, None, "none", [], "")
        return y.shape == (1, 2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w reordered for oneDNN on an fp32 or bf16 CPU weight, else None. At the engine's shapes its
    GEMMs run 2-2.4x faster than F.linear's in fp32 on this project's AVX-512 CPUs and about 1.8x
    in bf16 (AMX), with the same bits as F.linear in bf16 (tests/test_engine_lora16.py)."""
    if w.device.type != "cpu" or w.dtype not in _PACKABLE:
        return None
    if w.dtype not in _PACKING:
        _PACKING[w.dtype] = _onednn_packing(w.dtype)
    return torch.ops.mkldnn._reorder_linear_weight(w) if _PACKING[w.dtype] else None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def cpu_logits(hidden: torch.Tensor, lm_weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits (B, V) of CPU hidden states: one GEMM on the lm-head's fp32 copy, oneDNN-packed
    once per version of the weight. oneDNN's packed GEMM gives a row the same bits whatever the
    batch around it (MKL's sgemm does not: it takes a GEMV path for one row), so a served
    request's greedy tokens do not depend on who else is decoding (tests/test_serve.py)."""
    packed = derived(lm_weight, "packed-f32", lambda x: pack(x.float()))
    return linear(hidden.float(), f32_copy(lm_weight), None, packed)


def seed_offset(seed, offset, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 seed (one element, or one per row) and one-element Philox offset on `device` for
    the sampling kernels; a missing seed is drawn from `generator` (one host draw: engines pass
    device tensors)."""
    if seed is None:
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev, dtype=torch.int64)
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(-1).to(device)  # one, or one per row
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


def row_ids_or_arange(row_ids, B: int, device) -> torch.Tensor:
    """The references' row identities: row_ids checked (row_ids_tensor), or arange(B)."""
    return torch.arange(B, device=device) if row_ids is None else row_ids_tensor(row_ids, B, device)


def host_int(x, default: int = 0) -> int:
    """A seed or offset given as an int or a one-element tensor, read on the host (a sync)."""
    return default if x is None else int(torch.as_tensor(x).reshape(-1)[0])


def row_seeds(seed, B: int) -> int | torch.Tensor:
    """The references' Philox key of each row: one seed (an int or a one-element tensor) read
    as an int, or one seed per row (B elements) as a (B, 1) int64 tensor that broadcasts
    against a row's counters (philox_uniform takes either)."""
    s = torch.as_tensor(seed).reshape(-1)
    if s.numel() == 1:
        return int(s[0])
    if s.numel() != B:
        raise ValueError(f"seed must be one seed or one per row: got {s.numel()} for {B} rows")
    return s.to(torch.int64)[:, None]


def check_seed(seed: torch.Tensor, B: int, op: str) -> None:
    """A kernel's seed: one int64 element, or one per row (each row keyed by its own)."""
    if seed.dtype != torch.int64 or seed.dim() != 1 or seed.numel() not in (1, B):
        raise ValueError(f"{op}: seed must be int64 of 1 or B = {B} elements, got {tuple(seed.shape)} {seed.dtype}")


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
