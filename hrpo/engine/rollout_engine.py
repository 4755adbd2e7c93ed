"""The rollout engine: hybrid (or plain) sampling over a static KV cache, built for speed.

It computes what the reference loop (hrpo/engine/rollout.py) computes; under the same `seed` it
draws the same tokens. One decode step is

    hidden -> sample_and_mix (lm-head, top-k / full vocabulary, race, log-prob, h_hat)
           -> cold_stop_step (with a ColdStop: the entropy counters, forced marker tokens)
           -> step_controller (marker matcher, finish flags, rollout buffers)
           -> gated_blend of E[token] and h_hat (hybrid) or E[token] (plain)
           -> FastDecoder.decode (our own model body over the static cache) -> hidden

with no host synchronisation on CUDA, so the whole step is captured once per batch size in
a CUDA graph and replayed. The host reads the live-row count every `check_every` steps (a
few extra steps past the last finish are harmless no-ops), and when the live fraction
falls to `compact_below` it moves the live rows to the front and continues with a smaller
batch (and graph). Rows keep their Philox noise through compaction (row_ids), so neither
prefix sharing nor compaction changes a rollout.

The stored latent is h_hat rounded to `latent_dtype` (bf16 by default), and the gate is
fed that rounded latent, so the training forward, which re-blends the stored latent,
reproduces the rollout's inputs exactly.

Under HRPO_GPU_PATH=cpu (hrpo_kernels/_common.py) a CPU model runs this GPU path (the torch
decoder body and the fused kernels, seeded noise, graphs through a StandInGraph) rather
than the CPU's C++ step, so that CI runs it.

`make_engine` returns the reference loop behind the same interface, with a one-line
warning, for a model FastDecoder cannot run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.fast_decoder import FastDecoder, unsupported_reason
from hrpo.engine.kv_cache import StaticKVCache
from hrpo.engine.rollout import Rollout, SamplingConfig, cold_stop_step, left_pad, rollout, thinking_input
from hrpo.model.hybrid import HybridModel, distinct_prompts
from hrpo_kernels import sample_and_mix, step_controller
from hrpo_kernels._common import StandInGraph, next_pow2, on_gpu_path
from hrpo_kernels._ext import load_extension
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.sample_and_mix import sampling_is_fused
from hrpo_kernels.step_controller import StepBuffers


@dataclass
class EngineOptions:
    share_prefix: bool = True  # prefill each distinct prompt once
    compact_below: float = 0.5  # compact when live rows <= this fraction of the running batch (0: never)
    check_every: int | None = None  # steps between host checks (None: 16 with CUDA graphs, else 1)
    cuda_graphs: bool = True  # capture the decode step on CUDA
    latent_dtype: torch.dtype = torch.bfloat16
    cpu_kernels: bool = True  # fp32 CPU model: the step in the extension's C++ twins (False: torch ops)


@dataclass
class ColdRows:
    """The cold stop's per-row state for a decode step (rollout.cold_stop_step): the threshold and
    the count of steps (scalars, or one per row), each row's counter (updated in place) and the
    entropy buffer the step's sampling fills."""

    threshold: float | torch.Tensor
    steps: int | torch.Tensor
    count: torch.Tensor
    entropy: torch.Tensor


@dataclass
class StepRows:
    """The rows a decode step runs (views of a batch's buffers, updated in place) and their
    per-row latent settings: gated, whether a row's thinking input is the gate's blend (hrpo)
    or the mode's latent itself, one bool for all rows or a bool tensor per row; thinks, the
    rows that may think (None: all of them); cold, the cold stop's state (None: off)."""

    hidden: torch.Tensor
    match: torch.Tensor
    finished: torch.Tensor
    bufs: StepBuffers
    t: torch.Tensor
    cache: StaticKVCache
    gated: bool | torch.Tensor
    thinks: torch.Tensor | None = None
    cold: ColdRows | None = None


_GATED, _DIRECT = LatentParams("hrpo"), LatentParams("soft")  # a latent fed through the gate / as it is


def thinking_inputs(hm: HybridModel, e, latent, think, gated: bool | torch.Tensor, impl):
    """thinking_input with the latent mode per row: `gated` a bool for every row, or a bool
    tensor (both blends computed, each row taking its own: no host branch)."""
    if isinstance(gated, bool):
        return thinking_input(hm, e, latent, think, _GATED if gated else _DIRECT, impl=impl)
    e, a = thinking_input(hm, e, latent, think & gated, _GATED, impl=impl)
    e, _ = thinking_input(hm, e, latent, think & ~gated, _DIRECT, impl=impl)
    return e, a


