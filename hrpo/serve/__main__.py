"""python -m hrpo.serve [--checkpoint DIR | --model NAME_OR_PATH]: an OpenAI-compatible server
(docs/serve.md). Needs the serve extra: pip install -e ".[serve]"."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading

import torch
import uvicorn

from hrpo.core.errors import ConfigError
from hrpo.engine.scheduler import Scheduler
from hrpo.eval import add_latent_arguments
from hrpo.model.loading import cpu_threads, quiet_libraries
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
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16"
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda:N")
    p.add_argument("--verbose", action="store_true", help="third-party warnings, model-loading bars, access logs")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(cpu_threads())
    key = args.api_key or os.environ.get(KEY_ENV) or None
    try:
        check(args)
        with quiet_libraries(args.verbose):
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
    except (ValueError, OSError) as err:  # ConfigError, ModelError, CheckpointError, ...
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}", file=sys.stderr)
        return 2
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
    llm.scheduler.start()
    print(
        f"hrpo.serve: {llm.name} on http://{args.host}:{args.port}/v1 (hybrid "
        f"{f'on ({llm.latent.mode})' if llm.hybrid else 'off'} by default, max batch {args.max_batch}, "
        f"max model len {llm.max_model_len})",
        flush=True,
    )
    # uvicorn re-raises the SIGTERM / SIGINT it handled once it has shut down; these handlers
    # take it, so a stop (refuse new connections, let running requests finish) exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()
    finally:
        llm.scheduler.stop(args.shutdown_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
