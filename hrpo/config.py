"""Training configuration, the per-task reference recipes, the CLI built from them, and the
validation that runs before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    task: str = "arith"
    model: str | None = None  # hub name or local folder; None: the embedded tiny model
    data: str | None = None  # local file/folder or hub dataset name (not needed for arith)
    eval_data: str | None = None  # held-out split; default: the task's test split
    output_dir: str = "runs/hrpo"
    overwrite: bool = False  # replace the run in output_dir (only the files an hrpo run wrote)
    resume: bool = False  # continue the run in output_dir from its latest complete checkpoint
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU
    hybrid: bool = True
    engine: str = "fast"  # rollouts: "fast" (hrpo.engine) or "reference" (hrpo.rollout's plain loop)
    # Rollout and batch shape (reference recipe: GSM8K's).
    group_size: int = 4
    batch_size: int = 8  # completions per device step
    grad_accum: int = 4
    max_prompt_length: int = 1024
    max_completion_length: int = 1024
    temperature: float = 0.5
    # The training forward's log-probs: None at the sampling temperature (the distribution the
    # rollout sampled from); 1 reproduces the original, which scores raw logits.
    logprob_temperature: float | None = None
    top_k: int = 50
    marker: str = "####"
    system_prompt: bool = True
    # Objective.
    beta: float = 0.005
    epsilon: float = 0.2
    num_iterations: int = 1  # updates per rollout; > 1 uses the clipped ratio
    tis: float | None = None  # cap C of truncated importance sampling against the engine's log-probs (None: off)
    loss_norm: str = "grpo"
    # The update's memory: micro-batches of at most this many (padded) tokens, whole groups.
    micro_batch_tokens: int = 16384
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward
    fsdp: bool = False  # under torchrun: shard the decoder layers (base weights and adapters) with FSDP2
    # Optimisation.
    lora_rank: int = 32
    lora_alpha: int = 64
    lr_lora: float = 5e-6
    lr_gate: float = 1e-4
    lr_lambda: float = 1e-3
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    warmup_ratio: float = 0.1
    # HF Trainer's warm-up, the original's: ceil(ratio x steps) warm-up steps, the first at lr 0.
    hf_warmup: bool = False
    max_grad_norm: float = 0.1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: one epoch of the training set
    r_min: float = 0.99
    r_max: float = 0.999
    # Data sizes and evaluation.
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 64
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)
    # Checkpoints, faults and monitoring.
    save_every: int = 50  # optimizer steps between resumable checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # resumable checkpoints kept (the oldest go first)
    max_skipped_in_a_row: int = 5  # non-finite rewards / losses / gradients tolerated in a row
    reward_timeout: float = 60.0  # seconds one reward-function call may take (0: no limit)
    eval_every: int = 0  # optimizer steps between held-out evaluations during training (0: none)
    eval_every_limit: int = 100  # examples in each of those evaluations (greedy)
    report_to: str = "none"  # "tensorboard" also writes TensorBoard events (metrics.jsonl always)


# Group size, completions per device step, gradient accumulation, prompt / completion limits
# of the paper's runs; `arith` is the embedded CPU task, tuned so that five minutes of
# training on two cores moves held-out accuracy.
# Real tasks check held-out accuracy on 500 examples (a fixed subset) before and after training.
RECIPES: dict[str, dict] = {
    "gsm8k": dict(group_size=4, batch_size=8, grad_accum=4, max_prompt_length=1024, max_completion_length=1024,
                  eval_limit=500),
    "math": dict(group_size=8, batch_size=16, grad_accum=4, max_prompt_length=1024, max_completion_length=1024,
                 eval_limit=500),
    "mmlu": dict(group_size=8, batch_size=16, grad_accum=4, max_prompt_length=1024, max_completion_length=1024,
                 eval_limit=500),
    "rag-qa": dict(group_size=4, batch_size=16, grad_accum=4, max_prompt_length=2048, max_completion_length=1024,
                   eval_limit=500),
    "arith": dict(
        group_size=8, batch_size=32, grad_accum=1, max_prompt_length=128, max_completion_length=64,
        system_prompt=False, lr_lora=5e-4, lr_gate=1e-3, lr_lambda=1e-2, max_steps=150,
        train_limit=4000, eval_limit=500, max_grad_norm=1.0, save_every=25,
    ),
}

# Fields a resumed run may change; every other one must equal the run's saved config.
RESUMABLE_OVERRIDES = ("save_every", "keep_checkpoints", "max_skipped_in_a_row", "reward_timeout", "eval_every",
                       "eval_every_limit", "report_to", "device", "output_dir", "overwrite", "resume",
                       "micro_batch_tokens", "gradient_checkpointing", "fsdp")


class ConfigError(ValueError):
    """An option outside its allowed range, named by its command-line flag, in one line."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} must be {allowed}, got {value!r}")


