"""HRPO training: `python -m hrpo.train` (no arguments: the embedded model and task on CPU).

Each device step samples `batch_size` completions (`batch_size / group_size` prompts, each
`group_size` times) with the hybrid rollout, scores them, and takes the GRPO gradient of
the teacher-forced hybrid forward; the optimizer steps every `grad_accum` device steps.

A run survives: every option and input is checked before the output folder is touched;
resumable checkpoints are written atomically every `save_every` optimizer steps, on SIGTERM
or Ctrl-C, and when the run stops on faults; `--resume` continues from the latest one and
reproduces the uninterrupted run. A non-finite reward, loss or gradient skips that update
(the weights stay finite); a reward call that raises or times out scores its completions 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from hrpo.core.distributed import finish_group
from hrpo.core.errors import ConfigError
from hrpo.core.program import VERBOSE_HELP, run_program
from hrpo.model.loading import ALIASES
from hrpo.training.config import (
    STEPS,
    HelpFormatter,
    TrainConfig,
    add_config_args,
    config_for,
    resume_config,
    validate_config,
)
from hrpo.training.loop import Interrupted, Trainer, TrainingStopped
from hrpo.training.runs import MANIFEST


def train(cfg: TrainConfig, reward_fn=None, progress: bool = True) -> dict:
    """Run HRPO (or plain GRPO with cfg.hybrid False); returns the summary it writes."""
    validate_config(cfg)
    try:
        summary = Trainer(cfg, reward_fn, progress).run()
    except BaseException:
        finish_group(ok=False)
        raise
    finish_group()
    return summary


def finished_step(output_dir: str) -> int | None:
    """For --resume: the step a finished run in output_dir ended at, None for an unfinished
    one; ConfigError when the folder holds nothing to resume."""
    root = Path(output_dir)
    if not (root / MANIFEST).is_file() or not (root / "config.json").is_file():
        raise ConfigError(f"nothing to resume in {root}")
    try:
        summary = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError):  # no summary yet: the run is unfinished
        return None
    return summary.get("device_steps") if isinstance(summary, dict) and summary.get("status") == "finished" else None


def check_model_given(cfg: TrainConfig) -> None:
    """Only the embedded task is meant for the embedded model: a real task needs --model."""
    if cfg.task != "arith" and cfg.model is None:
        raise ConfigError(f"--task {cfg.task} needs --model (a hub name, a folder, a .gguf, or {' or '.join(ALIASES)})")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per TrainConfig field, in sections, each with its help,
    default and choices (hrpo.training.config documents them)."""
    steps = textwrap.fill(
        f"{STEPS} A benchmark task trains with its family's recipe.", width=100, break_on_hyphens=False
    )
    p = argparse.ArgumentParser(
        prog="python -m hrpo.train", description=f"{__doc__}\n{steps}", formatter_class=HelpFormatter
    )
    add_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    # not a TrainConfig field: how the command talks, not what the run is
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    # A signal the run did not turn into Interrupted came before it took its folder: while the
    # model or the data loaded.
    return run_program(p, command, argv, stopped=" before the first step; nothing to resume", name="hrpo")


def command(args) -> int:
    """Train, or resume, the run the command line names; a run that stopped itself or on a
    signal says so in one line and exits 3 or 128 + the signal."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "verbose"}
    if given.get("resume"):
        output_dir = given.get("output_dir", TrainConfig.output_dir)
        done = finished_step(output_dir)
        cfg = resume_config(output_dir, given)  # a changed flag is refused, finished or not
        if done is not None:
            print(f"hrpo: {output_dir} finished at step {done}; nothing to do")
            return 0
    else:
        cfg = config_for(given.pop("task", "arith"), **given)
        check_model_given(cfg)
    try:
        summary = train(cfg)
    except Interrupted as err:
        print(f"hrpo: {err}", file=sys.stderr)
        return 128 + err.signum
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    if summary["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
        print(
            f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} ({gain:+.3f}); "
            f"run in {cfg.output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
