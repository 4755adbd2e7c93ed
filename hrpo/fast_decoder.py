"""The rollout engine's own decoder forward for Qwen2 / Qwen2.5 / Qwen3 and Llama bodies.

Why not the Hugging Face forward: at decode time its per-module Python, mask and cache
bookkeeping cost more than the math at rollout batch sizes, and its caches cannot hold
ragged rows at their own positions inside a CUDA graph. The math here is HF's op for op
(RMSNorm in fp32, rotary tables from the model's own rotary module, softmax in fp32), so
outputs agree to rounding; tests hold it to the HF forward.

Weights are packed for generation (q|k|v and gate|up fused into one matrix each) and LoRA
adapters are merged into the packed copy: `refresh()` recomputes W + sum of B A * scaling
in fp32 from the live adapters (when a parameter or adapter setting changed since the
last one), so a refresh before each rollout keeps generation exactly
in step with training. On the CPU in fp32 the packed matrices are also reordered for
oneDNN's prepacked GEMM (2-2.4x faster than F.linear at decode shapes), and a decode step
runs as one call into the extension's C++ body (csrc/decode_body_cpu.cpp, the same math
with the ~45 small torch ops per layer fused into loops) when the extension loads.
Anything this file cannot run exactly is named by `unsupported_reason`, and the engine
falls back to the reference loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrpo_kernels import decode_attention
from hrpo_kernels._common import forced_reference
from hrpo_kernels._ext import load_extension

from .kv_cache import StaticKVCache

ARCHS = ("qwen2", "qwen3", "llama")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _base(mod: nn.Module) -> nn.Linear:
    """The plain Linear of a projection (inside its LoRA wrapper, if any)."""
    return getattr(mod, "base_layer", mod)


def _lora_reason(mod: nn.Module, name: str) -> str | None:
    """Why a projection cannot be merged (None: a plain Linear or vanilla LoRA on one)."""
    base = _base(mod)
    if base is mod:
        return None if type(mod) is nn.Linear else f"{name} is a {type(mod).__name__}, not a Linear"
    if type(base) is not nn.Linear:
        return f"{name} wraps a {type(base).__name__}, not a Linear"
    if getattr(mod, "lora_variant", None) or any(getattr(mod, "use_dora", {}).values()):
        return f"{name} uses a LoRA variant (DoRA, ...) that cannot be merged"
    if any(getattr(mod, "lora_bias", {}).values()):
        return f"{name} uses lora_bias"
    return None


def unsupported_reason(lm: nn.Module) -> str | None:
    """None when FastDecoder runs this causal LM exactly, else what it cannot run."""
    cfg = lm.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in ARCHS:
        return f"model_type {kind!r} (the engine runs {', '.join(ARCHS)})"
    body = getattr(lm, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return f"{type(lm).__name__} has no .model.layers / .model.rotary_emb"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "non-full attention layers"
    if getattr(cfg, "mlp_bias", False):
        return "biased MLP projections"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    rope = getattr(body.rotary_emb, "rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"rope_type {rope!r} (its tables depend on the sequence length)"
    if type(lm.get_input_embeddings()) is not nn.Embedding:
        return "the input embedding is not a plain nn.Embedding"
    for i, layer in enumerate(body.layers):
        for owner, names in ((layer.self_attn, _PROJ), (layer.mlp, _MLP)):
            for n in names:
                why = _lora_reason(getattr(owner, n), f"layer {i} {n}")
                if why:
                    return why
    return None


def effective_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a Linear or a LoRA-wrapped Linear applies now: base + active deltas,
    summed in fp32 and rounded once to the base dtype."""
    base = _base(mod)
    if base is mod:
        return whole(mod.weight), whole(mod.bias)
    w = whole(base.weight)
    if getattr(mod, "disable_adapters", False) or getattr(mod, "merged", False):
        return w, whole(base.bias)  # merged: peft already folded the deltas into base.weight
    names = [a for a in mod.active_adapters if a in mod.lora_A]
    if not names:
        return w, whole(base.bias)
    acc = w.float()
    for a in names:
        if not hasattr(mod.lora_A[a].weight, "full_tensor"):
            acc = acc + mod.get_delta_weight(a).float()
        else:  # FSDP shards: peft's delta would multiply DTensors; the same product on whole ones
            acc = acc + (whole(mod.lora_B[a].weight).float() @ whole(mod.lora_A[a].weight).float()) * mod.scaling[a]
    return acc.to(w.dtype), whole(base.bias)


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as the engine needs it: an FSDP-sharded one gathered (every rank calls
    this at the same point: each refresh before a rollout)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


_PACKING: bool | None = None  # whether oneDNN packing works here, decided at first use


