"""Ops of the HRPO hot loop. Each op file holds its pure-torch reference (the
specification and the CPU path) and the dispatcher that the trainer and rollout call."""
from .gated_blend import GATE_C, gated_blend, gated_blend_reference
from .sample_and_mix import sample_and_mix, sample_and_mix_reference
from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = [
    "GATE_C",
    "gated_blend",
    "gated_blend_reference",
    "sample_and_mix",
    "sample_and_mix_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
