"""Continuous batching over the rollout engine's pieces, for serving (no HTTP here).

A persistent batch of `max_batch` rows over one static KV cache. Requests join at step
boundaries: the distinct prompts of the requests joining at a step are prefilled (those of
one length together) into the rows after the running ones, and copied to the rows of each request's `n` choices;
a finished, stopped or cancelled row leaves at once (the last live row moves into its place,
so live rows stay rows [0, n) as FastDecoder.decode wants). One step is the engine's own body
(RolloutEngine.decode_step) with per-row settings in device tensors:

    hidden -> sample_and_mix per group of rows sharing (greedy, temperature, top_k, top_p,
              latent mode), each row keyed by its own request's seed and its own Philox
              counter (row id), both on the device: requests that differ only by seed share
              one draw
           -> the cold stop of the rows that asked for one (cold_stop_step, per-row settings)
           -> step_controller (marker matcher, eos), on one-column step buffers
           -> the thinking input of each hybrid row's latent mode (the gate's blend of
              E[token] and h_hat for hrpo, the mode's latent for the others)
           -> FastDecoder.decode over the rows' own cache lengths -> hidden

On the GPU path the step is captured per batch-size bucket (powers of two up to max_batch;
the rows past the live ones are idle) and replayed; the host reads the step's results after
each replay, and rows join and leave between replays (docs/engine.md, "Serving: the
scheduler's captured step").

Why a request's output does not depend on the batch around it: its prompt is prefilled with
the joining prompts of its own length only (no padding: its numbers are those of the prompt
prefilled alone, as the engine prefills a lone request, each row attending to its own tokens,
through GEMMs whose row bits do not depend on the row count on the CPU); its rows
draw the noise the engine gives row j of a lone n-row batch at step t,
u = philox_uniform(seed, (t * n + j) * V + v) (offset 0, row id t * n + j); every other op is
row-wise. (Tokens are what the engine gives the request alone; values agree to rounding, as
between any two batch shapes of the engine.)
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hrpo.model.hybrid import distinct_prompts
from hrpo_kernels import sample_and_mix
from hrpo_kernels._common import next_pow2
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.sample_and_mix import sampling_is_fused
from hrpo_kernels.step_controller import StepBuffers

from .rollout import ColdStop, left_pad
from .rollout_engine import ColdRows, RolloutEngine, StepRows, buffer_rows

# step_controller's own length limit, past any request's: a row's max_tokens is applied here.
_NO_LIMIT = 2**62
# Up to this many distinct sampling settings in the batch, every group samples every row and each
# row keeps its own group's draw (no host branch: a graph holds it); past it, each group samples
# its own rows, gathered on the host, and the step runs eagerly.
GRAPH_GROUPS = 4
MAX_GRAPHS = 64  # captured steps kept (bucket x settings); past it they are dropped and recaptured
# the host's read of a step (one transfer): row-wise token, log-prob, eos, think, gate mean, non-finite
_OUT = ("token", "logprob", "eos", "think", "gate", "bad")


class QueueFull(RuntimeError):
    """The waiting queue holds --max-queue requests; retry later."""


class RequestError(ValueError):
    """A request the scheduler cannot run; `field` names the request field at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class Update:
    """What one step added to one choice: its new token (with log-prob and top
    alternatives) and, when the choice ended, why ("stop" or "length")."""

    choice: int
    token: int
    logprob: float
    top: list[tuple[int, float]] | None
    finish: str | None


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    thinking_tokens: int = 0
    gate_sum: float = 0.0
    gate_steps: int = 0  # thinking steps the gate blended (hrpo mode; the others have no gate)
    finish: str | None = None

    @property
    def gate_mean(self) -> float | None:
        """The mean gate coefficient over thinking steps (None: no thinking step blended)."""
        return self.gate_sum / self.gate_steps if self.gate_steps else None


