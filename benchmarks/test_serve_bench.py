"""Serving throughput and latency: `pytest benchmarks/test_serve_bench.py -s`.

Three servers on one model (HRPO_SERVE_BENCH_MODEL, anything --model takes, e.g. smollm2-135m;
default the embedded model), one after another on 127.0.0.1, each driven by
benchmarks/serve_load.py at 1, 8 and 32 concurrent clients (HRPO_SERVE_BENCH_CLIENTS, e.g. 1,2;
streamed chat completions, greedy, MAX_TOKENS new tokens, REQUESTS_PER_CLIENT requests per
client, bounded by SECONDS per level) after one unmeasured round at each level (on a GPU the
engine captures a CUDA graph per batch-size bucket on first use):
- hrpo.serve hybrid (the gate blends thinking inputs; requests ask {"hybrid": true}),
- hrpo.serve plain ({"hybrid": false}: token embeddings only),
- `transformers serve --continuous-batching` on the same model folder (skipped when the
  installed transformers has no `serve` command), with a KV cache sized for this run
  (its default reserves ~9 GB and is killed for memory on a 23 GB machine). It cannot load a
  GGUF file (transformers 5.24 reads no `architectures` from one), so a GGUF model is served to
  it as the folder hrpo's loader dequantises it into (safetensors under HRPO_SERVE_BENCH_OUT):
  the same fp32 weights hrpo.serve decodes.
For scale, the same run first times the engine alone, offline, on the same 32 chat prompts
(one `RolloutEngine.generate` of 32 rows, MAX_TOKENS tokens, greedy, no early stop): what the
batch could give with no server around it on this machine at that moment.
hrpo.serve runs without the paper's system prompt here, so both servers see the same prompt
tokens. Each server gets HRPO_SERVE_BENCH_THREADS threads (default 1). The table (markdown), the raw numbers
(JSON) and a PNG (throughput and p99 request latency against clients) go to
HRPO_SERVE_BENCH_OUT (default benchmarks/serve_out/); the ratios are of the same run. The servers
run on the GPU when there is one (hrpo.serve and transformers serve both default to it; on a GPU
benchmarks/gpu_check.sh's serve phase runs this at Qwen2.5-1.5B shapes).
Not a timed test: nothing is asserted about speed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.serve_load import PROMPTS, launch, run
from hrpo.engine.rollout import SamplingConfig
from hrpo.model.loading import load_base_model, resolve_model
from hrpo.serve import LLM
from hrpo.serve.llm import served_name

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("HRPO_SERVE_BENCH_OUT", ROOT / "benchmarks" / "serve_out"))
CLIENTS = tuple(int(c) for c in os.environ.get("HRPO_SERVE_BENCH_CLIENTS", "1,8,32").split(","))
MAX_TOKENS = int(os.environ.get("HRPO_SERVE_BENCH_TOKENS", 64))
REQUESTS_PER_CLIENT = int(os.environ.get("HRPO_SERVE_BENCH_REQUESTS", 4))
SECONDS = float(os.environ.get("HRPO_SERVE_BENCH_SECONDS", 60))
THREADS = os.environ.get("HRPO_SERVE_BENCH_THREADS", "1")
MODEL = os.environ.get("HRPO_SERVE_BENCH_MODEL")  # None: the embedded model
PORT = 8391
DEVICE = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
MAX_MODEL_LEN = 512  # prompt + completion rows; the embedded model's positions, and room for every request here


def transformers_cli() -> str | None:
    """The `transformers` command beside this Python (the environment's own), else on PATH."""
    beside = Path(sys.executable).with_name("transformers")
    return str(beside) if beside.exists() else shutil.which("transformers")


def model_folder() -> str:
    """MODEL as a model folder transformers serve loads: a GGUF dequantised into OUT once."""
    src = resolve_model(MODEL)
    if not src.gguf_file:
        return src.location
    folder = OUT / f"model-{Path(src.gguf_file).stem}"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_base_model(MODEL, torch.device("cpu"), torch.float32)
        # The weights are dequantised already; what save_pretrained refuses is the GGUF marker
        # left on the model, and what transformers serve needs is the architecture GGUF omits.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def servers() -> dict[str, tuple[list[str], dict]]:
    """name -> (command, extra request fields)."""
    hrpo = [sys.executable, "-m", "hrpo.serve", "--port", str(PORT), "--max-batch", "32", "--system-prompt", "none"]
    hrpo += ["--max-model-len", str(MAX_MODEL_LEN)] + (["--model", MODEL] if MODEL else [])
    out = {"hrpo.serve hybrid": (hrpo, {"hybrid": True}), "hrpo.serve plain": (hrpo, {"hybrid": False})}
    cli = transformers_cli()
    if cli is not None:
        out["transformers serve --continuous-batching"] = (
            [
                cli,
                "serve",
                "--continuous-batching",
                "--cb-num-blocks",
                "256",
                "--cb-block-size",
                "32",
                "--host",
                "127.0.0.1",
                "--port",
                str(PORT),
                "--log-level",
                "warning",
                model_folder(),
            ],
            {},
        )
    return out


def measure(cmd: list[str], extra: dict) -> list[dict]:
    url = f"http://127.0.0.1:{PORT}"
    env = {
        "OMP_NUM_THREADS": THREADS,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with (OUT / "server.log").open("a") as log:
        proc = launch(cmd, url, env, log)
        try:
            rows = []
            model = cmd[-1] if "transformers" in Path(cmd[0]).name else served_name(MODEL)
            for c in CLIENTS:  # warm-up
                asyncio.run(run(url, model, c, c, SECONDS, MAX_TOKENS, extra=extra))
            for c in CLIENTS:
                res = asyncio.run(run(url, model, c, c * REQUESTS_PER_CLIENT, SECONDS, MAX_TOKENS, extra=extra))
                rows.append(res.summary())
            return rows
        finally:
            proc.terminate()
            proc.wait(60)


def offline() -> dict[str, float]:
    """Tokens/s of the engine alone on 32 of the load's prompts (best of 3 rounds), hybrid and
    plain; the model is freed before the servers load theirs."""
    torch.set_num_threads(int(THREADS))
    llm = LLM(model=MODEL, system_prompt=False, max_model_len=MAX_MODEL_LEN)
    prompts = [llm.chat_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(32)]
    engine = llm.scheduler.engine
    engine.eos = torch.tensor([-1], device=engine.eos.device)  # no early stop: 64 tokens a row, as ignore_eos would
    best = {}
    for hybrid in (True, False):
        cfg = SamplingConfig(MAX_TOKENS, 0.5, 50, greedy=True, hybrid=hybrid)
        rounds = [engine.generate(prompts, cfg).stats["tokens_per_s"] for _ in range(3)]
        best[f"engine alone, offline, {'hybrid' if hybrid else 'plain'}"] = max(rounds)
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return best


def table(results: dict[str, list[dict]]) -> str:
    plain = {r["clients"]: r["tokens_per_s"] for r in results.get("hrpo.serve plain", [])}
    head = (
        "| server | clients | requests | output tok/s | vs plain | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
        "| latency p50 / p99 (s) |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, rows in results.items():
        for r in rows:
            ratio = r["tokens_per_s"] / plain[r["clients"]] if plain.get(r["clients"]) else float("nan")
            lines.append(
                f"| {name} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | {ratio:.2f} | "
                f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | {1e3 * r['itl_p50']:.1f} / "
                f"{1e3 * r['itl_p99']:.1f} | {r['latency_p50']:.2f} / {r['latency_p99']:.2f} |"
            )
    return head + "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        xs = [r["clients"] for r in rows]
        a.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        b.plot(xs, [r["latency_p99"] for r in rows], marker="o", label=name)
    for ax, label in ((a, "output tokens / s"), (b, "request latency p99 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(
        f"Serving {Path(MODEL).name if MODEL else 'the embedded model'} on {DEVICE} ({MAX_TOKENS} new tokens, greedy)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(engine: dict[str, float], results: dict[str, list[dict]]) -> str:
    """The JSON, table and chart of what was measured so far (a run cut short keeps its servers)."""
    (OUT / "serve_bench.json").write_text(json.dumps({"engine": engine, "servers": results}, indent=1))
    text = table(results) + "".join(f"\n{name}, 32 rows: {tps:.0f} output tok/s" for name, tps in engine.items()) + "\n"
    (OUT / "serve_bench.md").write_text(text)
    plot(results, OUT / f"serve_{'gpu' if torch.cuda.is_available() else 'cpu'}.png")
    return text


def test_serve_throughput_table():
    pytest.importorskip("fastapi")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    engine = offline()
    for name, (cmd, extra) in servers().items():
        results[name] = measure(cmd, extra)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        text = write(engine, results)
    print(text)
    assert all(r["errors"] == 0 for rows in results.values() for r in rows)
