// Raw-pointer entry points of the HRPO ops: CPU twins (topk_sample_cpu.cpp,
// step_controller_cpu.cpp, gated_blend_cpu.cpp) and CUDA launchers (*.cu). No torch types here.
#pragma once
#include <stdint.h>

namespace hrpo {

constexpr int kMaxTopK = 128;

// Embedding / latent element types.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// topk_sample_mix: logits (B, V) fp32 rows contiguous with row stride ld_logits;
// embedding (V, d) of `emb_dtype` with row stride ld_emb (unit column stride);
// seed/offset: int64 pointers (host memory for the CPU twin, device for CUDA): offset one
// element, seed one (seed_stride 0) or one per row (seed_stride 1: row r keyed by seed[r]);
// row_ids: (B,) int64 in the same memory, or nullptr for arange(B). Row r's noise counter is
// offset + row_ids[r] * V + token, so a row keeps its noise when a caller compacts the batch.
// Outputs tokens (B,), logprobs (B,), h_hat (B, d) rows contiguous with stride ld_h.
// mode: the latent mode of hrpo_kernels/latent_input.py (0 hrpo, 1 soft, 2 moi, 3 soft-noise,
// 4 gumbel-soft) and its numbers; h_hat then holds that mode's next input. top_p / mix_top_p:
// the nuclei of hrpo_kernels/latent_input.py (nucleus, sampling_support). The CUDA kernel
// takes mode 0 without a nucleus only.
struct TopkArgs {
  const float* logits;
  int64_t ld_logits;
  const void* embedding;
  int64_t ld_emb;
  DType emb_dtype;
  int64_t B, V, D;
  int k;
  float inv_t;
  bool greedy;
  const int64_t* seed;
  int64_t seed_stride = 0;
  const int64_t* offset;
  const int64_t* row_ids;
  int64_t* tokens;
  float* logprobs;
  float* h_hat;
  int64_t ld_h;
  int mode = 0;
  float inv_tm = 1.f;    // 1 / the mixture's temperature
  float inv_tau = 1.f;   // 1 / gumbel_tau
  float beta = 1.f;      // MoI's concentration
  float sigma = 0.f;     // soft-noise's standard deviation
  float inv_logv = 0.f;  // 1 / log V (MoI's normalised entropy)
  uint64_t noise_key = 0;  // seed ^ noise_key keys the Gaussian stream
  float* entropy = nullptr;  // (B,) or nullptr: the mixture p's entropy in nats (the cold stop's)
  float top_p = 1.f;       // the sampler's nucleus inside the k (1: off; CPU twin only)
  float mix_top_p = 1.f;   // the mixture's own nucleus inside the sampler's (1: off; CPU twin only)
};

// step_controller: see hrpo_kernels/step_controller.py for the semantics.
struct StepArgs {
  const void* table;  // (S + 1, V)
  bool table_i64;
  int64_t n_states;  // S + 1
  int64_t V;
  void* state;  // (B,)
  bool state_i64;
  bool* finished;          // (B,)
  const int64_t* tokens;   // (B,)
  const float* logprobs;   // (B,)
  const float* h_hat;      // (B, d), row stride ld_h
  int64_t ld_h;
  const int64_t* eos;  // (n_eos,)
  int64_t n_eos;
  int64_t pad_id;
  int64_t* t;  // one element: the column to write; advanced by one per step
  int64_t max_new_tokens;
  bool hybrid;
  int64_t B, T, D;
  int64_t* out_tokens;   // (B, T)
  float* out_logprobs;   // (B, T)
  bool* out_think;       // (B, T)
  bool* out_mask;        // (B, T)
  void* latents;         // (B, T, d) contiguous
  DType latent_dtype;
  int64_t* step_tokens;  // (B,) this step's tokens, pad where finished (the next input)
  bool* step_think;      // (B,) this step's thinking flags (the gate's mask)
  int64_t* n_live;       // one element: rows still unfinished after the step
};

// gated_blend forward epilogue on the CPU (gated_blend_cpu.cpp): e (B, D) fp32, h (B, D) of
// h_dtype, lin (B, 2D) fp32 = [r logits | i logits], coef (D,) = -c * softplus(-Lambda),
// mask (B,); all rows contiguous. Writes out (B, D) fp32 and the gate coefficient a (B, D).
struct GateArgs {
  const float* e;
  const void* h;
  DType h_dtype;
  const float* lin;
  const float* coef;
  const bool* mask;
  int64_t B, D;
  float* out;
  float* a;
};

void topk_sample_mix_cpu(const TopkArgs& a);
void gated_blend_cpu(const GateArgs& g);
void step_controller_cpu(const StepArgs& a);

}  // namespace hrpo

