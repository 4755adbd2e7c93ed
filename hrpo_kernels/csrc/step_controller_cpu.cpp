// CPU twin of step_controller (step_controller.cu).
#include <cstring>

#include "ops.h"
#include "philox.h"
#include "step_row.h"

namespace hrpo {

void step_controller_cpu(const StepArgs& a) {
  const int64_t t = *a.t;
  if (t < 0 || t >= a.T) {  // past the buffers: a no-op (the loop may overrun in a graph)
    int64_t live = 0;
    for (int64_t r = 0; r < a.B; ++r) live += !a.finished[r];
    *a.n_live = live;
    return;
  }
  int64_t live = 0;
  for (int64_t r = 0; r < a.B; ++r) {
    step_row(a, r, t);
    const int64_t col = r * a.T + t;
    const float* h = a.h_hat + r * a.ld_h;
    if (a.latent_dtype == DType::kFloat32) {
      std::memcpy(static_cast<float*>(a.latents) + col * a.D, h, sizeof(float) * a.D);
    } else {  // bf16 (the binding admits fp32 and bf16 only)
      uint16_t* dst = static_cast<uint16_t*>(a.latents) + col * a.D;
      for (int64_t c = 0; c < a.D; ++c) {
        uint32_t b;
        std::memcpy(&b, h + c, 4);
        dst[c] = float_to_bf16_bits(b);
      }
    }
    live += !a.finished[r];
  }
  *a.n_live = live;
  *a.t = t + 1;
}

}  // namespace hrpo
