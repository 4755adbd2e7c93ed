"""The OpenAI-compatible HTTP app (FastAPI) over a served LLM whose scheduler runs on its own
worker thread: the event loop only parses, queues and streams, never computes.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Errors are OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, with no stack trace or path. Extension fields: request `top_k`,
`hybrid` (false: plain tokens, true: latent thinking inputs), `latent_mode` (one of
hrpo_kernels.latent_input.MODES; implies hybrid), `latent_options` (that mode's numbers:
temperature, top_p, beta, noise_std, gumbel_tau), `cold_stop` ({"entropy": nats, "steps": k}:
Soft Thinking's cold stop, hrpo.engine.rollout.ColdStop; hybrid only) and `ignore_eos`,
response per choice `hrpo`:
{"thinking_tokens", "gate_mean", "latent_mode"}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hrpo.engine.rollout import ColdStop
from hrpo.engine.scheduler import QueueFull, Request, RequestError, Update
from hrpo.serve.llm import LLM
from hrpo.serve.metrics import Metrics
from hrpo_kernels.latent_input import MODES

COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "hybrid",
    "latent_mode",
    "latent_options",
    "cold_stop",
    "ignore_eos",
    "logprobs",
}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt"}
ROLES = ("system", "user", "assistant")
LATENT_OPTIONS = ("temperature", "top_p", "beta", "noise_std", "gumbel_tau")  # LatentParams' numbers


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 503: "overloaded"}.get(status)
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status, headers=headers
    )


# ---------------------------------------------------------------------------- request fields
def _int(body: dict, name: str, lo: int, hi: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be an integer {bound}, got {json.dumps(value)}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}], got {json.dumps(value)}", name)
    return float(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: the text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise ApiError(
                400,
                f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}",
                f"messages[{i}]",
            )
        out.append({"role": m["role"], "content": content})
    return out


def _latent(body: dict, hybrid: bool | None) -> tuple[str | None, dict]:
    """The request's latent_mode and latent_options, checked for shape (LatentParams checks
    the values when the request is built)."""
    mode = body.get("latent_mode")
    if mode is not None and mode not in MODES:
        raise ApiError(400, f"latent_mode must be one of {', '.join(MODES)}, got {json.dumps(mode)}", "latent_mode")
    if mode is not None and hybrid is False:
        raise ApiError(400, "latent_mode needs hybrid decoding, and hybrid is false", "latent_mode")
    options = body.get("latent_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "latent_options must be an object", "latent_options")
    for name, value in options.items():
        if name not in LATENT_OPTIONS:
            raise ApiError(
                400, f"latent_options: unknown option {name!r} (one of {', '.join(LATENT_OPTIONS)})", "latent_options"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            if not (name == "temperature" and value is None):  # None: the sampler's temperature
                raise ApiError(
                    400, f"latent_options.{name} must be a number, got {json.dumps(value)}", "latent_options"
                )
    return mode, options


def _cold_stop(body: dict, hybrid: bool | None) -> ColdStop | None:
    """The request's cold_stop object, {"entropy": nats > 0, "steps": int >= 1}, or None."""
    spec = body.get("cold_stop")
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"entropy", "steps"}:
        raise ApiError(400, 'cold_stop must be an object {"entropy": number, "steps": integer}', "cold_stop")
    if hybrid is False:
        raise ApiError(400, "cold_stop ends thinking, and hybrid is false", "cold_stop")
    tau = spec["entropy"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ApiError(400, f"cold_stop.entropy must be a number, got {json.dumps(tau)}", "cold_stop")
    try:
        return ColdStop(float(tau), spec["steps"])
    except ValueError as err:
        raise ApiError(400, str(err), "cold_stop") from None


def _top_p(body: dict) -> float | None:
    """The request's nucleus, in (0, 1]; None: the server's."""
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ApiError(400, f"top_p must be a number in (0, 1], got {json.dumps(top_p)}", "top_p")
    return None if top_p is None else float(top_p)


class Parsed:
    """A checked request body: the scheduler request's settings and the response's."""

    def __init__(self, body: dict, chat: bool, llm: LLM):
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0])
        model = body.get("model")
        if model is not None and model != llm.name:
            raise ApiError(404, f"model {model!r} is not served here (this server serves {llm.name!r})", "model")
        self.chat, self.stream = chat, bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        self.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        if chat:
            self.prompt = llm.chat_prompt(_messages(body))
            logprobs = body.get("logprobs")
            if logprobs is not None and not isinstance(logprobs, bool):
                raise ApiError(400, "logprobs must be true or false", "logprobs")
            self.top_logprobs = _int(body, "top_logprobs", 0, 20, 0) if logprobs else None
            if body.get("top_logprobs") is not None and not logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
            self.max_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "prompt must be a non-empty string", "prompt")
            self.prompt = llm.text_prompt(prompt)
            self.top_logprobs = _int(body, "logprobs", 0, 5)
            max_tokens = _int(body, "max_tokens", 1, default=16)  # OpenAI's default for completions
            self.max_field = "max_tokens"
        hybrid = body.get("hybrid")
        if hybrid is not None and not isinstance(hybrid, bool):
            raise ApiError(400, "hybrid must be true or false", "hybrid")
        latent_mode, latent_options = _latent(body, hybrid)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos must be true or false", "ignore_eos")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise ApiError(400, "user must be a string", "user")
        self.stops = _stops(body)
        self.n = _int(body, "n", 1, llm.scheduler.max_batch, 1)
        self.settings = dict(
            max_tokens=max_tokens,
            n=self.n,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_k=_int(body, "top_k", 0),
            top_p=_top_p(body),
            seed=_int(body, "seed", 0, 2**63 - 1),
            hybrid=hybrid,
            latent_mode=latent_mode,
            latent_options=latent_options,
            cold_stop=_cold_stop(body, hybrid),
            stop=self.stops,
            top_logprobs=self.top_logprobs,
            ignore_eos=ignore_eos,
        )