def buffer_rows(bufs: StepBuffers, n: int) -> StepBuffers:
    """The step buffers of rows [0, n) (their live count shared)."""
    return StepBuffers(*(x[:n] for x in bufs.tensors()[:-1]), n_live=bufs.n_live)


class _State:
    """Every buffer of a rollout, allocated for (batch, columns, cache slots) and reused by
    later calls that fit, so that captured graphs stay valid."""

    def __init__(self, dec: FastDecoder, batch: int, cols: int, slots: int, d: int, latent_dtype, pad_id: int):
        dev = dec.device
        self.batch, self.cols, self.slots = batch, cols, slots
        self.cache = dec.new_cache(batch, slots)
        self.bufs = StepBuffers.allocate(batch, cols, d, dev, latent_dtype, pad_id)
        self.hidden = torch.zeros(batch, d, dtype=dec.dtype, device=dev)
        self.match = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.order = torch.zeros(batch, dtype=torch.int64, device=dev)  # original row of each row
        self.gate_sum = torch.zeros(batch, dtype=torch.float32, device=dev)
        self.gate_n = torch.zeros(batch, dtype=torch.float32, device=dev)
        self.cold = torch.zeros(batch, dtype=torch.int64, device=dev)  # the cold stop's counters
        self.entropy = torch.zeros(batch, dtype=torch.float32, device=dev)  # this step's, for the cold stop
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | StandInGraph] = {}

    def fits(self, batch: int, cols: int, slots: int) -> bool:
        return self.batch >= batch and self.cols >= cols and self.slots >= slots

    def reset(self, B: int, pad_id: int, first: int = 0) -> None:
        b = self.bufs
        b.tokens[:B].fill_(pad_id)
        for x in (b.logprobs, b.think, b.mask):
            x[:B].zero_()
        for x in (self.match, self.finished, self.gate_sum, self.gate_n, self.cold, self.t, self.offset):
            x.zero_()
        torch.arange(first, first + B, out=self.order[:B])  # each row's row in the whole batch: its noise

    def permute(self, n: int, perm: torch.Tensor, n_new: int, upto: int) -> None:
        """Rows [0, n) reordered by perm; only the first n_new keep decoding (cache slots
        [0, upto) moved for those). Rows past n_new keep their finished records."""
        b = self.bufs
        for x in (
            b.tokens,
            b.logprobs,
            b.think,
            b.mask,
            b.latents,
            self.hidden,
            self.match,
            self.finished,
            self.order,
            self.gate_sum,
            self.gate_n,
            self.cold,
        ):
            x[:n] = x[:n][perm]
        self.cache.gather_rows(perm[:n_new], upto)


