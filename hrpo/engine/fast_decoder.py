"""The rollout engine's own decoder forward for Qwen2 / Qwen2.5 / Qwen3 and Llama bodies.

Why not the Hugging Face forward: at decode time its per-module Python, mask and cache
bookkeeping cost more than the math at rollout batch sizes, and its caches cannot hold
ragged rows at their own positions inside a CUDA graph. The math here is HF's op for op
(RMSNorm in fp32, rotary tables from the model's own rotary module, softmax in fp32), so
outputs agree to rounding; tests hold it to the HF forward.

Weights are packed for generation (q|k|v and gate|up fused into one matrix each), and
`refresh()` re-reads them from the live modules when a parameter or adapter setting changed
since the last one, so a refresh before each rollout keeps generation in step with
training. How LoRA adapters are applied follows the training forward (hrpo/model/lora.py routes
every LoRA Linear through hrpo_kernels.lora_linear):
- fp32: merged into the packed copy, W + sum of s B A in fp32 (lora_linear merges too, and
  the merge is exact up to fp32 rounding).
- bf16 / fp16: unmerged, lora_linear's 16-bit forward op for op: y = x W^T + b on the
  packed base weight, then y += ((x A^T) * s) B^T computed in the adapters' dtype and
  rounded to y's. A merge would round W + s B A to 16 bits, and at early-training adapter
  sizes (deltas of 1e-5 on weights of 0.02) most entries would not change at all: the
  engine would sample a policy that lags the one being trained.
On the CPU in fp32 and bf16 the packed matrices are also reordered for oneDNN's prepacked GEMM
(2-2.4x faster than F.linear at decode shapes), and a decode step runs as one call into the
extension's C++ body (hrpo_kernels/csrc/decode_body_cpu.cpp, the same math with the ~45 small torch ops
per layer fused into loops, rounding to bf16 where these ops do, unmerged adapters applied by the
same ATen ops as _Adapters.add_to) when the extension loads.
Anything this file cannot run exactly is named by `unsupported_reason`, and the engine
falls back to the reference loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrpo.engine.kv_cache import StaticKVCache
from hrpo.model import lora
from hrpo_kernels import decode_attention
from hrpo_kernels._common import forced_reference, linear, pack
from hrpo_kernels._ext import load_extension

ARCHS = ("qwen2", "qwen3", "llama")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _lora_reason(mod: nn.Module, name: str) -> str | None:
    """Why the engine cannot apply a projection (None: a plain Linear or vanilla LoRA on one)."""
    base = lora.base_linear(mod)
    if base is mod:
        return None if type(mod) is nn.Linear else f"{name} is a {type(mod).__name__}, not a Linear"
    if type(base) is not nn.Linear:
        return f"{name} wraps a {type(base).__name__}, not a Linear"
    kind = lora.variant(mod)
    return f"{name} uses {kind}, which the engine does not apply" if kind else None


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
    base = lora.base_linear(mod)
    w, b = whole(base.weight), whole(base.bias)
    names = lora.applied(mod)
    if not names:
        return w, b
    acc = w.float()  # w itself when fp32: added out of place
    for name in names:  # on whole tensors: peft's get_delta_weight would multiply FSDP shards
        a, b_factor, scale = lora.factors(mod, name)
        acc = acc + (whole(b_factor).float() @ whole(a).float()) * scale
    return acc.to(w.dtype), b


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as the engine needs it: an FSDP-sharded one gathered (every rank calls
    this at the same point: each refresh before a rollout)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


_CPU_BODY = (torch.float32, torch.bfloat16)  # the dtypes the extension's C++ decoder body runs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in fp32, the scale applied in the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, HF's rotary form (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _layout(mods: list[nn.Module]) -> tuple:
    """Every adapter each projection holds, with its rank (active or not)."""
    return tuple(lora.layout(m) for m in mods)


class _Adapters:
    """The LoRA adapters of one packed matrix (q|k|v, o, gate|up or down), applied unmerged:
    `add_to` is lora_linear's 16-bit forward after its base GEMM. The projections' adapters
    are stacked so that a step costs two GEMMs however many projections and adapters there
    are: A (R, in) holds every adapter's rows, B (out, R) each adapter's columns at its
    projection's output rows and zeros elsewhere, scale (R,) each row's scaling. The zeros
    make the second GEMM `parts` times the per-projection products' work, still R / in of
    the base GEMM's (a few percent at LoRA ranks), for one GEMM and one add in place of one
    per projection (launches, not flops, bound a decode step). refresh() fills the buffers
    in place (captured CUDA graphs read them); an adapter not applied now has zero factors."""

    def __init__(self, mods: list[nn.Module], where: str):
        self.mods, self.where = mods, where
        self.layout = _layout(mods)
        factors = [lora.factors(m, a)[0] for m, part in zip(mods, self.layout) for a, _ in part]
        dtype = factors[0].dtype
        for a in factors:
            dtype = torch.promote_types(dtype, a.dtype)
        base = lora.base_linear(mods[0]).weight
        rank = sum(r for part in self.layout for _, r in part)
        outs = sum(lora.base_linear(m).out_features for m in mods)
        new = dict(dtype=dtype, device=base.device)
        self.a = torch.zeros(rank, lora.base_linear(mods[0]).in_features, **new)
        self.b = torch.zeros(outs, rank, **new)
        self.scale = torch.zeros(rank, dtype=torch.float32, device=base.device)

    @torch.no_grad()
    def refresh(self) -> None:
        if _layout(self.mods) != self.layout:
            raise ValueError(
                f"FastDecoder: the LoRA adapters of {self.where} changed from {self.layout} to "
                f"{_layout(self.mods)} since it was built; build a new engine"
            )
        row = col = 0
        for mod, part in zip(self.mods, self.layout):
            on = lora.applied(mod)
            out = lora.base_linear(mod).out_features
            for name, r in part:
                rows, cols = slice(row, row + r), slice(col, col + out)
                if name in on:
                    a, b, scale = lora.factors(mod, name)
                    self.a[rows].copy_(whole(a))
                    self.b[cols, rows].copy_(whole(b))
                    self.scale[rows] = scale
                else:
                    self.a[rows].zero_()
                    self.b[cols, rows].zero_()
                    self.scale[rows] = 0.0
                row += r
            col += out

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += ((x A^T) * s) B^T, in lora_linear's op order and dtypes: the low-rank product
        in the adapters' dtype, rounded to y's dtype, then added. (u * scale) in fp32 rounded
        to u's dtype is what u * a Python float gives."""
        u = x.to(self.a.dtype) @ self.a.t()
        y += (((u * self.scale).to(u.dtype)) @ self.b.t()).to(y.dtype)
        return y


