"""Pure-torch Philox4x32-10, bit-identical to csrc/philox.h, vectorised over counters.

The 32x32 -> 64-bit products are done in int64 on 16-bit halves (every partial product
stays below 2^49, so nothing overflows), and every 32-bit word is kept masked to
[0, 2^32). `philox_uniform(seed, counter)` is the race noise of the sampling kernels:
counter as a 64-bit value in words 0-1 (words 2-3 zero), key = the seed's two 32-bit
halves, u = (2 * (r0 >> 9) + 1) * 2^-24, exact in fp32, never 0 nor 1.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of the 64-bit product of the constant a and the 32-bit words b (int64)."""
    t0 = (b & 0xFFFF) * a  # < 2^48
    t1 = (b >> 16) * a  # < 2^48
    s = t0 + ((t1 & 0xFFFF) << 16)  # < 2^49
    return (t1 >> 16) + (s >> 32), s & MASK32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counter words c0..c3 (int64 tensors holding values in [0, 2^32)), key words k0, k1
    (ints, or int64 tensors broadcasting against the counters) -> the four output words
    (int64 tensors in [0, 2^32))."""
    k0 &= MASK32
    k1 &= MASK32
    for r in range(10):
        if r > 0:
            k0 = (k0 + _W0) & MASK32
            k1 = (k1 + _W1) & MASK32
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seed: int | torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """u = philox_uniform(seed, counter) of csrc/philox.h, elementwise: counter is an int64
    tensor read as uint64 (two's complement), seed an int read as uint64, or an int64 tensor
    that broadcasts against counter (one key per row: a (B, 1) tensor). fp32, counter's shape
    and device."""
    counter = torch.as_tensor(counter).to(torch.int64)
    if torch.is_tensor(seed):
        k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    else:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        k0, k1 = seed & MASK32, seed >> 32
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32  # arithmetic shift, masked: the uint64's high word
    zero = torch.zeros_like(c0)
    r0 = philox4x32_10(c0, c1, zero, zero, k0, k1)[0]
    return ((r0 >> 9) * 2 + 1).to(torch.float32) * 2.0**-24
