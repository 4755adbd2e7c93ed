// A bf16 CPU model's lm-head with fp32 logits. oneDNN's packed linear (what the decoder body's
// GEMMs use) writes its output in the inputs' dtype, and bf16 logits would round the sampler's
// log-probs by ~1e-2; the fp32 GEMM over an upcast copy of the weight keeps the bits but runs at
// fp32 speed (12 ms of a 40 ms SmolLM2 step at 32 rows). ATen's bf16 brgemm micro-kernel (AMX
// or AVX512-BF16, what its CPU flash attention uses) takes bf16 operands and accumulates into
// fp32: one call per block of kLmBlock vocabulary columns, blocks split over threads.
#include "lm_head_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <vector>

namespace hrpo {
namespace {

namespace cpublas = at::native::cpublas;
constexpr int64_t kLmBlock = 64;  // vocabulary columns per micro-kernel call

}  // namespace

bool lm_head_bf16_supported() { return cpublas::could_pack(at::kBFloat16); }

torch::Tensor lm_head_pack_bf16(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu(),
              "lm_head_pack_bf16: w must be a contiguous (V, K) bf16 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t V = w.size(0), K = w.size(1), nb = (V + kLmBlock - 1) / kLmBlock;
  TORCH_CHECK(K % 2 == 0, "lm_head_pack_bf16: the hidden size must be even (VNNI pairs), got ", K);
  torch::Tensor wt = torch::zeros({K, nb * kLmBlock}, w.options());  // W^T, padded with zero columns
  wt.narrow(1, 0, V).copy_(w.t());
  torch::Tensor packed = torch::empty({nb, K, kLmBlock}, w.options());
  const at::BFloat16* src = wt.data_ptr<at::BFloat16>();
  at::BFloat16* dst = packed.data_ptr<at::BFloat16>();
  at::parallel_for(0, nb, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      cpublas::pack(K, kLmBlock, nb * kLmBlock, kLmBlock, at::kBFloat16, at::kBFloat16, src + b * kLmBlock,
                    dst + b * K * kLmBlock);
  });
  return packed;
}

torch::Tensor lm_head_bf16(const torch::Tensor& h, const torch::Tensor& packed, int64_t V) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kBFloat16 && h.is_contiguous() && h.device().is_cpu(),
              "lm_head_bf16: h must be a contiguous (M, K) bf16 CPU tensor, got ", h.sizes(), " ", h.scalar_type());
  const int64_t M = h.size(0), K = h.size(1), nb = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == kLmBlock && nb * kLmBlock >= V &&
                  V > (nb - 1) * kLmBlock,
              "lm_head_bf16: packed ", packed.sizes(), " is not a packed (", V, ", ", K, ") weight");
  torch::Tensor out = torch::empty({M, V}, h.options().dtype(torch::kFloat32));
  const at::BFloat16* a = h.data_ptr<at::BFloat16>();
  const at::BFloat16* p = packed.data_ptr<at::BFloat16>();
  float* c = out.data_ptr<float>();
  at::parallel_for(0, nb, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> tail;  // the last block's padded columns land here, not past the row
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t cols = std::min(kLmBlock, V - b * kLmBlock);
      if (cols == kLmBlock) {
        cpublas::brgemm(M, kLmBlock, K, K, kLmBlock, V, false, a, p + b * K * kLmBlock, c + b * kLmBlock, true);
        continue;
      }
      tail.resize(M * kLmBlock);
      cpublas::brgemm(M, kLmBlock, K, K, kLmBlock, kLmBlock, false, a, p + b * K * kLmBlock, tail.data(), true);
      for (int64_t r = 0; r < M; ++r)
        std::copy(tail.data() + r * kLmBlock, tail.data() + r * kLmBlock + cols, c + r * V + b * kLmBlock);
    }
    cpublas::brgemm_release(true);
  });
  return out;
}

}  // namespace hrpo