def validate_config(cfg: TrainConfig) -> None:
    """Every option checked against its allowed range before any work starts (ConfigError)."""
    from .loss import NORMS

    def ints(name, lo, hi=None, optional=False):
        v = getattr(cfg, name)
        if optional and v is None:
            return
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi), name, allowed, v)

    def floats(name, lo, hi, lo_open=False, hi_open=False):
        v = getattr(cfg, name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = number and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        allowed = f"a number in {'(' if lo_open else '['}{lo}, {'inf)' if hi is None else str(hi) + (')' if hi_open else ']')}"
        _check(ok, name, allowed, v)

    def choice(name, options):
        _check(getattr(cfg, name) in options, name, "one of " + ", ".join(map(str, options)), getattr(cfg, name))

    from .tasks import task_names

    choice("task", task_names())
    _check(isinstance(cfg.output_dir, str) and cfg.output_dir.strip() != "", "output_dir", "a folder path", cfg.output_dir)
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite and --resume contradict each other: replace the run, or continue it")
    ints("seed", 0)
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           "auto, cpu, cuda or cuda:N", cfg.device)
    choice("dtype", ("auto", "float32", "bfloat16", "float16"))
    choice("engine", ("fast", "reference"))
    ints("group_size", 2)
    ints("batch_size", cfg.group_size if isinstance(cfg.group_size, int) else 2)
    if cfg.batch_size % cfg.group_size:
        raise ConfigError(f"--batch-size must be a multiple of --group-size ({cfg.group_size}), got {cfg.batch_size}")
    ints("grad_accum", 1)
    ints("max_prompt_length", 1)
    ints("max_completion_length", 1)
    floats("temperature", 0, None, lo_open=True)
    if cfg.logprob_temperature is not None:
        floats("logprob_temperature", 0, None, lo_open=True)
    ints("top_k", 0)
    _check(isinstance(cfg.marker, str) and cfg.marker.strip() != "", "marker", "a non-empty string", cfg.marker)
    floats("beta", 0, None)
    floats("epsilon", 0, 1, lo_open=True, hi_open=True)
    ints("num_iterations", 1)
    if cfg.tis is not None:
        floats("tis", 0, None, lo_open=True)
        if cfg.logprob_temperature not in (None, cfg.temperature):
            raise ConfigError(f"--tis compares the training forward's log-probs with the rollout's, so it needs them at "
                              f"the sampling temperature: --logprob-temperature {cfg.logprob_temperature} differs "
                              f"from --temperature {cfg.temperature}")
    ints("micro_batch_tokens", 1)
    choice("loss_norm", NORMS)
    ints("lora_rank", 1)
    floats("lora_alpha", 0, None, lo_open=True)
    for name in ("lr_lora", "lr_gate", "lr_lambda", "weight_decay"):
        floats(name, 0, None)
    floats("adam_beta1", 0, 1, hi_open=True)
    floats("adam_beta2", 0, 1, hi_open=True)
    floats("warmup_ratio", 0, 1)
    floats("max_grad_norm", 0, None, lo_open=True)
    ints("epochs", 1)
    ints("max_steps", 1, optional=True)
    floats("r_min", 0, 1, lo_open=True, hi_open=True)
    floats("r_max", 0, 1, lo_open=True, hi_open=True)
    if cfg.r_min > cfg.r_max:
        raise ConfigError(f"--r-min ({cfg.r_min}) must not exceed --r-max ({cfg.r_max})")
    ints("train_limit", 1, optional=True)
    ints("eval_limit", 1, optional=True)
    ints("eval_batch_size", 1)
    _check(len(cfg.lora_targets) > 0 and all(isinstance(t, str) and t for t in cfg.lora_targets), "lora_targets",
           "one or more module names", cfg.lora_targets)
    ints("save_every", 0)
    ints("keep_checkpoints", 1)
    ints("max_skipped_in_a_row", 1)
    floats("reward_timeout", 0, None)
    ints("eval_every", 0)
    ints("eval_every_limit", 1)
    choice("report_to", ("none", "tensorboard"))


def config_for(task: str, **overrides) -> TrainConfig:
    """The task's recipe (a benchmark uses its family's: math500 trains as math) with overrides."""
    from .tasks import get_task, task_names

    if task not in task_names():
        raise ConfigError(f"--task must be one of {', '.join(task_names())}, got {task!r}")
    values = {**RECIPES[get_task(task).recipe], **{k: v for k, v in overrides.items() if v is not None}, "task": task}
    return TrainConfig(**values)


def add_config_args(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    """One --flag per TrainConfig field (booleans get --x / --no-x), all defaulting to None
    so that only what the user typed overrides the task's recipe."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == "task" or (fields is not None and f.name not in fields):
            continue
        if f.type in ("bool",):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "lora_targets":
            parser.add_argument(flag(f.name), nargs="+", default=None)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag(f.name), type=kind, default=None)


# ---------------------------------------------------------------- resuming a run


def _comparable(cfg: TrainConfig | dict) -> dict:
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(values))  # tuples as lists, as config.json holds them


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run keeps its config: any difference outside RESUMABLE_OVERRIDES is an error."""
    now = _comparable(cfg)
    for key, value in now.items():
        if key not in RESUMABLE_OVERRIDES and key in saved and saved[key] != value:
            raise ConfigError(f"{flag(key)} {value!r} differs from the run's config ({saved[key]!r}); "
                              "a resumed run keeps its config")


def saved_config(output_dir: str | Path) -> dict:
    file = Path(output_dir) / "config.json"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: cannot read {file} ({type(err).__name__})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {file} is not a JSON object")
    return saved


def resume_config(output_dir: str, overrides: dict) -> TrainConfig:
    """The saved config of the run in output_dir with the flags a resume may change."""
    saved = saved_config(output_dir)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: (tuple(v) if k == "lora_targets" else v) for k, v in saved.items() if k in known})
    for key, value in overrides.items():
        if key in RESUMABLE_OVERRIDES:
            setattr(cfg, key, value)
        elif _comparable({key: value})[key] != saved.get(key):
            raise ConfigError(f"{flag(key)} {value!r} differs from the run's config ({saved.get(key)!r}); "
                              "a resumed run keeps its config")
    cfg.resume, cfg.overwrite = True, False
    return cfg
