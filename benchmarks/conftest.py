"""Shared GPU timing for the op benchmarks: median device time and the copy-bandwidth ceiling."""
from __future__ import annotations

import pytest
import torch


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time in ms measured with CUDA events (triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth of 1 GiB (bytes read + written / time), this run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9