# packed matrix -> (the layer module owning its projections, the projections in packing order)
_PACKED = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}


class _Layer:
    """One decoder layer's packed generation weights (`w`, `b`, and `packed` for oneDNN, by
    _PACKED name), its adapters when they run unmerged (`lora`), and references to its norms."""

    def __init__(self, layer: nn.Module, index: int, dtype, device, unmerged: bool):
        self.layer, self.unmerged = layer, unmerged
        self.parts = {
            name: [getattr(getattr(layer, owner), n) for n in names] for name, (owner, names) in _PACKED.items()
        }
        new = dict(dtype=dtype, device=device)
        self.w, self.b = {}, {}
        for name, mods in self.parts.items():
            bases = [lora.base_linear(m) for m in mods]
            self.w[name] = torch.empty(sum(b.out_features for b in bases), bases[0].in_features, **new)
            self.b[name] = torch.empty(self.w[name].shape[0], **new) if bases[0].bias is not None else None
        self.inter = lora.base_linear(layer.mlp.gate_proj).out_features
        self.lora = {
            name: _Adapters(mods, f"layer {index} {name}") if unmerged and any(_layout(mods)) else None
            for name, mods in self.parts.items()
        }
        self.refresh(base=True, adapters=True)

    @torch.no_grad()
    def refresh(self, base: bool, adapters: bool) -> None:
        """Re-pack the base weights (merged: with the adapters merged in, so on either change)
        and / or re-read the unmerged adapters."""
        if base or (adapters and not self.unmerged):
            self._pack()
        if adapters and self.unmerged:
            for lora in self.lora.values():
                if lora is not None:
                    lora.refresh()

    def _pack(self) -> None:
        layer, attn = self.layer, self.layer.self_attn
        self.ln1, self.eps1 = whole(layer.input_layernorm.weight), layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = (
            whole(layer.post_attention_layernorm.weight),
            layer.post_attention_layernorm.variance_epsilon,
        )
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = (whole(qn.weight), qn.variance_epsilon) if qn is not None else None
        self.k_norm = (whole(kn.weight), kn.variance_epsilon) if kn is not None else None
        for name, mods in self.parts.items():
            if self.unmerged:
                ws, bs = zip(*((whole(lora.base_linear(m).weight), whole(lora.base_linear(m).bias)) for m in mods))
            else:
                ws, bs = zip(*(effective_weight(m) for m in mods))
            torch.cat(ws, out=self.w[name])
            if self.b[name] is not None:
                torch.cat(bs, out=self.b[name])
        self.packed = {name: pack(w) for name, w in self.w.items()}

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x through the packed matrix `name`: the base GEMM, then the unmerged adapters."""
        y = linear(x, self.w[name], self.b[name], self.packed[name])
        lora = self.lora[name]
        return y if lora is None else lora.add_to(y, x)


class FastDecoder:
    """Prefill and decode over a StaticKVCache with the weights of `lm` (a causal LM of
    ARCHS, possibly inside a peft wrapper: pass the inner model). cpu_body: decode through
    the extension's C++ body on an fp32 or bf16 CPU model (False: the torch ops below)."""

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
        self.unmerged = self.dtype in (torch.bfloat16, torch.float16)  # LoRA as lora_linear applies it
        self.layers = [_Layer(layer, i, self.dtype, self.device, self.unmerged) for i, layer in enumerate(body.layers)]
        self._key = self._weights_key()
        self.norm, self.norm_eps = body.norm.weight, body.norm.variance_epsilon
        self._cos = self._sin = None
        cpu = self.device.type == "cpu" and self.dtype in _CPU_BODY and cpu_body and not forced_reference()
        self.ext = load_extension() if cpu else None
        if self.ext is not None and not hasattr(self.ext, "decode_body_cpu"):
            self.ext = None  # a prebuilt extension from before the C++ body
        self._refresh_ext_args()

    def refresh(self, force: bool = False) -> bool:
        """Re-read the weights from the live modules if any of their parameters or adapter
        settings changed since the last refresh; returns whether it did. Call before each
        generation. Unmerged (16-bit), a change of the adapters alone re-reads only them.
        Changes are seen through each parameter's version counter, which every in-place
        update (optimizer steps, load_state_dict, copy_) advances; writes through `.data`
        bypass it and need `refresh(force=True)`."""
        key = self._weights_key()
        if not force and key == self._key:
            return False
        base, adapters = (force or new != old for new, old in zip(key, self._key))
        for layer in self.layers:
            layer.refresh(base, adapters)
        self._refresh_ext_args()
        self._key = key
        return True

    def _weights_key(self) -> tuple[tuple, tuple]:
        """What the packed weights were made from, as (base, adapters): every layer
        parameter's identity, storage and version, split into the base model's and the LoRA
        adapters', and (with the adapters') each LoRA wrapper's adapter settings."""
        base, adapters = [], []
        for layer in self.body.layers:
            for name, p in layer.named_parameters():
                # An FSDP shard: its local storage, and both version counters (an in-place op on
                # the DTensor advances its own, one on the local tensor only the local one's).
                t = p.to_local() if hasattr(p, "to_local") else p
                (adapters if lora.is_adapter_parameter(name) else base).append(
                    (id(p), t.data_ptr(), t._version, p._version)
                )
            adapters += [lora.settings(mod) for mod in layer.modules() if lora.is_lora_layer(mod)]
        return tuple(base), tuple(adapters)

    def _refresh_ext_args(self) -> None:
        """The C++ body's weight list and eps values (its kPerLayer order: the norms, then per
        packed matrix its weight, packed copy, bias and unmerged adapters), rebuilt when the
        packed weights are."""
        if self.ext is None:
            return
        weights, eps = [], []
        for w in self.layers:
            qn, kn = w.q_norm or (None, 0.0), w.k_norm or (None, 0.0)
            weights += [w.ln1, qn[0], kn[0], w.ln2]
            for name in _PACKED:
                ad = w.lora[name]
                adapters = [None] * 3 if ad is None else [ad.a, ad.b, ad.scale]
                weights += [w.w[name], w.packed[name], w.b[name], *adapters]
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
        qkv = w.linear("qkv", x)
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        lead = x.shape[:-1]
        q = qkv[..., :nq].view(*lead, self.n_heads, self.head_dim)
        k = qkv[..., nq : nq + nk].view(*lead, self.n_kv, self.head_dim)
        v = qkv[..., nq + nk :].view(*lead, self.n_kv, self.head_dim)
        if w.q_norm is not None:
            q, k = rms_norm(q, *w.q_norm), rms_norm(k, *w.k_norm)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _mlp(self, w: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate, up = w.linear("gate_up", rms_norm(h, w.ln2, w.eps2)).split(w.inter, dim=-1)
        return h + w.linear("down", F.silu(gate) * up)

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
            h = h + w.linear("o", att.transpose(1, 2).reshape(n, P, -1))
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
            return self.ext.decode_body_cpu(
                x.contiguous(),
                cache.k,
                cache.v,
                cache.seqlens,
                self._cos,
                self._sin,
                weights,
                norm,
                eps,
                self.n_heads,
                self.scale,
            )
        n = x.shape[0]
        pos = cache.seqlens[:n]
        slot = pos.long()
        row_idx = torch.arange(n, device=x.device)
        cos, sin = self._cos[slot, None], self._sin[slot, None]  # (n, 1, Dh)
        lengths = pos + 1
        h = x
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, rms_norm(h, w.ln1, w.eps1), cos, sin)
            cache.k[i].index_put_((row_idx, slot), k)
            cache.v[i].index_put_((row_idx, slot), v)
            att = decode_attention(q, cache.k[i, :n], cache.v[i, :n], lengths, self.scale, max_len=max_len)
            h = h + w.linear("o", att.reshape(n, -1))
            h = self._mlp(w, h)
        pos.add_(1)
        return rms_norm(h, self.norm, self.norm_eps)
