"""Ops of the HRPO hot loop. Each op file holds its pure-torch reference (the
specification and the CPU path), its Triton or CUDA kernels, and the dispatcher that the
trainer and rollout call: fused kernels for CUDA tensors, the reference otherwise
(HRPO_KERNELS=reference forces the reference everywhere)."""

from .decode_attention import decode_attention, decode_attention_reference
from .gated_blend import GATE_C, gated_blend, gated_blend_reference
from .latent_input import LatentParams, latent_input_reference
from .lora_linear import lora_linear, lora_linear_reference
from .sample_and_mix import sample_and_mix, sample_and_mix_reference
from .step_controller import StepBuffers, step_controller, step_controller_reference
from .token_logprobs import token_logprobs, token_logprobs_chunked, token_logprobs_reference
from .topk_sample import topk_sample_mix, topk_sample_mix_reference

__all__ = [
    "GATE_C",
    "decode_attention",
    "decode_attention_reference",
    "StepBuffers",
    "gated_blend",
    "gated_blend_reference",
    "LatentParams",
    "latent_input_reference",
    "lora_linear",
    "lora_linear_reference",
    "sample_and_mix",
    "sample_and_mix_reference",
    "step_controller",
    "step_controller_reference",
    "token_logprobs",
    "token_logprobs_chunked",
    "token_logprobs_reference",
    "topk_sample_mix",
    "topk_sample_mix_reference",
]
