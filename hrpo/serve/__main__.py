"""python -m hrpo.serve [--checkpoint DIR | --model NAME_OR_PATH]: an OpenAI-compatible server
(docs/serve.md). Needs the serve extra: pip install -e ".[serve]"."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading

import uvicorn

from hrpo.core.errors import ConfigError
from hrpo.core.program import add_runtime_arguments, run_program
from hrpo.core.signals import handled_elsewhere
from hrpo.engine.scheduler import Scheduler
from hrpo.eval import add_latent_arguments
from hrpo.serve.app import build_app
from hrpo.serve.llm import GREEDY_TEMPERATURE, LLM, TOP_K
from hrpo.training.config import HelpFormatter

KEY_ENV = "HRPO_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hrpo.serve",
        formatter_class=HelpFormatter,
        description="Serve a base model or an HRPO checkpoint with the OpenAI API "
        "(continuously batched on the rollout engine).",
    )
    p.add_argument("--checkpoint", help="an HRPO checkpoint folder or a finished training run's folder")
    p.add_argument(
        "--model", help="base model (hub name, folder, .gguf); None: the checkpoint's base, else the embedded model"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback wants --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${KEY_ENV})"
    )
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (the static KV cache's rows)")
    p.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + completion tokens per row; None: the model's positions, at most 2048",
    )
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for room; past it: 503 + Retry-After")
    p.add_argument(
        "--token-budget",
        type=int,
        help="n * (prompt + max_tokens) summed over running requests; None: max-batch * max-model-len",
    )
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body accepted (413 past it)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: seconds running requests may finish before they are cancelled",
    )
    p.add_argument(
        "--system-prompt",
        choices=("paper", "none"),
        help="the paper's system prompt before chats that give none; None: as the checkpoint was trained "
        "(the base model: paper)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=GREEDY_TEMPERATURE,
        help="of the latent mixture and the log-probs under greedy decoding (requests without temperature)",
    )
    p.add_argument("--top-k", type=int, default=TOP_K, help="default top_k of requests (0: the whole vocabulary)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="default top_p of requests: the nucleus inside the top-k (1: off)"
    )
    add_latent_arguments(p)  # hybrid requests' default; a request's latent_mode / latent_options replace it
    add_runtime_arguments(p, verbose_also=", and each request in the access log")
    return p


def check(args) -> None:
    for name in ("max_batch", "max_model_len", "max_request_bytes", "token_budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise ConfigError(f"--max-queue must be >= 0 and --port in [0, 65535], got {args.max_queue} and {args.port}")
    if not args.shutdown_timeout >= 0 or not args.temperature > 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--shutdown-timeout must be >= 0, --temperature > 0, --top-k >= 0 and --top-p in (0, 1]")


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown cancels what still runs just before its grace period
    ends, so each open stream ends with an error event and [DONE] rather than a cut connection."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace: float):
        super().__init__(config)
        self.scheduler, self.grace = scheduler, grace

    async def shutdown(self, sockets=None) -> None:
        timer = threading.Timer(max(self.grace - 0.5, 0.0), self.scheduler.cancel_all)
        timer.daemon = True
        timer.start()
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(args) -> int:
    """Load the policy, then serve until SIGTERM or Ctrl-C (exit 0 once the server has shut down)."""
    check(args)
    llm = LLM(
        args.checkpoint,
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        max_queue=args.max_queue,
        token_budget=args.token_budget,
        system_prompt=None if args.system_prompt is None else args.system_prompt == "paper",
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        latent=args,
    )
    key = args.api_key or os.environ.get(KEY_ENV) or None
    if key is None and not loopback(args.host):
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches it may use it "
            f"(--api-key or ${KEY_ENV})",
            file=sys.stderr,
        )
    app = build_app(llm, key, args.max_request_bytes)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
        access_log=args.verbose,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = Server(config, llm.scheduler, args.shutdown_timeout)
    print(
        f"hrpo.serve: {llm.name} on http://{args.host}:{args.port}/v1 (hybrid "
        f"{f'on ({llm.latent.mode})' if llm.hybrid else 'off'} by default, max batch {args.max_batch}, "
        f"max model len {llm.max_model_len})",
        flush=True,
    )
    llm.scheduler.start()
    try:
        with handled_elsewhere():  # uvicorn stops on SIGTERM / SIGINT: refuse new connections, finish what runs
            server.run()
    finally:
        llm.scheduler.stop(args.shutdown_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_program(parser(), serve, argv)


if __name__ == "__main__":
    sys.exit(main())
