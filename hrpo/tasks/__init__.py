"""Benchmarks and training tasks, one module per family: gsm8k (and the embedded arith),
math (math, math500), choice (mmlu, mmlu-stem, arc-c), qa (rag-qa and the retrieval-QA
benchmarks). Each module keeps a benchmark's loader, prompt, answer reading and metric
together and registers its Task here."""
from __future__ import annotations

from . import arith, choice, gsm8k, math, qa  # noqa: F401  (each registers its tasks)
from .base import PROTOCOLS, REGISTRY, Task

ARITH_TRAIN_SIZE = 20000
ARITH_TEST_SIZE = 500


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def task_names() -> list[str]:
    return sorted(REGISTRY)


def load_examples(cfg, split: str, path: str | None = None, limit: int | None = None):
    """The examples of cfg.task's split: generated for the embedded task, else loaded from
    `path` (or cfg.data; without either, the task's hub dataset)."""
    if cfg.task == "arith":
        from hrpo.synthetic import synthetic_split

        n = limit or (ARITH_TRAIN_SIZE if split == "train" else ARITH_TEST_SIZE)
        return synthetic_split(split, n, seed=0)
    from hrpo.data import load_task

    source = path or cfg.data
    if source is None:  # the hub dataset, whose splits the task names
        task = get_task(cfg.task)
        source, split = task.hub, task.splits[split != "train"]
    return load_task(cfg.task, source, split=split, limit=limit)


def user_messages(task: str, examples) -> list[str]:
    """The user turn of each example, as the task asks it."""
    render = get_task(task).render
    return [render(ex) for ex in examples]


__all__ = ["PROTOCOLS", "Task", "get_task", "load_examples", "task_names", "user_messages"]
