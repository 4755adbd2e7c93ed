"""Shared GPU timing for the op benchmarks: median device time and the copy-bandwidth ceiling."""

from __future__ import annotations

import pytest
import torch


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time in ms measured with CUDA events (triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


_MEMO: dict = {}


def memo_ms(key, fn) -> float:
    """bench_ms (short warm-up and reps) once per key: an op timed as a baseline for several
    entries is measured once per session."""
    if key not in _MEMO:
        _MEMO[key] = bench_ms(fn, warmup_ms=10, rep_ms=50)
    return _MEMO[key]


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth of 1 GiB (bytes read + written / time), this run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def synced(fn):
    """fn followed by a device sync, so pytest-benchmark's wall clock covers the GPU work."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def record_bandwidth(benchmark, copy_gbps: float, ms: float, nbytes: int, **info) -> None:
    """An op entry's extra_info: `info`, the median time, the bytes it must move, the achieved
    bandwidth and its fraction of this run's copy bandwidth, and the time floor those bytes set."""
    achieved = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info.update(
        info,
        median_us=ms * 1e3,
        bytes_min=nbytes,
        achieved_GBps=achieved,
        copy_GBps=copy_gbps,
        bw_fraction_of_copy=achieved / copy_gbps,
        floor_bytes_us=nbytes / (copy_gbps * 1e9) * 1e6,
    )
