"""A static KV cache for the rollout engine: allocated once for (batch, slots), never grown.

Layout (layers, batch, slots, kv heads, head dim), flash-attn's kvcache layout per layer.
Row b holds its own prompt from slot 0 (no padding inside the cache) and `seqlens[b]`
is the slot its next token goes to, which is also that token's rotary position.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (layers, batch, slots, kv_heads, head_dim)
        # zeros, not empty: slots past a row's length are masked, but 0 * NaN would not be.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @torch.no_grad()
    def gather_rows(self, src: torch.Tensor, upto: int) -> None:
        """Rows [0, len(src)) become copies of rows `src` (slots [0, upto)), layer by layer so
        the temporary stays one layer's size. Serves prefix sharing and compaction."""
        n = src.numel()
        for cache in (self.k, self.v):
            for layer in cache:
                layer[:n, :upto] = layer[src, :upto]
        self.seqlens[:n] = self.seqlens[src]

    def rows_from(self, first: int) -> StaticKVCache:
        """The cache of rows [first, batch) of this one, as views: what is written there lands
        here (a serving batch prefills joining requests after its running rows)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v, view.seqlens = self.k[:, first:], self.v[:, first:], self.seqlens[first:]
        return view
