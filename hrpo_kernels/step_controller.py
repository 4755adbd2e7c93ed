"""step_controller: the bookkeeping of one rollout decode step, without a host sync.

Per row r, with t the step index (a one-element int64 device tensor):
  tok      = pad_id if finished[r] else tokens[r]
  state[r] = table[state[r], tok]            (marker KMP automaton, hrpo/marker.py; the last
                                              state S is absorbing: the marker is written)
  think    = hybrid and not finished[r] and state[r] != S
  buffers[:, t]: tokens = tok, logprobs = logprobs[r], think, mask = not finished[r] (alive
                 before the step), latents = h_hat[r] in the latents' dtype (fp32 or bf16)
  step_tokens[r] = tok, step_think[r] = think (the next input and the gate's mask)
  finished[r] |= tok in eos_ids or t + 1 >= max_new_tokens
then n_live = number of unfinished rows and t += 1. A t outside [0, T) makes the step a
no-op apart from n_live (so a captured loop may overrun). This mirrors hrpo/rollout.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ext


@dataclass
class StepBuffers:
    tokens: torch.Tensor  # (B, T) int64
    logprobs: torch.Tensor  # (B, T) fp32
    think: torch.Tensor  # (B, T) bool
    mask: torch.Tensor  # (B, T) bool: the completion mask
    latents: torch.Tensor  # (B, T, d) fp32 or bf16
    step_tokens: torch.Tensor  # (B,) int64
    step_think: torch.Tensor  # (B,) bool
    n_live: torch.Tensor  # (1,) int64

    @classmethod
    def allocate(cls, B: int, T: int, d: int, device=None, latent_dtype=torch.float32, pad_id: int = 0) -> StepBuffers:
        return cls(
            tokens=torch.full((B, T), pad_id, dtype=torch.int64, device=device),
            logprobs=torch.zeros(B, T, dtype=torch.float32, device=device),
            think=torch.zeros(B, T, dtype=torch.bool, device=device),
            mask=torch.zeros(B, T, dtype=torch.bool, device=device),
            latents=torch.zeros(B, T, d, dtype=latent_dtype, device=device),
            step_tokens=torch.full((B,), pad_id, dtype=torch.int64, device=device),
            step_think=torch.zeros(B, dtype=torch.bool, device=device),
            n_live=torch.full((1,), B, dtype=torch.int64, device=device),
        )

    def tensors(self):
        return (
            self.tokens,
            self.logprobs,
            self.think,
            self.mask,
            self.latents,
            self.step_tokens,
            self.step_think,
            self.n_live,
        )


def _eos_tensor(eos_ids, device) -> torch.Tensor:
    if isinstance(eos_ids, torch.Tensor):
        return eos_ids.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    return torch.tensor(list(eos_ids), dtype=torch.int64, device=device)


@torch.no_grad()
def step_controller_reference(
    table,
    state,
    finished,
    tokens,
    logprobs,
    h_hat,
    eos_ids,
    pad_id,
    t,
    max_new_tokens,
    bufs: StepBuffers,
    hybrid: bool = True,
):
    """The specification (module docstring); updates state, finished, t and bufs in place and
    returns (step_tokens, step_think, n_live). Syncs on t."""
    T = bufs.tokens.shape[1]
    col = int(t.reshape(-1)[0])
    if not 0 <= col < T:
        bufs.n_live.fill_(int((~finished).sum()))
        return bufs.step_tokens, bufs.step_think, bufs.n_live
    S, V = table.shape[0] - 1, table.shape[1]
    eos = _eos_tensor(eos_ids, tokens.device)
    tok = tokens.long().masked_fill(finished, pad_id)
    st = state.long()
    ok = (tok >= 0) & (tok < V) & (st >= 0) & (st <= S)
    new = torch.where(ok, table.long()[st.clamp(0, S), tok.clamp(0, V - 1)], st)
    state.copy_(new.to(state.dtype))
    think = (~finished & (new != S)) if hybrid else torch.zeros_like(finished)
    bufs.tokens[:, col] = tok
    bufs.logprobs[:, col] = logprobs.float()
    bufs.think[:, col] = think
    bufs.mask[:, col] = ~finished
    bufs.latents[:, col] = h_hat.float().to(bufs.latents.dtype)
    bufs.step_tokens.copy_(tok)
    bufs.step_think.copy_(think)
    done = finished | torch.isin(tok, eos) | (col + 1 >= max_new_tokens)
    finished.copy_(done)
    bufs.n_live.fill_(int((~done).sum()))
    t.add_(1)
    return bufs.step_tokens, bufs.step_think, bufs.n_live


def step_controller(
    table,
    state,
    finished,
    tokens,
    logprobs,
    h_hat,
    eos_ids,
    pad_id,
    t,
    max_new_tokens,
    bufs: StepBuffers,
    hybrid: bool = True,
    *,
    impl: str | None = None,
):
    """Dispatcher: the CUDA kernels for CUDA tensors when the extension loaded (no host sync:
    pass eos_ids as a device tensor), the C++ twin for CPU tensors with impl="ext", else the
    reference. Returns (step_tokens, step_think, n_live), views of bufs."""
    mod = _ext.ext_for(state, impl)
    if mod is None:
        return step_controller_reference(
            table, state, finished, tokens, logprobs, h_hat, eos_ids, pad_id, t, max_new_tokens, bufs, hybrid
        )
    tokens = tokens.to(torch.int64).contiguous()
    logprobs = logprobs.to(torch.float32).contiguous()
    h_hat = h_hat.to(torch.float32)
    if h_hat.stride(-1) != 1:
        h_hat = h_hat.contiguous()
    mod.step_controller(
        table.contiguous(),
        state,
        finished,
        tokens,
        logprobs,
        h_hat,
        _eos_tensor(eos_ids, state.device),
        t,
        bufs.tokens,
        bufs.logprobs,
        bufs.think,
        bufs.mask,
        bufs.latents,
        bufs.step_tokens,
        bufs.step_think,
        bufs.n_live,
        int(pad_id),
        int(max_new_tokens),
        bool(hybrid),
    )
    return bufs.step_tokens, bufs.step_think, bufs.n_live
