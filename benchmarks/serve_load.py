"""A load generator for OpenAI-compatible servers on this machine (127.0.0.1 only).

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 32 --requests 64 --max-tokens 64

`clients` workers each send streamed chat completions one after another (greedy, `max_tokens`
new tokens) until `requests` were sent in all or `seconds` passed. Measured: output tokens/s
(tokens streamed / wall time of the run), time to first token, time between streamed content
chunks (a chunk is one token, or several when a stream fell behind), and request latency, p50
and p99. Tokens are counted from the server's usage when it reports one, else as chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx2 as httpx  # the HTTP client of the openai package (a test dependency)

PROMPTS = [
    "What is 12 plus 30?",
    "Tom has 3 apples and buys 4 more. How many now?",
    "Count from one to ten.",
    "Say something about the sea.",
    "What is 7 times 8?",
    "Name three colours.",
    "Write a short greeting.",
    "What comes after Tuesday?",
]


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    latency: float
    tokens: int


@dataclass
class Result:
    clients: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict:
        tokens = sum(s.tokens for s in self.samples)
        gaps = [g for s in self.samples for g in s.gaps]
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "errors": self.errors,
            "output_tokens": tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
            **{f"ttft_{k}": v for k, v in pcts([s.ttft for s in self.samples]).items()},
            **{f"itl_{k}": v for k, v in pcts(gaps).items()},
            **{f"latency_{k}": v for k, v in pcts([s.latency for s in self.samples]).items()},
        }


def pcts(xs: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) in seconds."""
    if not xs:
        return {"p50": float("nan"), "p99": float("nan")}
    ys = sorted(xs)
    pick = lambda q: ys[min(len(ys) - 1, max(0, int(round(q * len(ys) + 0.5)) - 1))]  # noqa: E731
    return {"p50": round(pick(0.50), 4), "p99": round(pick(0.99), 4)}


async def one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers, extra: dict
) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("no tokens")
    return Sample(
        stamps[0] - start,
        [b - a for a, b in zip(stamps, stamps[1:])],
        end - start,
        usage if usage is not None else len(stamps),
    )


async def run(
    url: str,
    model: str,
    clients: int,
    requests: int,
    seconds: float,
    max_tokens: int,
    api_key: str | None = None,
    extra: dict | None = None,
) -> Result:
    """`requests` streamed chat completions from `clients` workers; `extra`: more request fields."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"serve_load: {url} is not on this machine (127.0.0.1 only)")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = Result(clients, 0.0)
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() - start < seconds:
                i = sent
                sent += 1
                try:
                    result.samples.append(
                        await one(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, headers, extra or {})
                    )
                except (httpx.HTTPError, RuntimeError, json.JSONDecodeError):
                    result.errors += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
        result.wall_s = time.perf_counter() - start
    return result


def launch(cmd: list[str], url: str, env: dict | None = None, log=None, wait_s: float = 180) -> subprocess.Popen:
    """Start a server command and wait until its /health answers."""
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
    )
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before answering /health")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd[:4])}... did not answer /health in {wait_s} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (None: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="requests in all (bounded)")
    p.add_argument("--seconds", type=float, default=120.0, help="no new request after this many seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--api-key")
    p.add_argument("--extra", default="{}", help="more request fields as JSON, e.g. '{\"hybrid\": false}'")
    args = p.parse_args(argv)
    model = args.model or httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    res = asyncio.run(
        run(
            args.url,
            model,
            args.clients,
            args.requests,
            args.seconds,
            args.max_tokens,
            args.api_key,
            json.loads(args.extra),
        )
    )
    print(json.dumps(res.summary()))
    return 0 if not res.errors else 1


if __name__ == "__main__":
    sys.exit(main())
