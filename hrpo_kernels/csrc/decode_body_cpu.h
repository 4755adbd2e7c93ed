// The engine's decoder body for one decode step on the CPU (decode_body_cpu.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace hrpo {

// Tensors per layer in `weights`, in hrpo/engine/fast_decoder.py::FastDecoder._refresh_ext_args
// order: ln1, q_norm?, k_norm?, ln2, then for each packed matrix (qkv, o, gate_up, down) its
// weight, packed?, bias?, LoRA A?, LoRA B?, LoRA scale? (? = None when absent; the LoRA
// tensors: _Adapters' a, b, scale, present for unmerged adapters only).
constexpr int64_t kProj = 6;
constexpr int64_t kPerLayer = 4 + 4 * kProj;

// x (n, d): the step's inputs of cache rows [0, n), fp32 or bf16 (the model's dtype; every
// activation, cache, table and norm weight in it). k_cache / v_cache (L, B, S, Hkv, Dh)
// contiguous; seqlens (B,) int32, the slot of each row's new token (advanced by one for
// rows [0, n)); cos / sin (>= S, Dh) rotary tables by position; eps: ln1, ln2, q_norm,
// k_norm per layer, then the final norm's. Writes the new K/V and returns the final-normed
// hidden states (n, d).
torch::Tensor decode_body_cpu(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              torch::Tensor& seqlens, const torch::Tensor& cos, const torch::Tensor& sin,
                              const std::vector<std::optional<torch::Tensor>>& weights, const torch::Tensor& norm_w,
                              const std::vector<double>& eps, int64_t n_heads, double scale);

}  // namespace hrpo
