// step_controller on CUDA: two launches on the caller's stream, no host sync.
//  - rows kernel, one block per row: thread 0 advances the marker state and writes the row's
//    column t of the rollout buffers and its finished flag; the block copies h_hat into
//    latents[:, t] (converted to the buffer's dtype).
//  - tail kernel, one block: counts the live rows and advances t by one.
// t is read on the device; a t outside [0, T) makes the step a no-op (t is not advanced).
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops_cuda.h"
#include "philox.h"
#include "step_row.h"

namespace hrpo {
namespace {

constexpr int kRowThreads = 128;
constexpr int kTailThreads = 1024;

__global__ void __launch_bounds__(kRowThreads) step_rows_kernel(StepArgs a) {
  const int64_t t = *a.t;
  if (t < 0 || t >= a.T) return;
  const int64_t r = blockIdx.x;
  const int64_t col = r * a.T + t;
  if (threadIdx.x == 0) step_row(a, r, t);
  const float* h = a.h_hat + r * a.ld_h;
  if (a.latent_dtype == DType::kFloat32) {
    float* dst = static_cast<float*>(a.latents) + col * a.D;
    for (int64_t c = threadIdx.x; c < a.D; c += kRowThreads) dst[c] = h[c];
  } else {  // bf16: round to nearest even, as torch's .to(bfloat16)
    uint16_t* dst = static_cast<uint16_t*>(a.latents) + col * a.D;
    for (int64_t c = threadIdx.x; c < a.D; c += kRowThreads) dst[c] = float_to_bf16_bits(__float_as_uint(h[c]));
  }
}

__global__ void __launch_bounds__(kTailThreads) step_tail_kernel(StepArgs a) {
  __shared__ int64_t warp_sums[kTailThreads / 32];
  const int64_t t = *a.t;
  int64_t live = 0;
  for (int64_t r = threadIdx.x; r < a.B; r += kTailThreads) live += !a.finished[r];
  for (int o = 16; o > 0; o >>= 1) live += __shfl_xor_sync(0xffffffffu, live, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = live;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kTailThreads / 32; ++w) total += warp_sums[w];
    *a.n_live = total;
    if (t >= 0 && t < a.T) *a.t = t + 1;
  }
}

}  // namespace

cudaError_t step_controller_cuda(const StepArgs& a, cudaStream_t stream) {
  if (a.B > 0) step_rows_kernel<<<static_cast<unsigned>(a.B), kRowThreads, 0, stream>>>(a);
  step_tail_kernel<<<1, kTailThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace hrpo
