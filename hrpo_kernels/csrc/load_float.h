// Element off of an fp32 / bf16 / fp16 array as float, for the CPU twins.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ops.h"

namespace hrpo {

inline float load_float(const void* e, DType dt, int64_t off) {
  switch (dt) {
    case DType::kFloat32:
      return static_cast<const float*>(e)[off];
    case DType::kBFloat16: {
      const uint32_t b = static_cast<uint32_t>(static_cast<const uint16_t*>(e)[off]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      return f;
    }
    case DType::kFloat16: {
      const uint16_t h = static_cast<const uint16_t*>(e)[off];
      const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
      const int exp = (h >> 10) & 0x1f;
      const uint32_t man = h & 0x3ffu;
      float f;
      if (exp == 0) {
        f = std::ldexp(static_cast<float>(man), -24);
        if (sign) f = -f;
        return f;
      }
      const uint32_t b = exp == 31 ? (sign | 0x7f800000u | (man << 13))
                                   : (sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (man << 13));
      std::memcpy(&f, &b, 4);
      return f;
    }
  }
  return 0.f;
}

}  // namespace hrpo
