"""Examples for a configured task: the embedded synthetic task or a loaded dataset."""
from __future__ import annotations

from .prompts import Example

ARITH_TRAIN_SIZE = 20000
ARITH_TEST_SIZE = 500


def load_examples(cfg, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
    if cfg.task == "arith":
        from .synthetic import synthetic_split

        n = limit or (ARITH_TRAIN_SIZE if split == "train" else ARITH_TEST_SIZE)
        return synthetic_split(split, n, seed=0)
    from .data import load_task

    # No path: the task's default hub dataset (needs the `hub` extra and a reachable hub).
    return load_task(cfg.task, path or cfg.data, split=split, limit=limit)