@dataclass
class Request:
    """One generation: `n` choices from `prompt`. greedy: argmax tokens (temperature, top_k
    and top_p still shape the latent mixture and the log-probs, as in the engine). seed keys the
    sampling noise. hybrid: thinking inputs under `latent` (its mode and numbers), else plain
    tokens. stop(choice, tokens) -> True ends a choice with "stop" after its latest
    token. on_update(request, updates) runs on the scheduler's thread after each step that
    changed the request; `done` is set when every choice ended or the request failed."""

    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 1.0  # the nucleus cut inside the top-k (1: off)
    greedy: bool = True
    seed: int = 0
    hybrid: bool = True
    latent: LatentParams = LatentParams()
    cold_stop: ColdStop | None = None  # Soft Thinking's early end of thinking (hybrid only)
    top_logprobs: int | None = None  # None: no log-probs; k: the chosen token's and k alternatives
    ignore_eos: bool = False  # run to max_tokens past end-of-sequence tokens (load tests)
    stop: Callable[[int, list[int]], bool] | None = None
    on_update: Callable[[Request, list[Update]], None] | None = None
    choices: list[Choice] = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def finished(self) -> bool:
        return self.done.is_set()


@dataclass
class _Row:
    request: Request
    choice: int
    steps: int = 0  # tokens drawn so far


