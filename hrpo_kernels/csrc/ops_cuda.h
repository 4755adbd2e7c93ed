// CUDA launchers of the ops (defined in the .cu files). Kept apart from ops.h so that the
// CPU twins never see a CUDA header.
#pragma once
#include <cuda_runtime_api.h>

#include "ops.h"

namespace hrpo {
// Both enqueue on `stream` and return cudaGetLastError() after their launches.
cudaError_t topk_sample_mix_cuda(const TopkArgs& a, cudaStream_t stream);
cudaError_t step_controller_cuda(const StepArgs& a, cudaStream_t stream);
}  // namespace hrpo
