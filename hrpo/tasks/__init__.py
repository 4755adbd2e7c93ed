"""Benchmarks and training tasks, one module per family: gsm8k (and the embedded arith),
math (math, math500), choice (mmlu, mmlu-stem, arc-c), qa (rag-qa and the retrieval-QA
benchmarks). Each module keeps a benchmark's loader, prompt, answer reading and metric
together and registers its Task here."""

from __future__ import annotations

from hrpo.tasks.base import PROTOCOLS, Task
from hrpo.tasks.registry import get_task, load_examples, load_task, task_names, user_messages

__all__ = ["PROTOCOLS", "Task", "get_task", "load_examples", "load_task", "task_names", "user_messages"]
