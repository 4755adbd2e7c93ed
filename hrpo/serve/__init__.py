"""Serve a base model or an HRPO checkpoint: `python -m hrpo.serve` (an OpenAI-compatible HTTP
server, app.py, FastAPI + uvicorn from the `serve` extra) and the Python API below (no HTTP):

    from hrpo.serve import LLM, generate
    generate(["What is 2 + 3?"], checkpoint="runs/gsm8k/checkpoint", max_tokens=64)

Both run the engine's continuous-batching scheduler (hrpo/engine/scheduler.py). docs/serve.md
has the endpoints, the extension fields and the flags."""

from hrpo.serve.llm import LLM, Completion, generate

__all__ = ["LLM", "Completion", "generate"]
