"""Continuous batching over the rollout engine's pieces, for serving (no HTTP here).

A persistent batch of `max_batch` rows over one static KV cache. Requests join at step
boundaries: the distinct prompts of the requests joining at a step are prefilled together
into the rows after the running ones, and copied to the rows of each request's `n` choices;
a finished, stopped or cancelled row leaves at once (the last live row moves into its place,
so live rows stay rows [0, n) as FastDecoder.decode wants). One step is the engine's step
(rollout_engine.py `_step`) with per-row settings:

    hidden -> sample_and_mix, once per group of rows sharing (greedy, temperature, top_k, top_p,
              seed, latent mode), each row keyed by its own Philox counter
           -> step_controller (marker matcher, eos), on one-column step buffers
           -> the thinking input of each hybrid row's latent mode (thinking_input: the gate's
              blend of E[token] and h_hat for hrpo, the mode's latent for the others)
           -> FastDecoder.decode over the rows' own cache lengths -> hidden

Why a request's output does not depend on the batch around it: its prompt is prefilled as the
engine prefills a batch (right-padded, each row attending to its own tokens only); its rows
draw the noise the engine gives row j of a lone n-row batch at step t,
u = philox_uniform(seed, (t * n + j) * V + v) (offset 0, row id t * n + j); every other op is
row-wise. (Tokens are what the engine gives the request alone; values agree to rounding, as
between any two batch shapes of the engine.) The host reads each step's tokens (streaming
needs them), so the step is not captured in a CUDA graph here.
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
from hrpo_kernels import sample_and_mix, step_controller
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.step_controller import StepBuffers

from .rollout import left_pad, thinking_input
from .rollout_engine import RolloutEngine

# step_controller's own length limit, past any request's: a row's max_tokens is applied here.
_NO_LIMIT = 2**62


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
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.zero = torch.zeros(1, dtype=torch.int64, device=dev)
        self.rows: list[_Row] = []  # row i of the batch
        self.lengths: list[int] = []  # its cache length (host copy of cache.seqlens)
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.dec.refresh()
        self.stats = dict(requests=0, failed=0, cancelled=0, prompt_tokens=0, generated_tokens=0, steps=0, prefills=0)
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
        """The joining requests' distinct prompts through the body together, right-padded (as
        the engine prefills a batch), into the rows after the running ones; then each request's
        rows, one per choice, copied from its prompt's."""
        n0, dev = len(self.rows), self.dec.device
        prompts = [r.prompt for r in reqs for _ in range(r.n)]
        rep, inverse = distinct_prompts(*left_pad(prompts, self.engine.pad_id))
        rep = rep.tolist()
        P = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(rep), P), self.engine.pad_id, dtype=torch.long)
        for i, row in enumerate(rep):
            ids[i, : len(prompts[row])] = torch.tensor(prompts[row])
        lens = torch.tensor([len(prompts[row]) for row in rep], device=dev)
        tail = self.cache.rows_from(n0)
        h = self.dec.prefill(F.embedding(ids.to(dev), self.hm.embed.weight), lens, tail)
        m = len(prompts)
        if len(rep) < m:
            src = inverse.to(dev)
            tail.gather_rows(src, P)
            h = h[src]
        self.hidden[n0 : n0 + m] = h
        self.match[n0 : n0 + m] = 0
        self.finished[n0 : n0 + m] = False
        self.hybrid[n0 : n0 + m] = torch.tensor([r.hybrid for r in reqs for _ in range(r.n)], device=dev)
        self.gated[n0 : n0 + m] = torch.tensor(
            [r.hybrid and r.latent.mode == "hrpo" for r in reqs for _ in range(r.n)], device=dev
        )
        self.rows += [_Row(r, j) for r in reqs for j in range(r.n)]
        self.lengths += [len(p) for p in prompts]
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in reqs)
        bad = (~torch.isfinite(h).all(-1)).nonzero().squeeze(-1).tolist()
        if bad:
            for req in {id(self.rows[n0 + i].request): self.rows[n0 + i].request for i in bad}.values():
                self._fail(req, "the model produced non-finite values for this prompt")
            self._remove([i for i, r in enumerate(self.rows) if r.request.error])

    def _sample(self, n: int):
        """Tokens, log-probs and latents (n,), (n,), (n, d) of rows [0, n): one
        sample_and_mix per group of rows with the same settings, each row's noise its own."""
        W, E, dev = self.hm.lm_weight, self.hm.embed.weight, self.dec.device
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.rows):
            q = r.request
            key = (q.greedy, q.temperature, q.top_k, q.top_p, 0 if q.greedy else q.seed, q.latent)
            groups.setdefault(key, []).append(i)
        row_ids = torch.tensor([r.steps * r.request.n + r.choice for r in self.rows], device=dev)
        if len(groups) == 1:
            (greedy, temp, k, top_p, seed, latent), _ = next(iter(groups.items()))
            return sample_and_mix(
                self.hidden[:n],
                W,
                E,
                temp,
                k,
                greedy,
                None,
                seed=self._seed(seed),
                offset=self.zero,
                row_ids=row_ids,
                impl=self.engine.impl,
                latent=latent,
                top_p=top_p,
            )
        tok = torch.empty(n, dtype=torch.int64, device=dev)
        lp = torch.empty(n, dtype=torch.float32, device=dev)
        h = torch.empty(n, E.shape[1], dtype=torch.float32, device=dev)
        for (greedy, temp, k, top_p, seed, latent), idx in groups.items():
            at = torch.tensor(idx, device=dev)
            t_, l_, h_ = sample_and_mix(
                self.hidden[at],
                W,
                E,
                temp,
                k,
                greedy,
                None,
                seed=self._seed(seed),
                offset=self.zero,
                row_ids=row_ids[at],
                impl=self.engine.impl,
                latent=latent,
                top_p=top_p,
            )
            tok[at], lp[at], h[at] = t_, l_, h_.float()
        return tok, lp, h

    def _seed(self, seed: int) -> torch.Tensor:
        return torch.full((1,), seed, dtype=torch.int64, device=self.dec.device)

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
        n, impl = len(self.rows), self.engine.impl
        bad = (~torch.isfinite(self.hidden[:n]).all(-1)).nonzero().squeeze(-1).tolist()
        if bad:
            for req in {id(self.rows[i].request): self.rows[i].request for i in bad}.values():
                self._fail(req, "the model produced non-finite logits")
            self._remove([i for i, r in enumerate(self.rows) if r.request.error])
            n = len(self.rows)
            if not n:
                return
        top = self._top(n)
        tok, lp, h = self._sample(n)
        self.finished[:n] = False  # rows past an eos they ignore decode on
        self.t.zero_()  # one-column buffers: every step writes column 0
        bufs = StepBuffers(*(x[:n] for x in self.bufs.tensors()[:-1]), n_live=self.bufs.n_live)
        tokens, think, _ = step_controller(
            self.engine.table,
            self.match[:n],
            self.finished[:n],
            tok,
            lp,
            h,
            self.engine.eos,
            self.engine.pad_id,
            self.t,
            _NO_LIMIT,
            bufs,
            True,
            impl=impl,
        )
        think = think & self.hybrid[:n]
        e, a_mean = self._inputs(n, tokens, h, think)
        self.hidden[:n] = self.dec.decode(e, self.cache, max(self.lengths) + 1)
        self.stats["steps"] += 1
        self._record(n, tokens, lp, think, a_mean, top)

    def _inputs(self, n: int, tokens, h, think):
        """The next inputs of rows [0, n) and the gate's mean coefficient per row (None: no row
        gated): E[token], and at thinking positions each row's mode's input (thinking_input,
        as the engine), once for the gated rows and once for the rest, whose latent is the input."""
        e = F.embedding(tokens, self.hm.embed.weight)
        latent, a_mean = h.to(self.engine.opts.latent_dtype), None
        gated = think & self.gated[:n]
        if bool(gated.any()):
            e, a = thinking_input(self.hm, e, latent, gated, LatentParams("hrpo"), impl=self.engine.impl)
            a_mean = a.mean(-1)
        direct = think & ~self.gated[:n]
        if bool(direct.any()):
            e, _ = thinking_input(self.hm, e, latent, direct, LatentParams("soft"), impl=self.engine.impl)
        return e, a_mean

    def _record(self, n: int, tokens, lp, think, a_mean, top) -> None:
        """Append each row's token, end the rows that finished, and tell each request."""
        toks, lps, eos, thinks = tokens.tolist(), lp.tolist(), self.finished[:n].tolist(), think.tolist()
        gated = self.gated[:n].tolist()
        gates = a_mean.tolist() if a_mean is not None else [0.0] * n
        updates: dict[int, tuple[Request, list[Update]]] = {}
        ended, failed = [], []
        for i, r in enumerate(self.rows):
            req, c = r.request, r.request.choices[r.choice]
            if not math.isfinite(lps[i]):
                failed.append(req)
                continue
            r.steps += 1
            self.lengths[i] += 1
            c.tokens.append(toks[i])
            c.logprobs.append(lps[i])
            if top:
                c.top.append(top.get(i, []))
            if thinks[i]:
                c.thinking_tokens += 1
            if thinks[i] and gated[i]:
                c.gate_sum += gates[i]
                c.gate_steps += 1
            if (eos[i] and not req.ignore_eos) or (req.stop is not None and req.stop(r.choice, c.tokens)):
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
            for x in (self.cache.seqlens, self.hidden, self.match, self.hybrid, self.gated):
                x[dst] = x[src]
            self.finished[dst] = False
            for d_, s_ in zip(holes, movers):
                self.rows[d_], self.lengths[d_] = self.rows[s_], self.lengths[s_]
        del self.rows[keep_n:], self.lengths[keep_n:]

    def _fail(self, req: Request, message: str, counter: str = "failed") -> None:
        """End `req` with an error (its on_update hears of it with no updates)."""
        if req.done.is_set():
            return
        req.error = message
        self.stats[counter] += 1
        req.done.set()
        if req.on_update is not None:
            req.on_update(req, [])