class RolloutEngine:
    def __init__(
        self, hm: HybridModel, matcher: MarkerMatcher, eos_ids, pad_id: int, options: EngineOptions | None = None
    ):
        self.hm = hm
        self.opts = options or EngineOptions()
        dev = hm.embed.weight.device
        self.gpu_path = on_gpu_path(dev)  # CUDA, or the CPU under HRPO_GPU_PATH=cpu
        # the GPU path decodes in torch ops and the kernels, never in the CPU's C++ body
        self.dec = FastDecoder(hm.causal_lm, cpu_body=self.opts.cpu_kernels and not self.gpu_path)
        self.pad_id = int(pad_id)
        self.table = matcher.table.to(dev).contiguous()
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_ids)) or [-1], dtype=torch.int64, device=dev)
        self.marker_ids = torch.tensor(matcher.marker_ids, dtype=torch.int64, device=dev)
        self.graphs = self.gpu_path and self.opts.cuda_graphs and load_extension() is not None
        if self.gpu_path and self.opts.cuda_graphs and not self.graphs:
            warnings.warn(
                "hrpo engine: the CUDA extension did not load, so the step controller syncs with the "
                "host and CUDA graphs are off",
                stacklevel=2,
            )
        self.check_every = self.opts.check_every or (16 if self.graphs else 1)
        # On a CPU model with the extension loaded (fp32 or bf16), the step runs in its C++ twins
        # (decoder body, top-k sampling, step controller; the gate too in fp32) rather than in
        # ~300 small torch ops.
        self.impl = "ext" if self.dec.ext is not None else None
        self.state: _State | None = None
        self.last_stats: dict = {}
        self._warned_eager = False

    # ------------------------------------------------------------------ one decode step
    def decode_step(self, rows: StepRows, sample, max_new_tokens: int, track_think: bool, max_len: int | None):
        """One decode step of `rows`, the body the engine's rollouts and the serving scheduler
        share: sample(hidden) -> (tokens, log-probs, h_hat), the step controller (marker
        matcher, finish flags, step buffers; thinking tracked when track_think), the thinking
        inputs of each row's latent mode, the decoder body. No host sync on the GPU path, so a
        graph can hold it. Returns (tokens, log-probs, think, gate coefficients a or None)."""
        tok, lp, h = sample(rows.hidden)
        forced = None
        if rows.cold is not None:
            c = rows.cold
            thinking = ~rows.finished & (rows.match != self.table.shape[0] - 1)
            if rows.thinks is not None:
                thinking &= rows.thinks
            tok, lp, forced = cold_stop_step(
                c.threshold, c.steps, c.count, c.entropy, thinking, tok, lp, self.marker_ids
            )
        latent = h.to(self.opts.latent_dtype)
        tokens, think, _ = step_controller(
            self.table,
            rows.match,
            rows.finished,
            tok,
            lp,
            h,
            self.eos,
            self.pad_id,
            rows.t,
            max_new_tokens,
            rows.bufs,
            track_think,
            impl=self.impl,
        )
        if rows.thinks is not None:
            think = think & rows.thinks
        if forced is not None:  # a forced marker token is fed (and recorded) as a plain token
            think = think & ~forced
            col = (rows.t - 1).clamp(0, rows.bufs.think.shape[1] - 1)  # the column just written
            rec = rows.bufs.think
            rec.index_copy_(1, col, rec.index_select(1, col) & ~forced[:, None])
        e = F.embedding(tokens, self.hm.embed.weight)
        a = None
        if track_think:
            e, a = thinking_inputs(self.hm, e, latent, think, rows.gated, self.impl)
        rows.hidden[:] = self.dec.decode(e, rows.cache, max_len)
        return tokens, lp, think, a

    def _step(self, n: int, B: int, cfg: SamplingConfig, generator, seeded: bool, max_len: int | None) -> None:
        s, hm = self.state, self.hm
        W = hm.lm_weight
        noise = dict(seed=s.seed, offset=s.offset, row_ids=s.order[:n]) if seeded else {}
        cs = cfg.cold_stop
        cold = ColdRows(cs.entropy, cs.steps, s.cold[:n], s.entropy[:n]) if cs else None

        def sample(hidden):
            return sample_and_mix(
                hidden,
                W,
                hm.embed.weight,
                cfg.temperature,
                cfg.top_k,
                cfg.greedy,
                generator,
                **noise,
                impl=self.impl,
                latent=cfg.latent,
                top_p=cfg.top_p,
                entropy=cold.entropy if cold else None,
            )

        rows = StepRows(
            s.hidden[:n],
            s.match[:n],
            s.finished[:n],
            buffer_rows(s.bufs, n),
            s.t,
            s.cache,
            cfg.latent.mode == "hrpo",
            cold=cold,
        )
        _, _, think, a = self.decode_step(rows, sample, cfg.max_new_tokens, cfg.hybrid, max_len)
        s.offset.add_(B * W.shape[0])  # the next step's noise (only sampling reads the offset)
        if a is not None:
            s.gate_sum[:n] += torch.where(think, a.mean(-1), 0.0)
            s.gate_n[:n] += think

    def _capturable(self, cfg: SamplingConfig) -> bool:
        """Whether this rollout's step can go into a CUDA graph: graphs on, and sampling on the
        fused kernels (full-vocabulary sampling past the kernel's widths runs the reference,
        which syncs with the host), else one warning and eager steps."""
        if not self.graphs:
            return False
        if sampling_is_fused(self.state.hidden, self.hm.lm_weight, cfg.top_k, cfg.latent, cfg.top_p):
            return True
        if not self._warned_eager:
            self._warned_eager = True
            warnings.warn(
                f"hrpo engine: top_k={cfg.top_k} top_p={cfg.top_p} sampling at d={self.state.hidden.shape[1]} in "
                f"{self.hm.lm_weight.dtype} runs the reference sampler, which syncs with the host; "
                "CUDA graphs are off for such rollouts",
                stacklevel=3,
            )
        return False

    def _run(self, n: int, steps: int, B: int, cfg: SamplingConfig, generator, seeded: bool, host_len: int) -> None:
        if not self._capturable(cfg):
            trim = not self.gpu_path  # CPU attention scans only the slots in use; the kernels skip the rest
            for i in range(steps):
                self._step(n, B, cfg, generator, seeded, host_len + i + 1 if trim else None)
            return
        key = (
            n,
            B,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            cfg.greedy,
            cfg.hybrid,
            cfg.latent,
            cfg.cold_stop,
            seeded,
        )
        graph = self.state.graphs.get(key)
        if graph is None:
            self._step(n, B, cfg, generator, seeded, None)  # a real step that also compiles this shape's kernels
            steps -= 1
            t0 = time.perf_counter()
            graph = self._capture(lambda: self._step(n, B, cfg, generator, seeded, None))
            self.state.graphs[key] = graph
            self.last_stats["graph_captures"] += 1
            self.last_stats["capture_s"] += time.perf_counter() - t0
        for _ in range(steps):
            graph.replay()

    def _capture(self, step) -> torch.cuda.CUDAGraph | StandInGraph:
        """A CUDA graph of `step`: recorded here, run by each replay() (on the CPU's GPU path,
        its stand-in). The serving scheduler captures through it too. Run `step` once eagerly
        first: capture records, it does not run."""
        if self.dec.device.type == "cpu":
            return StandInGraph(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    # ------------------------------------------------------------------ a rollout
    # long: checks, prefill and chunked decode share one persistent state; a split is the engine owner's (issue 15)
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        row_span: tuple[int, int] | None = None,
    ) -> Rollout:
        """Roll out every prompt once (repeat a prompt G times for a group). seed: the Philox
        noise of hrpo_kernels (tokens reproducible across batch layouts); without it the
        noise comes from `generator` (on CUDA and in the CPU C++ path: one seed drawn from it
        per call). row_span=(first, total): these prompts are rows first.. of a batch of `total`
        (a rank's share): they draw that batch's noise, so the tokens are the whole batch's."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("engine.generate: every prompt needs at least one token")
        V = self.hm.embed.weight.shape[0]
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= V:
                bad = min(p) if min(p) < 0 else max(p)
                raise ValueError(f"engine.generate: prompt {i} holds token id {bad}, outside the vocabulary [0, {V})")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"engine.generate: max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        dec, hm = self.dec, self.hm
        dev = dec.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        t_start = time.perf_counter()
        stats = self.last_stats = dict(
            prefill_s=0.0, decode_s=0.0, steps=0, host_checks=0, compactions=0, graph_captures=0, capture_s=0.0
        )
        stats["cpu_ext"] = int(self.impl == "ext")
        stats["repacked"] = int(dec.refresh())  # LoRA merged from the adapters as they are now
        B, T = len(prompts), cfg.max_new_tokens
        lens = [len(p) for p in prompts]
        P = max(lens)
        slots = P + T + self.check_every + 1  # room for the steps run past the last finish
        d = hm.embed.weight.shape[1]
        if self.state is None or not self.state.fits(B, T, slots):
            self.state = None  # free the old buffers (and graphs) before allocating
            self.state = _State(dec, B, T, slots, d, self.opts.latent_dtype, self.pad_id)
        s = self.state
        first, total = row_span or (0, B)
        s.reset(B, self.pad_id, first)
        seeded = seed is not None or self.gpu_path or self.impl == "ext"
        if seeded:
            if seed is None:
                seed = int(
                    torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu")
                )
            s.seed.fill_(int(seed))

        # Prefill: distinct prompts once, right-padded (the cache holds each row from slot 0).
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)  # the Rollout's too
        if self.opts.share_prefix:
            rep, inverse = distinct_prompts(prompt_ids, prompt_mask)
            distinct, inverse = [prompts[r] for r in rep.tolist()], inverse.to(dev)
        else:
            distinct, inverse = prompts, None
        ids = torch.full((len(distinct), P), self.pad_id, dtype=torch.long)
        for i, p in enumerate(distinct):
            ids[i, : len(p)] = torch.tensor(p)
        dlens = torch.tensor([len(p) for p in distinct], device=dev)
        hidden = dec.prefill(F.embedding(ids.to(dev), hm.embed.weight), dlens, s.cache)
        if inverse is not None and len(distinct) < B:
            s.cache.gather_rows(inverse, P)
            hidden = hidden[inverse]
        s.hidden[:B] = hidden
        sync()
        stats["prefill_s"] = time.perf_counter() - t_start

        # Decode in chunks of check_every steps; compact between chunks.
        n, done = B, 0
        while done < T:
            steps = min(self.check_every, T - done)
            self._run(n, steps, total, cfg, generator, seeded, P + done)
            done += steps
            stats["steps"] += steps
            stats["host_checks"] += 1
            live = ~s.finished[:n]
            n_live = int(live.sum())
            if n_live == 0:
                break
            n_new = min(n, next_pow2(n_live))  # few sizes, hence few graphs; the same with and without
            if self.opts.compact_below > 0 and n_live <= self.opts.compact_below * n and n_new < n:
                perm = torch.cat([live.nonzero().squeeze(-1), (~live).nonzero().squeeze(-1)])
                s.permute(n, perm, n_new, P + done + 1)
                n = n_new
                stats["compactions"] += 1
        sync()
        stats["decode_s"] = time.perf_counter() - t_start - stats["prefill_s"]
        out = self._collect(prompt_ids, prompt_mask, B)
        if seeded:
            out.noise_seed, out.noise_rows, out.noise_total = (
                int(seed),
                torch.arange(first, first + B, device=dev),
                total,
            )
        return _with_throughput(out, stats, t_start)

    def _collect(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, B: int) -> Rollout:
        """The rollout in the callers' row order, trimmed to the longest completion, with
        log-probs and latents of positions past a row's end zeroed."""
        s = self.state
        back = torch.argsort(s.order[:B])
        mask = s.bufs.mask[:B][back]
        width = max(int(mask.sum(1).max()), 1)
        mask = mask[:, :width]
        b = s.bufs
        gate_n = s.gate_n[:B][back]
        return Rollout(
            prompt_ids=prompt_ids.to(mask.device),
            prompt_mask=prompt_mask.to(mask.device),
            completion_ids=b.tokens[:B][back, :width],
            completion_mask=mask,
            latents=b.latents[:B][back, :width].masked_fill(~mask[..., None], 0.0),
            think_mask=b.think[:B][back, :width],
            logprobs=b.logprobs[:B][back, :width].masked_fill(~mask, 0.0),
            gate_mean=torch.where(gate_n > 0, s.gate_sum[:B][back] / gate_n.clamp_min(1), float("nan")),
        )


