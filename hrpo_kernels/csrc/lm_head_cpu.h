// The lm-head of a bf16 CPU model with fp32 logits (lm_head_cpu.cpp).
#pragma once
#include <torch/extension.h>

namespace hrpo {

// Whether this CPU and torch build run ATen's bf16 brgemm micro-kernel (AMX or AVX512-BF16).
bool lm_head_bf16_supported();

// w (V, K) bf16 contiguous, K even -> W^T in column blocks of kLmBlock, each (K, kLmBlock) in
// the micro-kernel's VNNI layout (V padded with zero columns to a whole block), made once per
// version of the weight.
torch::Tensor lm_head_pack_bf16(const torch::Tensor& w);

// h (M, K) bf16 contiguous, packed from lm_head_pack_bf16 of a (V, K) weight -> logits (M, V)
// fp32: the products of bf16 values are exact in fp32 and summed in fp32, so the logits are
// those of the fp32 GEMM of the same values up to summation order; a row's bits do not
// depend on M (the micro-kernel's order over K is fixed per row).
torch::Tensor lm_head_bf16(const torch::Tensor& h, const torch::Tensor& packed, int64_t V);

}  // namespace hrpo