# ---------------------------------------------------------------------------- the app
class Guard:
    """Who may call, and how much they may send: the API key on every path but /health
    (compared in constant time) and the declared body size. A plain ASGI middleware, not
    FastAPI's @middleware("http"), which would pass every streamed chunk through its own
    memory stream."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app, self.expected, self.limit = app, f"Bearer {api_key}".encode() if api_key else None, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if (
            self.expected is not None
            and scope["path"] != "/health"
            and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
        ):
            reply = error_response(
                401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error"
            )
            return await reply(scope, receive, send)
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            reply = error_response(413, f"the request body is over {self.limit} bytes (--max-request-bytes)")
            return await reply(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(llm: LLM, api_key: str | None = None, max_request_bytes: int = 1 << 20) -> FastAPI:
    """The app; the caller starts llm.scheduler's thread (and stops it at shutdown)."""
    app = FastAPI(title="hrpo.serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(llm.scheduler)
    app.state.llm, app.state.metrics = llm, metrics

    app.add_middleware(Guard, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        return error_response(500, "internal error", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": llm.name, "object": "model", "created": 0, "owned_by": "hrpo"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await answer(request, True, llm, metrics, max_request_bytes)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await answer(request, False, llm, metrics, max_request_bytes)

    return app


async def answer(request: HttpRequest, chat: bool, llm: LLM, metrics: Metrics, max_request_bytes: int):
    """A completion request: checked, queued on the scheduler, answered whole or streamed."""
    parsed = Parsed(await _read_json(request, max_request_bytes), chat, llm)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def on_update(req: Request, updates: list[Update]) -> None:  # on the scheduler's thread
        loop.call_soon_threadsafe(events.put_nowait, (time.perf_counter(), updates))

    try:
        built = llm.request(parsed.prompt, on_update=on_update, **parsed.settings)
    except ValueError as err:  # LatentParams refused a latent option's value
        raise ApiError(400, f"latent_options: {err}", "latent_options") from None
    try:
        req = llm.scheduler.submit(built)
    except RequestError as err:
        field = (
            parsed.max_field
            if err.field == "max_tokens"
            else ("prompt" if not chat and err.field == "messages" else err.field)
        )
        raise ApiError(400, str(err), field) from None
    except QueueFull as err:
        metrics.rejected += 1
        raise ApiError(503, f"server busy: {err}", kind="server_error", headers={"Retry-After": "1"}) from None
    reply = _Reply(llm, parsed, req, metrics.start(len(parsed.prompt)))
    if parsed.stream:
        return StreamingResponse(reply.stream(events, request), media_type="text/event-stream")
    return await reply.whole(events, request)


async def _read_json(request: HttpRequest, limit: int) -> dict:
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (--max-request-bytes)")
    try:
        body = json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({getattr(err, 'msg', 'not UTF-8')})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class _Reply:
    """One request's answer: the whole response, or its server-sent event stream."""

    def __init__(self, llm: LLM, parsed: Parsed, req: Request, track):
        self.llm, self.parsed, self.req, self.track = llm, parsed, req, track
        self.id = f"{'chatcmpl' if parsed.chat else 'cmpl'}-{req.id}"
        self.created = int(time.time())
        self.kind = "chat.completion" if parsed.chat else "text_completion"

    def _usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.req.choices)
        return {
            "prompt_tokens": len(self.parsed.prompt),
            "completion_tokens": completion,
            "total_tokens": len(self.parsed.prompt) + completion,
        }

    def _hrpo(self, j: int) -> dict:
        c = self.req.choices[j]
        mode = self.req.latent.mode if self.req.hybrid else None
        return {"thinking_tokens": c.thinking_tokens, "gate_mean": c.gate_mean, "latent_mode": mode}

    def _logprobs(self, tokens: list[int], lps: list[float], tops: list) -> dict:
        tok = self.llm.tokenizer
        text = [tok.decode([t]) for t in tokens]
        if self.parsed.chat:
            return {
                "content": [
                    {
                        "token": s,
                        "logprob": _finite(lp),
                        "bytes": list(s.encode()),
                        "top_logprobs": [
                            {"token": tok.decode([a]), "logprob": _finite(b), "bytes": list(tok.decode([a]).encode())}
                            for a, b in top
                        ],
                    }
                    for s, lp, top in zip(text, lps, tops or [[]] * len(tokens))
                ]
            }
        return {
            "tokens": text,
            "token_logprobs": [_finite(x) for x in lps],
            "top_logprobs": [{tok.decode([a]): _finite(b) for a, b in top} for top in (tops or [[]] * len(tokens))],
        }

    def _choice(self, j: int) -> dict:
        c = self.req.choices[j]
        text = self.llm.visible(c.tokens, self.parsed.stops, True)
        lp = self._logprobs(c.tokens, c.logprobs, c.top) if self.parsed.top_logprobs is not None else None
        body = {"message": {"role": "assistant", "content": text}} if self.parsed.chat else {"text": text}
        return {"index": j, **body, "logprobs": lp, "finish_reason": c.finish, "hrpo": self._hrpo(j)}

    async def _next(self, events: asyncio.Queue, request: HttpRequest):
        """The next step's updates; a client gone raises ConnectionAbortedError (a stream
        learns it from its next send instead: see stream())."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ConnectionAbortedError from None

    @staticmethod
    async def _pending(events: asyncio.Queue) -> tuple[float, list[Update]]:
        """Every step's updates queued so far (at least one step's): a stream that fell
        behind the batch catches up in one chunk per choice."""
        t, updates = await events.get()
        while not events.empty():
            t, more = events.get_nowait()
            updates = updates + more
        return t, updates

    def _failed(self) -> None:
        err = self.req.error
        if err is not None:
            self.track.finish("failed")
            raise ApiError(500, err, kind="server_error")

    async def whole(self, events: asyncio.Queue, request: HttpRequest) -> dict:
        try:
            while not self.req.finished:
                t, updates = await self._next(events, request)
                self.track.tokens(t, len(updates))
        except ConnectionAbortedError:
            self.llm.scheduler.cancel(self.req)
            self.track.finish("cancelled")
            raise ApiError(499, "client disconnected") from None
        self._failed()
        self.track.finish("ok", self._usage()["completion_tokens"])
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.llm.name,
            "choices": [self._choice(j) for j in range(self.parsed.n)],
            "usage": self._usage(),
        }

    def _chunk(self, j: int, text: str, finish: str | None, lp: dict | None = None) -> str:
        if self.parsed.chat:
            choice = {"index": j, "delta": {"content": text}, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": j, "text": text, "logprobs": lp, "finish_reason": finish}
        if finish is not None:
            choice["hrpo"] = self._hrpo(j)
        body = {
            "id": self.id,
            "object": f"{self.kind}.chunk" if self.parsed.chat else self.kind,
            "created": self.created,
            "model": self.llm.name,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, events: asyncio.Queue, request: HttpRequest) -> AsyncIterator[str]:
        sent = [""] * self.parsed.n
        done_tokens = [0] * self.parsed.n
        ended = [False] * self.parsed.n
        try:
            if self.parsed.chat:
                for j in range(self.parsed.n):
                    yield self._chunk(j, "", None).replace(
                        '"delta": {"content": ""}', '"delta": {"role": "assistant", "content": ""}'
                    )
            while not all(ended):
                if self.req.error is not None:
                    break
                t, updates = await self._pending(events)
                self.track.tokens(t, len(updates))
                for j in sorted({u.choice for u in updates}):
                    c = self.req.choices[j]
                    final = c.finish is not None
                    text = self.llm.visible(c.tokens, self.parsed.stops, final)
                    delta, sent[j] = text[len(sent[j]) :], text
                    lp = None
                    if self.parsed.top_logprobs is not None:
                        lp = self._logprobs(
                            c.tokens[done_tokens[j] :], c.logprobs[done_tokens[j] :], c.top[done_tokens[j] :]
                        )
                    done_tokens[j] = len(c.tokens)
                    if delta or final or lp is not None:
                        yield self._chunk(j, delta, c.finish, lp)
                    ended[j] = final
            if self.req.error is not None:
                self.track.finish("failed")
                err = {"error": {"message": self.req.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
            else:
                self.track.finish("ok", self._usage()["completion_tokens"])
                if self.parsed.include_usage:
                    body = {
                        "id": self.id,
                        "object": f"{self.kind}.chunk" if self.parsed.chat else self.kind,
                        "created": self.created,
                        "model": self.llm.name,
                        "choices": [],
                        "usage": self._usage(),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        except (ConnectionAbortedError, asyncio.CancelledError, GeneratorExit):
            self.llm.scheduler.cancel(self.req)  # the client left (or the server stops): free its rows
            self.track.finish("cancelled")
            raise


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0