class ReferenceEngine:
    """The reference loop behind the engine's interface (for models FastDecoder cannot run)."""

    def __init__(
        self, hm: HybridModel, matcher: MarkerMatcher, eos_ids, pad_id: int, options: EngineOptions | None = None
    ):
        self.hm, self.matcher, self.eos_ids, self.pad_id = hm, matcher, list(eos_ids), int(pad_id)
        self.opts = options or EngineOptions()
        self.last_stats: dict = {}

    def generate(self, prompts, cfg: SamplingConfig, generator=None, seed=None, row_span=None) -> Rollout:
        t0 = time.perf_counter()
        out = rollout(
            self.hm,
            prompts,
            cfg,
            self.matcher,
            self.eos_ids,
            self.pad_id,
            generator,
            latent_dtype=self.opts.latent_dtype,
            seed=seed,
            share_prefix=self.opts.share_prefix,
            compact_below=self.opts.compact_below,
            row_span=row_span,
        )
        self.last_stats = {}
        return _with_throughput(out, self.last_stats, t0)


def _with_throughput(out: Rollout, stats: dict, t_start: float) -> Rollout:
    """out with `stats` (updated in place) attached: new tokens, total seconds, tokens/s."""
    stats["new_tokens"] = int(out.completion_mask.sum())
    stats["total_s"] = time.perf_counter() - t_start
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["total_s"], 1e-9)
    out.stats = stats
    return out


def make_engine(
    hm: HybridModel,
    matcher: MarkerMatcher,
    eos_ids,
    pad_id: int,
    options: EngineOptions | None = None,
    kind: str = "fast",
):
    """kind "fast": the engine when FastDecoder runs this model, else the reference loop with
    a one-line warning (never a silently different computation); "reference": the loop."""
    if kind not in ("fast", "reference"):
        raise ValueError(f"engine must be 'fast' or 'reference', got {kind!r}")
    why = unsupported_reason(hm.causal_lm) if kind == "fast" else None
    if kind == "fast" and why is None:
        return RolloutEngine(hm, matcher, eos_ids, pad_id, options)
    if why:
        warnings.warn(f"hrpo engine: cannot run this model fast ({why}); rollouts use the reference loop", stacklevel=2)
    return ReferenceEngine(hm, matcher, eos_ids, pad_id, options)
