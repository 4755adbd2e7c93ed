// CPU twin of gated_blend's forward epilogue (the Triton forward kernel's math), for the
// CPU engine's decode step, where the reference's ~15 elementwise torch ops per step cost
// more than the two gate GEMMs. The caller does the GEMM (lin = e [W_r | W_i]^T + b) and
// passes coef = -c * softplus(-Lambda); here, per element:
//   r = sigmoid(lin_r), i = sigmoid(lin_i), a = exp(coef * r),
//   out = a e + sqrt(1 - a^2 + 1e-8) (i h) where the row's mask is set, else e.
// exp is a polynomial the compiler vectorises (within 2 ulp of expf); rows go to OpenMP
// threads and the loops to AVX-512 / AVX2 clones picked at load time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "load_float.h"
#include "poly_exp.h"
#include "ops.h"

namespace hrpo {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void blend_row(const float* e, const float* h, const float* lin, const float* coef, bool blend, int64_t D,
               float* out, float* a) {
  for (int64_t j = 0; j < D; ++j) {
    const float r = 1.f / (1.f + poly_exp(-lin[j]));
    a[j] = poly_exp(coef[j] * r);
  }
  if (!blend) {
    std::copy(e, e + D, out);
    return;
  }
  for (int64_t j = 0; j < D; ++j) out[j] = 1.f / (1.f + poly_exp(-lin[D + j])) * h[j];  // i h
  for (int64_t j = 0; j < D; ++j)  // sqrt apart: its errno path keeps a loop scalar
    out[j] = a[j] * e[j] + std::sqrt(1.f - a[j] * a[j] + 1e-8f) * out[j];
}

}  // namespace

void gated_blend_cpu(const GateArgs& g) {
#pragma omp parallel if (g.B > 1)
  {
    std::vector<float> h(g.D);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < g.B; ++b) {
      const bool blend = g.mask[b];
      if (blend)
        for (int64_t j = 0; j < g.D; ++j) h[j] = load_float(g.h, g.h_dtype, b * g.D + j);
      blend_row(g.e + b * g.D, h.data(), g.lin + b * 2 * g.D, g.coef, blend, g.D, g.out + b * g.D, g.a + b * g.D);
    }
  }
}

}  // namespace hrpo
