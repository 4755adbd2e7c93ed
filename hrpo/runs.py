"""Run folders and result files that are never overwritten unless asked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

RUN_MARKERS = ("config.json", "summary.json", "metrics.jsonl")


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        ours = any((path / m).exists() for m in RUN_MARKERS)
        if not overwrite:
            raise FileExistsError(f"output dir {path} already holds files; pass --overwrite to replace its run")
        if not ours:
            raise FileExistsError(f"output dir {path} is not empty and holds no hrpo run; refusing to clear it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