def _onednn_packing() -> bool:
    """Whether this torch has oneDNN's prepacked linear (an op torch.compile uses for CPU)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        return torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "").shape == (1, 2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w reordered for oneDNN on an fp32 CPU weight (its GEMMs run 2-2.4x faster than
    F.linear's at the engine's shapes on this project's AVX-512 CPUs), else None."""
    global _PACKING
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return None
    if _PACKING is None:
        _PACKING = _onednn_packing()
    return torch.ops.mkldnn._reorder_linear_weight(w) if _PACKING else None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in fp32, the scale applied in the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, HF's rotary form (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Layer:
    """One decoder layer's packed generation weights and references to its norms."""

    def __init__(self, layer: nn.Module, dims: tuple[int, int], dtype, device):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        nq, nk = dims
        self.layer = layer
        d = layer.input_layernorm.weight.shape[0]
        inter = _base(mlp.gate_proj).out_features
        new = dict(dtype=dtype, device=device)
        self.qkv_w = torch.empty(nq + 2 * nk, d, **new)
        self.qkv_b = torch.empty(nq + 2 * nk, **new) if _base(attn.q_proj).bias is not None else None
        self.o_w = torch.empty(d, nq, **new)
        self.o_b = torch.empty(d, **new) if _base(attn.o_proj).bias is not None else None
        self.gate_up_w = torch.empty(2 * inter, d, **new)
        self.down_w = torch.empty(d, inter, **new)
        self.inter = inter
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        layer, attn = self.layer, self.attn
        self.ln1, self.eps1 = whole(layer.input_layernorm.weight), layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = whole(layer.post_attention_layernorm.weight), layer.post_attention_layernorm.variance_epsilon
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = (whole(qn.weight), qn.variance_epsilon) if qn is not None else None
        self.k_norm = (whole(kn.weight), kn.variance_epsilon) if kn is not None else None
        parts = [effective_weight(getattr(self.attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
        torch.cat([w for w, _ in parts], out=self.qkv_w)
        if self.qkv_b is not None:
            torch.cat([b for _, b in parts], out=self.qkv_b)
        w, b = effective_weight(self.attn.o_proj)
        self.o_w.copy_(w)
        if self.o_b is not None:
            self.o_b.copy_(b)
        torch.cat([effective_weight(self.mlp.gate_proj)[0], effective_weight(self.mlp.up_proj)[0]], out=self.gate_up_w)
        self.down_w.copy_(effective_weight(self.mlp.down_proj)[0])
        self.packed = {name: pack(getattr(self, name)) for name in ("qkv_w", "o_w", "gate_up_w", "down_w")}


class FastDecoder:
    """Prefill and decode over a StaticKVCache with the weights of `lm` (a causal LM of
    ARCHS, possibly inside a peft wrapper: pass the inner model). cpu_body: decode through
    the extension's C++ body on an fp32 CPU model (False: the torch ops below)."""

    def __init__(self, lm: nn.Module, cpu_body: bool = True):
        why = unsupported_reason(lm)
        if why:
            raise ValueError(f"FastDecoder: cannot run {type(lm).__name__}: {why}")
        cfg = lm.config
        body = lm.model
        self.body = body
        self.embed = lm.get_input_embeddings().weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = float(getattr(body.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.n_layers = len(body.layers)
        dims = (self.n_heads * self.head_dim, self.n_kv * self.head_dim)
        self.layers = [_Layer(layer, dims, self.dtype, self.device) for layer in body.layers]
        self._key = self._weights_key()
        self.norm, self.norm_eps = body.norm.weight, body.norm.variance_epsilon
        self._cos = self._sin = None
        cpu32 = self.device.type == "cpu" and self.dtype == torch.float32 and cpu_body and not forced_reference()
        self.ext = load_extension() if cpu32 else None
        if self.ext is not None and not hasattr(self.ext, "decode_body_cpu"):
            self.ext = None  # a prebuilt extension from before the C++ body
        self._refresh_ext_args()

    def refresh(self, force: bool = False) -> bool:
        """Re-pack (and re-merge LoRA) from the live modules if any of their parameters or
        adapter settings changed since the last refresh; returns whether it re-packed. Call
        before each generation. Changes are seen through each parameter's version counter,
        which every in-place update (optimizer steps, load_state_dict, copy_) advances;
        writes through `.data` bypass it and need `refresh(force=True)`."""
        key = self._weights_key()
        if not force and key == self._key:
            return False
        for layer in self.layers:
            layer.refresh()
        self._refresh_ext_args()
        self._key = key
        return True

    def _weights_key(self) -> tuple:
        """What the packed weights were made from: every layer parameter's identity, storage
        and version, and each LoRA wrapper's adapter settings."""
        key = []
        for layer in self.body.layers:
            for mod in layer.modules():
                for p in mod.parameters(recurse=False):
                    t = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard: its local storage
                    key.append((id(p), t.data_ptr(), t._version))
                if hasattr(mod, "lora_A"):
                    key.append((tuple(mod.active_adapters), bool(getattr(mod, "disable_adapters", False)),
                                bool(getattr(mod, "merged", False)), tuple(sorted(mod.scaling.items()))))
        return tuple(key)

    def _refresh_ext_args(self) -> None:
        """The C++ body's weight list and eps values (its kPerLayer order), rebuilt when the
        packed weights are."""
        if self.ext is None:
            return
        weights, eps = [], []
        for w in self.layers:
            qn, kn = w.q_norm or (None, 0.0), w.k_norm or (None, 0.0)
            weights += [w.ln1, w.qkv_w, w.packed["qkv_w"], w.qkv_b, qn[0], kn[0], w.o_w, w.packed["o_w"], w.o_b,
                        w.ln2, w.gate_up_w, w.packed["gate_up_w"], w.down_w, w.packed["down_w"]]
            eps += [w.eps1, w.eps2, qn[1], kn[1]]
        self._ext_args = (weights, self.norm, eps + [self.norm_eps])

    def new_cache(self, batch: int, slots: int) -> StaticKVCache:
        self._rotary_tables(slots)
        return StaticKVCache(self.n_layers, batch, slots, self.n_kv, self.head_dim, self.dtype, self.device)

    @torch.no_grad()
    def _rotary_tables(self, slots: int) -> None:
        """cos / sin (slots, head_dim) in the model dtype from the model's rotary module, so
        every rope type it implements (default, llama3, yarn, ...) is reproduced exactly."""
        if self._cos is not None and self._cos.shape[0] >= slots:
            return
        pos = torch.arange(slots, device=self.device)[None]
        cos, sin = self.body.rotary_emb(torch.empty(1, dtype=self.dtype, device=self.device), pos)
        self._cos, self._sin = cos[0], sin[0]

    def _qkv(self, w: _Layer, x: torch.Tensor, cos, sin):
        """Normed input (..., d) -> rotated q (..., H, Dh), k, v (..., Hkv, Dh)."""
        qkv = linear(x, w.qkv_w, w.qkv_b, w.packed["qkv_w"])
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        lead = x.shape[:-1]
        q = qkv[..., :nq].view(*lead, self.n_heads, self.head_dim)
        k = qkv[..., nq : nq + nk].view(*lead, self.n_kv, self.head_dim)
        v = qkv[..., nq + nk :].view(*lead, self.n_kv, self.head_dim)
        if w.q_norm is not None:
            q, k = rms_norm(q, *w.q_norm), rms_norm(k, *w.k_norm)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _mlp(self, w: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate, up = linear(rms_norm(h, w.ln2, w.eps2), w.gate_up_w, None, w.packed["gate_up_w"]).split(w.inter, dim=-1)
        return h + linear(F.silu(gate) * up, w.down_w, None, w.packed["down_w"])

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """x (n, P, d): right-padded prompt inputs, row b real for its first lengths[b]
        positions. Fills cache rows [0, n) slots [0, P), sets seqlens = lengths and returns the
        final-normed hidden state (n, d) at each row's last prompt token."""
        n, P, _ = x.shape
        cos, sin = self._cos[:P, None], self._sin[:P, None]  # (P, 1, Dh) against (n, P, heads, Dh)
        slot = torch.arange(P, device=x.device)
        allowed = (slot[None, :] <= slot[:, None])[None] & (slot[None, None, :] < lengths[:, None, None])
        mask = allowed[:, None]  # (n, 1, P, P): causal and within the row
        group = self.n_heads // self.n_kv
        h = x
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, rms_norm(h, w.ln1, w.eps1), cos, sin)
            cache.k[i, :n, :P] = k
            cache.v[i, :n, :P] = v
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2).repeat_interleave(group, dim=1),
                v.transpose(1, 2).repeat_interleave(group, dim=1),
                attn_mask=mask,
                scale=self.scale,
            )
            h = h + linear(att.transpose(1, 2).reshape(n, P, -1), w.o_w, w.o_b, w.packed["o_w"])
            h = self._mlp(w, h)
        cache.seqlens[:n] = lengths.to(torch.int32)
        last = h[torch.arange(n, device=x.device), lengths.long() - 1]
        return rms_norm(last, self.norm, self.norm_eps)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cache: StaticKVCache, max_len: int | None = None) -> torch.Tensor:
        """One token per row: x (n, d) the inputs of cache rows [0, n). Writes their K/V at
        slot seqlens[b], advances seqlens and returns the final-normed hidden states (n, d).
        No host sync (max_len, the longest row after the step, only trims CPU attention)."""
        if self.ext is not None:
            weights, norm, eps = self._ext_args
            return self.ext.decode_body_cpu(x.contiguous(), cache.k, cache.v, cache.seqlens, self._cos, self._sin,
                                            weights, norm, eps, self.n_heads, self.scale)
        n = x.shape[0]
        pos = cache.seqlens[:n]
        slot = pos.long()
        rows = torch.arange(n, device=x.device)
        cos, sin = self._cos[slot, None], self._sin[slot, None]  # (n, 1, Dh)
        lengths = pos + 1
        h = x
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, rms_norm(h, w.ln1, w.eps1), cos, sin)
            cache.k[i].index_put_((rows, slot), k)
            cache.v[i].index_put_((rows, slot), v)
            att = decode_attention(q, cache.k[i, :n], cache.v[i, :n], lengths, self.scale, max_len=max_len)
            h = h + linear(att.reshape(n, -1), w.o_w, w.o_b, w.packed["o_w"])
            h = self._mlp(w, h)
        pos.add_(1)
        return rms_norm(h, self.norm, self.norm_eps)