@dataclass(frozen=True)
class _Group:
    """Settings the sampling kernels take as launch arguments, shared by a group of rows
    (with one seed: greedy rows share seed 0, which their tokens do not read)."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    latent: LatentParams


@dataclass
class _Plan:
    """How the batch steps until its rows change: the groups (settings; each row keyed by its
    own request's seed, Scheduler.seeds), whether every row is gated / thinks (a bool) or it differs by row
    (None: the per-row tensors), whether some row cold-stops, the graph key, and each group's
    rows when it gathers them."""

    groups: list[_Group]
    gated: bool | None
    thinks: bool | None
    cold: bool  # some row asked for the cold stop
    key: tuple
    capture: bool
    gather: list[torch.Tensor] | None


def _group_key(q: Request) -> _Group:
    return _Group(q.greedy, q.temperature, q.top_k, q.top_p, q.latent)


def _uniform(flags: list[bool]) -> bool | None:
    """The flag every row shares, or None when they differ."""
    return flags[0] if len(set(flags)) == 1 else None


class Scheduler:
    """The batch and its queue. submit() and cancel() may be called from any thread;
    step() from one thread only (start() runs it on a worker thread of its own)."""

    def __init__(
        self,
        engine: RolloutEngine,
        max_batch: int = 32,
        max_model_len: int = 2048,
        max_queue: int = 256,
        token_budget: int | None = None,
        cuda_graphs: bool = True,
    ):
        if not isinstance(engine, RolloutEngine):
            raise ValueError(f"Scheduler needs the fast engine, got {type(engine).__name__}")
        if max_batch < 1 or max_model_len < 2 or max_queue < 0:
            raise ValueError(
                f"Scheduler: need max_batch >= 1, max_model_len >= 2 and max_queue >= 0, got "
                f"{max_batch}, {max_model_len}, {max_queue}"
            )
        self.engine, self.hm, self.dec = engine, engine.hm, engine.dec
        self.max_batch, self.max_model_len, self.max_queue = max_batch, max_model_len, max_queue
        self.token_budget = token_budget or max_batch * max_model_len
        self.vocab = self.hm.embed.weight.shape[0]
        dev, d = self.dec.device, self.hm.embed.weight.shape[1]
        self.cache = self.dec.new_cache(max_batch, max_model_len)
        self.bufs = StepBuffers.allocate(max_batch, 1, d, dev, engine.opts.latent_dtype, engine.pad_id)
        self.hidden = torch.zeros(max_batch, d, dtype=self.dec.dtype, device=dev)
        self.match = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.hybrid = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.gated = torch.zeros(max_batch, dtype=torch.bool, device=dev)  # hybrid rows in hrpo mode
        # the cold stop per row: counter, threshold (-inf: off) and steps, and this step's entropy
        self.cold = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.cold_tau = torch.full((max_batch,), float("-inf"), device=dev)
        self.cold_k = torch.ones(max_batch, dtype=torch.int64, device=dev)
        self.entropy = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.zero = torch.zeros(1, dtype=torch.int64, device=dev)
        # each row's noise: row id steps * width + choice (width: its request's n), its request's seed
        self.steps, self.width, self.choice, self.pick, self.seeds = (
            torch.zeros(max_batch, dtype=torch.int64, device=dev) for _ in range(5)
        )
        self.live = torch.zeros(1, dtype=torch.int64, device=dev)  # rows in use; a bucket's others are idle
        self.out = torch.zeros(len(_OUT), max_batch, dtype=torch.float64, device=dev)
        # The step is captured per batch-size bucket on the GPU path (CUDA, or the CPU's stand-in).
        self.graphs_on = cuda_graphs and engine.graphs
        self.graphs: dict[tuple, object] = {}
        self.plan: _Plan | None = None  # None: the rows changed since the last step
        self.rows: list[_Row] = []  # row i of the batch
        self.lengths: list[int] = []  # its cache length (host copy of cache.seqlens)
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.dec.refresh()
        self.stats = dict(
            requests=0, failed=0, cancelled=0, prompt_tokens=0, generated_tokens=0, steps=0, prefills=0, captures=0
        )
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ submitting
    def check(self, req: Request) -> None:
        """RequestError naming the field when the batch cannot run `req`."""
        if not req.prompt:
            raise RequestError("prompt", "the prompt is empty")
        bad = [t for t in req.prompt if not 0 <= t < self.vocab]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        if len(req.prompt) >= self.max_model_len:
            raise RequestError(
                "messages",
                f"the prompt has {len(req.prompt)} tokens; --max-model-len "
                f"{self.max_model_len} leaves no room for a completion",
            )
        room = self.max_model_len - len(req.prompt)
        if not 1 <= req.max_tokens <= room:
            raise RequestError(
                "max_tokens",
                f"max_tokens must be in [1, {room}] (the context of "
                f"{self.max_model_len} less the prompt's {len(req.prompt)} tokens), "
                f"got {req.max_tokens}",
            )
        if not 1 <= req.n <= self.max_batch:
            raise RequestError("n", f"n must be in [1, {self.max_batch}] (--max-batch), got {req.n}")
        if not 0 <= req.top_k <= self.vocab:
            raise RequestError(
                "top_k", f"top_k must be in [0, {self.vocab}] (0: the whole vocabulary), got {req.top_k}"
            )
        if not req.temperature > 0:
            raise RequestError("temperature", f"temperature must be > 0, got {req.temperature}")
        if req.cold_stop is not None and (not req.hybrid or req.latent.mode == "gumbel-soft"):
            raise RequestError("cold_stop", "the cold stop needs hybrid decoding in a mode other than gumbel-soft")
        if not 0 < req.top_p <= 1:
            raise RequestError("top_p", f"top_p must be in (0, 1] (1: no nucleus), got {req.top_p}")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise RequestError("top_logprobs", f"top_logprobs must be in [0, 20], got {req.top_logprobs}")
        if self._cost(req) > self.token_budget:
            raise RequestError(
                "max_tokens",
                f"n * (prompt + max_tokens) = {self._cost(req)} tokens is over the token budget of {self.token_budget}",
            )

    def submit(self, req: Request) -> Request:
        """Queue `req` (checked first); QueueFull when --max-queue requests already wait."""
        self.check(req)
        with self.lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            req.choices = [Choice() for _ in range(req.n)]
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop `req`: its rows leave the batch at the next step boundary."""
        with self.lock:
            req.cancelled = True
            self.lock.notify_all()

    def cancel_all(self) -> None:
        """Cancel every running and waiting request (a shutdown past its grace period)."""
        with self.lock:
            for req in list(self.waiting) + [r.request for r in self.rows]:
                req.cancelled = True
            self.lock.notify_all()

    @staticmethod
    def _cost(req: Request) -> int:
        return req.n * (len(req.prompt) + req.max_tokens)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # ------------------------------------------------------------------ the worker thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hrpo-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Take no new requests, let running and queued ones finish for up to `timeout`
        seconds, then cancel what is left and stop the thread."""
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        self.cancel_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.busy():
                    if self._stopping:
                        return
                    self.lock.wait()
            self.step()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> None:
        """Admit what fits, drop cancelled rows, decode one token for every row."""
        try:
            self._drop_cancelled()
            self._admit()
            if self.rows:
                self._decode()
        except Exception as err:  # a fault of the batch: fail what runs, keep serving
            traceback.print_exc(file=sys.stderr)  # for the operator; clients get one line
            for req in {id(r.request): r.request for r in self.rows}.values():
                self._fail(req, f"generation failed: {type(err).__name__}")
            self.rows, self.lengths = [], []

    def _drop_cancelled(self) -> None:
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for req in gone:
                self.waiting.remove(req)
        for req in gone:
            self._fail(req, "cancelled", "cancelled")
        drop = [i for i, r in enumerate(self.rows) if r.request.cancelled]
        if drop:
            for req in {id(self.rows[i].request): self.rows[i].request for i in drop}.values():
                self._fail(req, "cancelled", "cancelled")
            self._remove(drop)

    def _admit(self) -> None:
        in_use = sum(self._cost(r.request) for r in self.rows if r.choice == 0)
        joining, rows = [], len(self.rows)
        with self.lock:
            while self.waiting:
                req = self.waiting[0]
                if rows + req.n > self.max_batch or in_use + self._cost(req) > self.token_budget:
                    break  # first come, first served: later requests wait behind it
                self.waiting.popleft()
                joining.append(req)
                rows, in_use = rows + req.n, in_use + self._cost(req)
        if joining:
            self._prefill(joining)
            self.stats["prefills"] += 1

    def _prefill(self, reqs: list[Request]) -> None:
        """The joining requests' distinct prompts through the body into the rows after the
        running ones, those of one length together (unpadded: a prompt's numbers are those of
        the same prompt prefilled alone, as the engine prefills a lone request); then each
        request's rows, one per choice, copied from its prompt's."""
        n0, dev = len(self.rows), self.dec.device
        prompts = [r.prompt for r in reqs for _ in range(r.n)]
        rep, inverse = distinct_prompts(*left_pad(prompts, self.engine.pad_id))
        rep = rep.tolist()
        order = sorted(range(len(rep)), key=lambda i: len(prompts[rep[i]]))  # prefilled shortest first
        place = torch.empty(len(rep), dtype=torch.long)  # distinct prompt -> its prefilled row
        place[order] = torch.arange(len(rep))
        hs, first = [], 0
        for length, group in itertools.groupby(order, key=lambda i: len(prompts[rep[i]])):
            ids = torch.tensor([prompts[rep[i]] for i in group], device=dev)
            lens = torch.full((len(ids),), length, device=dev)
            hs.append(self.dec.prefill(F.embedding(ids, self.hm.embed.weight), lens, self.cache.rows_from(n0 + first)))
            first += len(ids)
        src = place[inverse]
        copies = not torch.equal(src, torch.arange(len(prompts)))  # choices share a prompt, or lengths reordered
        src = src.to(dev)
        h = torch.cat(hs)[src]
        if copies:
            self.cache.rows_from(n0).gather_rows(src, max(len(p) for p in prompts))
        m = len(prompts)
        self.hidden[n0 : n0 + m] = h
        self.match[n0 : n0 + m] = 0
        self.finished[n0 : n0 + m] = False
        self.hybrid[n0 : n0 + m] = torch.tensor([r.hybrid for r in reqs for _ in range(r.n)], device=dev)
        self.gated[n0 : n0 + m] = torch.tensor(
            [r.hybrid and r.latent.mode == "hrpo" for r in reqs for _ in range(r.n)], device=dev
        )
        self.steps[n0 : n0 + m] = 0
        self.seeds[n0 : n0 + m] = torch.tensor([r.seed for r in reqs for _ in range(r.n)], device=dev)
        self.width[n0 : n0 + m] = torch.tensor([r.n for r in reqs for _ in range(r.n)], device=dev)
        self.choice[n0 : n0 + m] = torch.tensor([j for r in reqs for j in range(r.n)], device=dev)
        cold = [r.cold_stop for r in reqs for _ in range(r.n)]
        self.cold[n0 : n0 + m] = 0
        self.cold_tau[n0 : n0 + m] = torch.tensor([c.entropy if c else -math.inf for c in cold], device=dev)
        self.cold_k[n0 : n0 + m] = torch.tensor([c.steps if c else 1 for c in cold], device=dev)
        self.plan = None
        self.rows += [_Row(r, j) for r in reqs for j in range(r.n)]
        self.lengths += [len(p) for p in prompts]
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in reqs)
        bad = (~torch.isfinite(h).all(-1)).nonzero().squeeze(-1).tolist()
        if bad:
            for req in {id(self.rows[n0 + i].request): self.rows[n0 + i].request for i in bad}.values():
                self._fail(req, "the model produced non-finite values for this prompt")
            self._remove([i for i, r in enumerate(self.rows) if r.request.error])

    def _make_plan(self, n: int) -> _Plan:
        """The groups of rows [0, n) (each row's group and the live count written to the device)
        and whether this batch's step can be captured."""
        index: dict[_Group, int] = {}
        picks = [index.setdefault(_group_key(r.request), len(index)) for r in self.rows]
        dev = self.dec.device
        self.pick[:n] = torch.tensor(picks, device=dev)
        self.live.fill_(n)
        groups = list(index)
        gated = _uniform([r.request.hybrid and r.request.latent.mode == "hrpo" for r in self.rows])
        thinks = _uniform([r.request.hybrid for r in self.rows])
        cold = any(r.request.cold_stop for r in self.rows)
        gather = None
        if len(groups) > GRAPH_GROUPS:
            gather = [torch.tensor([i for i, p in enumerate(picks) if p == g], device=dev) for g in range(len(groups))]
        fused = all(sampling_is_fused(self.hidden, self.hm.lm_weight, g.top_k, g.latent, g.top_p) for g in groups)
        capture = self.graphs_on and fused and gather is None
        return _Plan(groups, gated, thinks, cold, (tuple(groups), gated, thinks, cold), capture, gather)

    def _top(self, n: int) -> dict[int, list[tuple[int, float]]]:
        """The top alternatives (token, log-prob at the row's temperature) of the rows that asked."""
        want = [i for i, r in enumerate(self.rows) if r.request.top_logprobs]
        if not want:
            return {}
        at = torch.tensor(want, device=self.dec.device)
        temps = torch.tensor([self.rows[i].request.temperature for i in want], device=self.dec.device)
        logits = self.hidden[at].float() @ self.hm.lm_weight.float().T
        lp = torch.log_softmax(logits / temps[:, None], dim=-1)
        k = max(self.rows[i].request.top_logprobs for i in want)
        vals, ids = lp.topk(k, dim=-1)
        return {
            i: list(
                zip(
                    ids[j, : self.rows[i].request.top_logprobs].tolist(),
                    vals[j, : self.rows[i].request.top_logprobs].tolist(),
                )
            )
            for j, i in enumerate(want)
        }

    def _decode(self) -> None:
        n = len(self.rows)
        top = self._top(n)  # read from the hidden states before the step, outside any graph
        if self.plan is None:
            self.plan = self._make_plan(n)
        plan = self.plan
        if not plan.capture:
            self._step(n, plan, max(self.lengths) + 1)
        else:
            bucket = min(next_pow2(n), self.max_batch)
            key = (bucket, *plan.key)
            graph = self.graphs.get(key)
            if graph is not None:
                graph.replay()
            else:
                self._step(bucket, plan, None)  # a real step, which also compiles this shape's kernels
                if len(self.graphs) >= MAX_GRAPHS:
                    self.graphs.clear()
                self.graphs[key] = self.engine._capture(lambda: self._step(bucket, plan, None))
                self.stats["captures"] += 1
        self.stats["steps"] += 1
        self._record(n, dict(zip(_OUT, self.out[:, :n].tolist())), top)

    def _step(self, b: int, plan: _Plan, max_len: int | None) -> None:
        """One step of rows [0, b): the engine's decode_step with each row's settings, its
        results written to self.out; no host sync. Captured, b is the batch-size bucket and the
        rows past self.live are its idle rows: they decode from slot 0 of a free cache row, and
        nobody reads them."""
        hidden = self.hidden[:b]
        bad = ~torch.isfinite(hidden).all(-1)
        hidden.masked_fill_(bad[:, None], 0.0)  # such a row fails on the host; its draw stays harmless
        if plan.capture:
            idle = torch.arange(b, device=hidden.device) >= self.live
            self.cache.seqlens[:b].masked_fill_(idle, 0)
        self.finished[:b] = False  # rows past an eos they ignore decode on
        self.t.zero_()  # one-column buffers: every step writes column 0
        row_ids = self.steps[:b] * self.width[:b] + self.choice[:b]
        rows = StepRows(
            hidden,
            self.match[:b],
            self.finished[:b],
            buffer_rows(self.bufs, b),
            self.t,
            self.cache,
            self.gated[:b] if plan.gated is None else plan.gated,
            self.hybrid[:b] if plan.thinks is None else None,
            ColdRows(self.cold_tau[:b], self.cold_k[:b], self.cold[:b], self.entropy[:b]) if plan.cold else None,
        )
        track = plan.thinks is not False
        tok, lp, think, a = self.engine.decode_step(
            rows, lambda h: self._sample(h, plan, row_ids, rows.cold), _NO_LIMIT, track, max_len
        )
        self.steps[:b] += 1
        gate = a.mean(-1) if a is not None else torch.zeros_like(lp)
        for i, x in enumerate((tok, lp, self.finished[:b], think, gate, bad)):
            self.out[i, :b] = x

    def _sample(self, hidden: torch.Tensor, plan: _Plan, row_ids: torch.Tensor, cold: ColdRows | None):
        """Tokens, log-probs and latents of the rows: each group's draw for its rows, each row
        keyed by its own Philox counter (row id) under its own request's seed; with the cold stop on,
        each row's mixture entropy written to cold.entropy (gumbel-soft's groups, which may not
        cold-stop and whose pass has no entropy of p, leave theirs)."""
        n = hidden.shape[0]

        def draw(g: int, at: torch.Tensor | None):
            grp, h, ids, seeds = plan.groups[g], hidden, row_ids, self.seeds[:n]
            if at is not None:
                h, ids, seeds = hidden[at], row_ids[at], seeds[at]
            ent = None
            if cold is not None and grp.latent.mode != "gumbel-soft":
                alone = len(plan.groups) == 1  # the one group writes straight into the rows' buffer
                ent = cold.entropy if alone else torch.empty(n if at is None else len(at), device=hidden.device)
            out = sample_and_mix(
                h,
                self.hm.lm_weight,
                self.hm.embed.weight,
                grp.temperature,
                grp.top_k,
                grp.greedy,
                None,
                seed=seeds,
                offset=self.zero,
                row_ids=ids,
                impl=self.engine.impl,
                latent=grp.latent,
                top_p=grp.top_p,
                entropy=ent,
            )
            if ent is None or ent is cold.entropy:
                return out
            if at is None:  # a row keeps its own group's entropy
                cold.entropy.copy_(torch.where(self.pick[:n] == g, ent, cold.entropy))
            else:
                cold.entropy[at] = ent
            return out

        if len(plan.groups) == 1:
            return draw(0, None)
        if plan.gather is None:  # every group draws every row; a row keeps its own group's
            tok, lp, h = draw(0, None)
            pick = self.pick[:n]
            for g in range(1, len(plan.groups)):
                t_, l_, h_ = draw(g, None)
                mine = pick == g
                tok, lp, h = torch.where(mine, t_, tok), torch.where(mine, l_, lp), torch.where(mine[:, None], h_, h)
            return tok, lp, h
        tok = torch.empty(n, dtype=torch.int64, device=hidden.device)
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        h = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for g, at in enumerate(plan.gather):
            t_, l_, h_ = draw(g, at)
            tok[at], lp[at], h[at] = t_, l_, h_.float()
        return tok, lp, h

    def _record(self, n: int, out: dict[str, list[float]], top) -> None:
        """Append each row's token, end the rows that finished, and tell each request."""
        toks, lps, gates = [int(x) for x in out["token"]], out["logprob"], out["gate"]
        updates: dict[int, tuple[Request, list[Update]]] = {}
        ended, failed = [], []
        for i, r in enumerate(self.rows):
            req, c = r.request, r.request.choices[r.choice]
            if out["bad"][i] or not math.isfinite(lps[i]):
                failed.append(req)
                continue
            r.steps += 1
            self.lengths[i] += 1
            c.tokens.append(toks[i])
            c.logprobs.append(lps[i])
            if top:
                c.top.append(top.get(i, []))
            if out["think"][i]:
                c.thinking_tokens += 1
            if out["think"][i] and req.hybrid and req.latent.mode == "hrpo":
                c.gate_sum += gates[i]
                c.gate_steps += 1
            if (out["eos"][i] and not req.ignore_eos) or (req.stop is not None and req.stop(r.choice, c.tokens)):
                c.finish = "stop"
            elif r.steps >= req.max_tokens:
                c.finish = "length"
            if c.finish:
                ended.append(i)
            updates.setdefault(req.id, (req, []))[1].append(
                Update(r.choice, toks[i], lps[i], top.get(i) if top else None, c.finish)
            )
        self.stats["generated_tokens"] += n - len(failed)
        for req in {id(q): q for q in failed}.values():
            self._fail(req, "the model produced non-finite logits")
        for req, ups in updates.values():
            if req.error is None and all(c.finish for c in req.choices):
                req.done.set()  # before the update: a consumer woken by it sees the request done
            if req.error is None and req.on_update is not None:
                req.on_update(req, ups)
        self._remove(sorted(set(ended) | {i for i, r in enumerate(self.rows) if r.request.error}))

    # ------------------------------------------------------------------ leaving the batch
    def _remove(self, drop: list[int]) -> None:
        """Rows `drop` leave; the last live rows move into their places."""
        if not drop:
            return
        gone = set(drop)
        keep_n = len(self.rows) - len(gone)
        holes = [i for i in drop if i < keep_n]
        movers = [i for i in range(keep_n, len(self.rows)) if i not in gone]
        if holes:
            dst = torch.tensor(holes, device=self.dec.device)
            src = torch.tensor(movers, device=self.dec.device)
            upto = max(self.lengths[i] for i in movers)
            self.cache.k[:, dst, :upto] = self.cache.k[:, src, :upto]
            self.cache.v[:, dst, :upto] = self.cache.v[:, src, :upto]
            cold = (self.cold, self.cold_tau, self.cold_k)
            for x in (self.cache.seqlens, self.hidden, self.match, self.hybrid, self.gated, *cold):
                x[dst] = x[src]
            for x in (self.steps, self.width, self.choice, self.seeds):
                x[dst] = x[src]
            self.finished[dst] = False
            for d_, s_ in zip(holes, movers):
                self.rows[d_], self.lengths[d_] = self.rows[s_], self.lengths[s_]
        del self.rows[keep_n:], self.lengths[keep_n:]
        self.plan = None

    def _fail(self, req: Request, message: str, counter: str = "failed") -> None:
        """End `req` with an error (its on_update hears of it with no updates)."""
        if req.done.is_set():
            return
        req.error = message
        self.stats[counter] += 1
        req.done.set()
        if req.on_update is not None:
            req.on_update(req, [])
