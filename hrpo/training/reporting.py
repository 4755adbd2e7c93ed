"""Where training metrics go: metrics.jsonl always, TensorBoard events when asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hrpo.training.runs import replace_file


def json_safe(record: dict) -> dict:
    """Non-finite floats as null: strict JSON readers (jq, browsers) reject NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """One JSON object per device step in `path`. A resumed run starts from the records of
    its checkpoint: the file is rewritten with them at the first new record (not before, so
    a resume that fails early leaves the folder as it was)."""

    def __init__(self, path: Path, earlier: list[dict], tensorboard_dir: Path | None = None, first_step: int = 0):
        self.path, self._earlier, self._fh = path, list(earlier), None
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote past the checkpoint it resumes from
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=first_step or None)

    def append(self, record: dict) -> None:
        record = json_safe(record)
        if self._fh is None:
            replace_file(self.path, "".join(json.dumps(r) + "\n" for r in self._earlier))
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()


class peak_memory:
    """`with peak_memory(device) as peak:` ... `peak()`: the most memory the block held, in GB:
    CUDA tensors allocated on `device` (the allocator's peak, reset on entry); on the CPU, the
    process's peak resident set so far (the OS keeps no per-block peak)."""

    def __init__(self, device: torch.device):
        self.device, self.value = torch.device(device), None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return lambda: self.value

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.value = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            self.value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
