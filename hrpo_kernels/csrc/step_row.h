// The per-row bookkeeping of one step_controller step, shared by the CUDA kernel and the
// CPU twin so that the two cannot drift: advance the marker state on the written token,
// write column t of the rollout buffers, and mark the row finished (EOS or length).
// The latent copy stays with each caller (a block-wide copy on the GPU, memcpy on the CPU).
#pragma once
#include <stdint.h>

#include "ops.h"
#include "philox.h"

namespace hrpo {

HRPO_HD void step_row(const StepArgs& a, int64_t r, int64_t t) {
  const int64_t S = a.n_states - 1;
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
  bool done = fin || t + 1 >= a.max_new_tokens;
  for (int64_t e = 0; e < a.n_eos && !done; ++e) done = tok == a.eos[e];
  a.finished[r] = done;
}

}  // namespace hrpo
