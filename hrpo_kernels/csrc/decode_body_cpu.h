// The engine's decoder body for one decode step on the CPU (decode_body_cpu.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace hrpo {

// Tensors per layer in `weights`, in hrpo/fast_decoder.py::FastDecoder.cpu_weights order:
// ln1, qkv, qkv packed?, qkv bias?, q_norm?, k_norm?, o, o packed?, o bias?, ln2, gate_up,
// gate_up packed?, down, down packed? (? = None when absent).
constexpr int64_t kPerLayer = 14;

// x (n, d) fp32: the step's inputs of cache rows [0, n). k_cache / v_cache (L, B, S, Hkv, Dh)
// fp32 contiguous; seqlens (B,) int32, the slot of each row's new token (advanced by one for
// rows [0, n)); cos / sin (>= S, Dh) fp32 rotary tables by position; eps: ln1, ln2, q_norm,
// k_norm per layer, then the final norm's. Writes the new K/V and returns the final-normed
// hidden states (n, d).
torch::Tensor decode_body_cpu(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              torch::Tensor& seqlens, const torch::Tensor& cos, const torch::Tensor& sin,
                              const std::vector<std::optional<torch::Tensor>>& weights, const torch::Tensor& norm_w,
                              const std::vector<double>& eps, int64_t n_heads, double scale);

}  // namespace hrpo
