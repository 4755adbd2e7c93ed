"""A Hugging Face causal LM (optionally with LoRA adapters) plus the HRPO gate.

The wrapper never edits the model: hybrid inputs go in through `inputs_embeds`, and the
lm-head is applied by our own ops on the decoder's last hidden state, so any causal LM
whose head is a plain bias-free linear map works (Qwen2/2.5/3, Llama, Mistral, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from hrpo.model import lora
from hrpo.model.gate import HybridGate
from hrpo_kernels import token_logprobs
from hrpo_kernels.latent_input import LatentParams, gumbel_logdensity, noisy_input_logdensity

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny"


class ModelError(ValueError):
    """A model that the wrapper cannot drive, named in one line."""


@dataclass
class SequenceBatch:
    """Prompts (left-padded) followed by completions (right-padded) with what the rollout
    stored for the training forward: the latent mixture and the thinking mask per position."""

    prompt_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, T) long
    completion_mask: torch.Tensor  # (B, T) bool: generated tokens, EOS included
    latents: torch.Tensor  # (B, T, d): h_hat of the distribution each token was drawn from
    think_mask: torch.Tensor  # (B, T) bool: the token's input position is blended
    # gumbel-soft (SofT-GRPO): each thinking position's candidates and their g' (B, T, k); see
    # latent_input.gumbel_targets. None for the other methods.
    gumbel_ids: torch.Tensor | None = None
    gumbel_values: torch.Tensor | None = None

    def select(self, idx):
        """The rows idx of every per-row tensor (works for subclasses too; other fields are kept)."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return type(self)(**{f: v[idx] if torch.is_tensor(v) else v for f, v in fields.items()})


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of each row is 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class HybridModel(nn.Module):
    def __init__(self, model: nn.Module, gate: HybridGate | None = None, **gate_kwargs):
        super().__init__()
        self.model = model
        lm = self.causal_lm
        self.body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
        head = lm.get_output_embeddings()
        name = type(lm).__name__
        if self.body is None or not isinstance(head, nn.Linear) or head.bias is not None:
            raise ModelError(f"{name}: HRPO needs a decoder body and a bias-free linear lm-head")
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(lm.config, attr, None):
                raise ModelError(f"{name}: config.{attr} is set; HRPO's log-probs assume plain logits")
        self.head = head
        # transformers renamed past_key_values to cache (5.2x); pass whichever the body takes.
        params = inspect.signature(self.body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.embed = lm.get_input_embeddings()
        self.gate = gate if gate is not None else HybridGate(self.embed.weight.shape[1], **gate_kwargs)
        self.gate.to(self.embed.weight.device)
        lora.use_fused_forward(self.model)

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model inside an optional peft wrapper."""
        return lora.inner_model(self.model)

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.head.weight

    def adapters_disabled(self):
        """Context for the reference policy: the base model without its LoRA adapters."""
        return lora.adapters_disabled(self.model)

    def decoder(self, inputs_embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """Last hidden states (after the final norm) of the decoder body."""
        out = self.body(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state

    def sequence_logprobs(
        self,
        batch: SequenceBatch,
        temperature: float,
        hybrid: bool = True,
        share_prefix: bool = False,
        latent: LatentParams | None = None,
        top_k: int = 0,
    ) -> torch.Tensor:
        """Teacher-forced log-probs (B, T) of the completion tokens at the sampling temperature.

        With hybrid on, the input at each thinking position is re-blended by the current
        gate from the stored latent (a constant), so the gate and adapters get gradients.
        latent: a training-free mode's stored latents are the inputs themselves (no gate); a
        thinking position's entry is, in place of its token's log-prob, under soft-noise (soft
        tokens) the log-density of its stored noisy input around the policy's mixture
        (latent_input.noisy_input_logdensity, with the rollout's top_k), under gumbel-soft
        (SofT-GRPO) the Gumbel log-density of its stored g' (latent_input.gumbel_logdensity).
        share_prefix: rows with the same prompt (a GRPO group) run it through the body once and
        attend to its cache (gradients flow back through it once); the values are the same.
        It needs the body's KV cache, so not with gradient checkpointing.
        """
        B, T = batch.completion_ids.shape
        h = self.completion_hidden(batch, hybrid, share_prefix, latent)
        lp = token_logprobs(h.reshape(B * T, -1), self.lm_weight, batch.completion_ids.reshape(-1), temperature)
        lp = lp.view(B, T)
        mode = latent.mode if hybrid and latent is not None else None
        if mode in ("soft-noise", "gumbel-soft"):
            soft = batch.think_mask & batch.completion_mask
            logits = self.head_logits(h[soft])
            if mode == "soft-noise":
                dens = noisy_input_logdensity(
                    logits, self.embed.weight, batch.latents[soft], latent, temperature, top_k
                )
            elif batch.gumbel_ids is None:
                raise ValueError("sequence_logprobs: gumbel-soft scores the rollout's g', which this batch lacks")
            else:
                dens = gumbel_logdensity(logits, batch.gumbel_ids[soft], batch.gumbel_values[soft], latent, temperature)
            lp = lp.masked_scatter(soft, dens)
        return lp

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (N, V) of hidden states (N, d): the mixtures' side of the head, which the
        densities differentiate (token_logprobs never forms them)."""
        return h.float() @ self.lm_weight.float().T

    def completion_hidden(
        self, batch: SequenceBatch, hybrid: bool, share_prefix: bool, latent: LatentParams | None
    ) -> torch.Tensor:
        """The last hidden states (B, T, d) that predict each completion token, from the inputs
        sequence_logprobs describes."""
        B, T = batch.completion_ids.shape
        # The last completion token is never an input that predicts anything: leave it out.
        comp = self.embed(batch.completion_ids[:, :-1])
        gated = hybrid and (latent is None or latent.mode == "hrpo")
        if gated:
            comp, _ = self.gate(comp, batch.latents[:, :-1], batch.think_mask[:, :-1])
        elif hybrid:
            comp = torch.where(batch.think_mask[:, :-1, None], batch.latents[:, :-1].to(comp.dtype), comp)
        mask = torch.cat([batch.prompt_mask, batch.completion_mask[:, :-1]], dim=1)
        rep, inverse = distinct_prompts(batch.prompt_ids, batch.prompt_mask) if share_prefix else (None, None)
        if rep is None or len(rep) == B:
            embeds = torch.cat([self.embed(batch.prompt_ids), comp], dim=1)
            # Position P-1+t holds the input that predicts completion token t.
            h = self.decoder(embeds, mask, positions_from_mask(mask))[:, batch.prompt_ids.shape[1] - 1 :]
        else:
            cache = DynamicCache(config=self.config)
            pm = batch.prompt_mask[rep]
            last = self.decoder(self.embed(batch.prompt_ids[rep]), pm, positions_from_mask(pm), cache)[:, -1:]
            h = last[inverse]
            if T > 1:
                cache_index_select(cache, inverse)
                pos = batch.prompt_mask.sum(-1, keepdim=True) + torch.arange(T - 1, device=mask.device)
                h = torch.cat([h, self.decoder(comp, mask, pos, cache)], dim=1)
        return h


def distinct_prompts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's distinct prompts (the tokens of `ids` under `mask`, padded either side):
    (the first row of each, in order of first appearance; the index into that list of every
    row). Prefix sharing runs the first list once and copies its results by the second."""
    keys = ids.masked_fill(~mask.bool(), -1)  # no token id is -1: a pad-id token never matches padding
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0], device=ids.device), "amin")
    order = torch.argsort(first)  # unique's sorted order -> order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=ids.device)
    return first[order], rank[inverse]


def cache_index_select(cache, idx: torch.Tensor) -> None:
    """Keep (or replicate) the batch rows `idx` of every layer's key/value tensors, in place
    (transformers 5's cache: cache.layers[i].keys / .values)."""
    for layer in cache.layers:
        if not (hasattr(layer, "keys") and hasattr(layer, "values")):
            raise NotImplementedError(f"rollout: cannot select rows of a {type(layer).__name__} cache layer")
        for attr in ("keys", "values"):
            t = getattr(layer, attr)
            if torch.is_tensor(t) and t.numel() > 0:
                setattr(layer, attr, t.index_select(0, idx.to(t.device)))
