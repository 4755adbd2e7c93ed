"""What every hrpo program that loads a model does around its work (hrpo.eval, hrpo.inspect,
hrpo.serve): the flags they share, and run_program, which parses the command line, sets the
process up, runs the work, and turns a bad input or a signal into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Mapping

import torch
from transformers.utils import logging as hf_logging

from hrpo.core.distributed import finish_group
from hrpo.core.errors import error_line
from hrpo.core.signals import SignalStop, stop_at_once

BAD_INPUT = 2  # the exit code of a one-line error (argparse's own for a bad flag)
VERBOSE_HELP = "show third-party warnings and model-loading progress bars"


def add_runtime_arguments(parser: argparse.ArgumentParser, verbose_also: str = "") -> None:
    """--device, --dtype and --verbose, in a section of their own. verbose_also: what else
    --verbose shows in this program."""
    group = parser.add_argument_group("device and logging")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda:N")
    group.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16"
    )
    group.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + verbose_also)


def run_program(
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
    stopped: str = "",
    name: str | None = None,
) -> int:
    """work(parser's arguments) with torch's threads set (cpu_threads), third-party noise off
    unless --verbose, and SIGINT / SIGTERM raising SignalStop; returns work's exit code, or
    BAD_INPUT after `error: ...` for a bad input (ConfigError, DataError, ModelError,
    CheckpointError: ValueErrors; a missing file or a full disk: OSError), or 128 + the signal
    after `NAME: stopped by SIGNAME{stopped}` (name: by default the parser's program, hrpo.eval
    of "python -m hrpo.eval"). The process group (torchrun's) is left either way; after a
    failure without waiting for the other ranks."""
    args = parser.parse_args(argv)
    name = name or parser.prog.split()[-1]
    torch.set_num_threads(cpu_threads())
    try:
        with stop_at_once(), quiet_libraries(args.verbose):
            code = work(args)
    except SignalStop as err:
        print(f"{name}: stopped by {err}{stopped}", file=sys.stderr)
        finish_group(ok=False)
        return 128 + err.signum
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        finish_group(ok=False)
        return BAD_INPUT
    finish_group()
    return code


def cpu_threads(env: Mapping[str, str] | None = None, cpus: int | None = None, busy: float | None = None) -> int:
    """Torch's intra-op thread count for this process: OMP_NUM_THREADS when the user set it;
    else the cores other work is not already using (`busy`: the 1-minute load average when
    the program starts), at least 1, and under torchrun (LOCAL_WORLD_SIZE processes on this
    machine) one share of those each. More threads than free cores make the C++ steps wait on
    each other: the default run on two cores with another process busy took 9 min 47 s with
    2 threads and 2 min 2 s with 1. `env`, `cpus` and `busy` default to this process's.

    torchrun itself exports OMP_NUM_THREADS=1 to its workers when the user set none and
    starts more than one (torch/distributed/run.py), which this keeps: export
    OMP_NUM_THREADS=(cores / processes) beside torchrun for more threads per process."""
    env = os.environ if env is None else env
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    busy = os.getloadavg()[0] if busy is None else busy
    free = max(1, cpus - round(busy))
    local = env.get("LOCAL_WORLD_SIZE", "").strip()
    return max(1, free // int(local)) if local.isdigit() and int(local) > 0 else free


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False):
    """Within: no third-party noise that says nothing to the user (peft reads transformers'
    deprecated `is_gradient_checkpointing` on every LoRA attach) and no model-loading
    progress bars; `verbose` keeps both. Restored on exit."""
    if verbose:
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()
