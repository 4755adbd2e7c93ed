// A branch-free exp for the CPU twins' elementwise loops (the compiler vectorises loops of
// it, which it does not do for expf without -ffast-math).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace hrpo {

// exp(x) = 2^k exp(r), k = round(x log2 e), r = x - k ln 2 (ln 2 in two parts), exp(r) by
// its degree-7 Taylor polynomial on |r| <= ln2 / 2 (truncation < 5e-9 relative). Branch-free
// (rounding by adding and removing 1.5 * 2^23), so loops of it vectorise.
inline float poly_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - k * 0.693145751953125f - k * 1.42860682030941723e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace hrpo
