// CPU twin of step_controller (step_controller.cu).
#include <cstring>

#include "ops.h"
#include "philox.h"

namespace hrpo {

void step_controller_cpu(const StepArgs& a) {
  const int64_t t = *a.t;
  if (t < 0 || t >= a.T) {  // past the buffers: a no-op (the loop may overrun in a graph)
    int64_t live = 0;
    for (int64_t r = 0; r < a.B; ++r) live += !a.finished[r];
    *a.n_live = live;
    return;
  }
  const int64_t S = a.n_states - 1;
  int64_t live = 0;
  for (int64_t r = 0; r < a.B; ++r) {
    const bool fin = a.finished[r];
    const int64_t tok = fin ? a.pad_id : a.tokens[r];
    int64_t st = a.state_i64 ? static_cast<int64_t*>(a.state)[r] : static_cast<int32_t*>(a.state)[r];
    if (tok >= 0 && tok < a.V && st >= 0 && st <= S) {
      st = a.table_i64 ? static_cast<const int64_t*>(a.table)[st * a.V + tok]
                       : static_cast<const int32_t*>(a.table)[st * a.V + tok];
    }
    if (a.state_i64)
      static_cast<int64_t*>(a.state)[r] = st;
    else
      static_cast<int32_t*>(a.state)[r] = static_cast<int32_t>(st);
    const bool think = a.hybrid && !fin && st != S;
    const int64_t col = r * a.T + t;
    a.out_tokens[col] = tok;
    a.out_logprobs[col] = a.logprobs[r];
    a.out_think[col] = think;
    a.out_mask[col] = !fin;
    a.step_tokens[r] = tok;
    a.step_think[r] = think;
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
    bool done = fin || t + 1 >= a.max_new_tokens;
    for (int64_t e = 0; e < a.n_eos && !done; ++e) done = tok == a.eos[e];
    a.finished[r] = done;
    live += !done;
  }
  *a.n_live = live;
  *a.t = t + 1;
}

}  // namespace hrpo
