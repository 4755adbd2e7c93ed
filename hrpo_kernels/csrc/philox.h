// Philox4x32-10 (Salmon et al., SC'11), host + device, and the helpers that the CPU twins
// and the CUDA kernels share so that both draw the same noise and order floats the same.
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define HRPO_HD __host__ __device__ __forceinline__
#else
#define HRPO_HD inline
#endif

namespace hrpo {

struct U32x4 {
  uint32_t v[4];
};

HRPO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Counter c0..c3, key k0, k1 -> four 32-bit words (Random123's philox4x32 with 10 rounds).
HRPO_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += W0;
      k1 += W1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c0, &hi0, &lo0);
    mulhilo32(M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The race noise of one (row, token): counter = offset + row * V + token as a 64-bit value in
// words 0-1 (words 2-3 zero), key = the seed's two halves. Returns u in [2^-24, 1 - 2^-24]:
// (2m + 1) * 2^-24 with m the top 23 bits of word 0, exact in fp32, never 0 nor 1.
HRPO_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  const U32x4 r = philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t m = r.v[0] >> 9;
  return static_cast<float>(2u * m + 1u) * 5.9604644775390625e-8f;  // 2^-24
}

// Monotone map float -> uint32: a > b (as floats, -0 < +0) <=> key(a) > key(b).
HRPO_HD uint32_t float_key(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// fp32 -> bf16 bits, round to nearest even (NaN -> quiet NaN), as torch's .to(bfloat16).
HRPO_HD uint16_t float_to_bf16_bits(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  const uint32_t bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + bias) >> 16);
}

}  // namespace hrpo
