"""Training configuration, the per-task reference recipes, the CLI built from them, and the
validation that runs before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from hrpo.core.errors import ConfigError
from hrpo.tasks import get_task, task_names
from hrpo.training.loss import NORMS
from hrpo_kernels.latent_input import LatentParams

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The command line's sections, in the order --help lists them.
MODEL, ROLLOUT, LOSS, OPTIM, RUNS, LOGGING, DISTRIBUTED = GROUPS = (
    "model and data",
    "rollout",
    "loss",
    "optimisation",
    "runs and checkpoints",
    "logging and evaluation",
    "distributed",
)
# What a step is, wherever an option counts them.
STEPS = (
    "A device step rolls out --batch-size completions (over all processes) and runs --num-iterations "
    "backward passes on them; an optimizer step is taken every --grad-accum backward passes (with "
    "--num-iterations 1: every --grad-accum device steps)."
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("fast", "reference")
METHODS = ("hrpo", "grpo", "soft-tokens", "gumbel-soft")  # grpo: plain tokens, the same run as --no-hybrid
LATENT_METHODS = ("soft-tokens", "gumbel-soft")  # thinking inputs scored by their density, no gate
REPORT_TO = ("none", "tensorboard")


def option(default, group: str, help: str, choices=None):
    """A TrainConfig field with its command-line help, section and choices: a tuple, or a
    function giving one when the parser is built. add_config_args builds the parser from them;
    the default it shows comes from the dataclass and RECIPES."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})


@dataclass
class TrainConfig:
    task: str = option(
        "arith",
        MODEL,
        "what to train on: arith (generated on the fly, runs on a CPU), gsm8k, math, "
        "mmlu, rag-qa, or a benchmark of `python -m hrpo.eval` (trained with its family's recipe)",
        task_names,
    )
    model: str | None = option(
        None,
        MODEL,
        "the base model: a local folder, a .gguf file, a hub name or an alias "
        "(smollm2-135m); none: the embedded tiny model",
    )
    data: str | None = option(
        None,
        MODEL,
        "the training data: a local file or folder, or a hub dataset name; "
        "none: the task's hub dataset (arith generates its own)",
    )
    eval_data: str | None = option(
        None,
        MODEL,
        "the held-out data; none: the test split of --data (needed when "
        "--data is a single file) or of the task's hub dataset",
    )
    output_dir: str = option("runs/hrpo", RUNS, "the run's folder: config, metrics, checkpoints, evaluations")
    overwrite: bool = option(False, RUNS, "replace the run in --output-dir (deleting only the files an hrpo run wrote)")
    resume: bool = option(
        False,
        RUNS,
        "continue the run in --output-dir from its latest complete checkpoint with "
        "its saved config (only the checkpoint, fault, evaluation, logging, memory and device "
        "options may change)",
    )
    seed: int = option(0, RUNS, "seeds the data order, the initial adapters and gate, and the sampling")
    device: str = option(
        "auto",
        DISTRIBUTED,
        "auto (this process's GPU, cuda:LOCAL_RANK under torchrun, if there is one, else the CPU), cpu, cuda or cuda:N",
    )
    dtype: str = option(
        "auto",
        MODEL,
        "the base model's weights; auto: float32 on a CPU, bfloat16 on a GPU (the gate is always float32)",
        DTYPES,
    )
    hybrid: bool = option(
        True,
        MODEL,
        "HRPO: while the model reasons, feed it the gated blend of the sampled "
        "token's embedding and the probability-weighted embedding mixture; --no-hybrid: plain "
        "GRPO (token embeddings only), the same run as --method grpo",
    )
    method: str = option(
        "hrpo",
        MODEL,
        "what the thinking inputs are and how they are trained: hrpo (the gate's "
        "blend); grpo (plain token embeddings, GRPO: the same as --no-hybrid); soft-tokens "
        "(Butt et al. 2025: the mixture p @ E plus Gaussian noise of "
        "--noise-std, trained by the noisy inputs' log-density, answer tokens hard); "
        "gumbel-soft (SofT-GRPO, Zheng et al. 2025: the Gumbel-Softmax mixture of the top-k at "
        "--gumbel-tau, trained by the Gumbel log-density of the perturbed log-probabilities, "
        "answer tokens hard; the paper's --top-k 5 --temperature 1.0 --gumbel-tau 0.1); "
        "docs/latent-modes.md",
        METHODS,
    )
    noise_std: float = option(
        0.1, MODEL, "soft-tokens: the standard deviation of the thinking inputs' noise, in embedding units"
    )
    gumbel_tau: float = option(0.1, MODEL, "gumbel-soft: the Gumbel-Softmax temperature of the thinking inputs")
    engine: str = option(
        "fast",
        ROLLOUT,
        "the rollout's decoder: fast (hrpo.engine.rollout_engine; falls back to reference, "
        "with a warning, for a model it cannot run) or reference (hrpo.engine.rollout's plain loop)",
        ENGINES,
    )
    group_size: int = option(4, ROLLOUT, "completions sampled per prompt; advantages are taken within each group")
    batch_size: int = option(
        8,
        ROLLOUT,
        "completions per device step, over all processes (a multiple of "
        "--group-size: batch-size / group-size prompts per device step)",
    )
    grad_accum: int = option(
        4, OPTIM, "backward passes per optimizer step (with --num-iterations 1: device steps per optimizer step)"
    )
    max_prompt_length: int = option(
        1024, MODEL, "tokens of a rendered prompt; a longer one is an error before training starts, never cut"
    )
    max_completion_length: int = option(1024, ROLLOUT, "new tokens per completion")
    temperature: float = option(
        0.5, ROLLOUT, "sampling temperature of the rollouts and of the sampled held-out accuracy"
    )
    logprob_temperature: float | None = option(
        None,
        LOSS,
        "temperature of the training forward's log-probs; none: --temperature (the distribution the "
        "rollout sampled from); 1: raw logits, as the original scores them (unsloth/models/rl_replacements.py:237-246)",
    )
    top_k: int = option(50, ROLLOUT, "sample among the k most likely tokens (0: the whole vocabulary)")
    marker: str = option(
        "####", ROLLOUT, "the answer marker: a completion reasons (hybrid inputs) until its text holds this string"
    )
    system_prompt: bool = option(True, MODEL, "put the original's system prompt before each question (utils.py:6-11)")
    format_reward: float = option(
        0.0,
        LOSS,
        "a denser training reward: W in [0, 1) for a completion whose only marker is followed by an "
        "answer the task can read, right or wrong (a right answer still gets the task's score, 1); "
        "0: the paper's strict reward alone. Held-out accuracy is always the strict reward",
    )
    beta: float = option(
        0.005, LOSS, "weight of the k3 KL penalty against the frozen base model (0: no reference forward)"
    )
    epsilon: float = option(0.2, LOSS, "clip range of the policy ratio (used with --num-iterations > 1)")
    num_iterations: int = option(
        1, LOSS, "backward passes per rollout; > 1 uses the clipped ratio against the rollout-time policy"
    )
    tis: float | None = option(
        None,
        LOSS,
        "cap C of truncated importance sampling, min(ratio, C) per token, of the "
        "training forward's log-probs against the rollout engine's; none: off",
    )
    loss_norm: str = option(
        "grpo",
        LOSS,
        "how token losses are averaged: grpo (per completion, then over the "
        "batch), dapo (over all of the batch's tokens), dr_grpo (sum over tokens / (batch x "
        "--max-completion-length))",
        NORMS,
    )
    micro_batch_tokens: int = option(
        16384,
        OPTIM,
        "the update's memory: each backward pass runs in micro-batches "
        "of at most this many padded tokens, whole groups (a larger group goes alone)",
    )
    gradient_checkpointing: bool = option(
        False, OPTIM, "recompute each decoder layer in the backward: less memory, more time"
    )
    fsdp: bool = option(
        False,
        DISTRIBUTED,
        "under torchrun: shard the decoder layers (base weights and adapters) over the processes with FSDP2",
    )
    lora_rank: int = option(32, MODEL, "rank of the LoRA adapters")
    lora_alpha: int = option(64, MODEL, "LoRA scaling numerator (the adapters' scale is alpha / rank)")
    lr_lora: float = option(5e-6, OPTIM, "learning rate of the LoRA adapters")
    lr_gate: float = option(1e-4, OPTIM, "learning rate of the gate's two linear layers")
    lr_lambda: float = option(1e-3, OPTIM, "learning rate of the gate's Lambda")
    weight_decay: float = option(0.1, OPTIM, "AdamW weight decay, on every trained parameter")
    adam_beta1: float = option(0.9, OPTIM, "AdamW beta1")
    adam_beta2: float = option(0.99, OPTIM, "AdamW beta2")
    warmup_ratio: float = option(
        0.1,
        OPTIM,
        "fraction of the optimizer steps spent warming the learning rates up linearly; a cosine decay to 0 follows",
    )
    hf_warmup: bool = option(
        False,
        OPTIM,
        "HF Trainer's warm-up, the original's: ceil(ratio x steps) warm-up "
        "steps, the first at learning rate 0 (transformers/optimization.py:137); without it "
        "the first update already moves the weights",
    )
    max_grad_norm: float = option(0.1, OPTIM, "clip the gradient's global norm to this before each optimizer step")
    epochs: int = option(1, OPTIM, "passes over the training set (each in its own shuffled order)")
    max_steps: int | None = option(
        None,
        OPTIM,
        "stop after this many optimizer steps: max-steps x --grad-accum / "
        "--num-iterations device steps, rounded up (the run is shorter if --epochs "
        "ends first); none: --epochs passes over the training set",
    )
    r_min: float = option(
        0.99,
        MODEL,
        "the gate's start: per channel u = sigmoid(Lambda)^c is drawn "
        "uniformly from [r-min, r-max], and a = u^r (r in (0, 1), from the input) weighs the "
        "token embedding: near 1, the blend starts close to plain tokens",
    )
    r_max: float = option(0.999, MODEL, "the upper end of that draw (see --r-min)")
    train_limit: int | None = option(
        None,
        MODEL,
        "use at most this many training examples (the first usable ones; arith: how many to generate, none: 20000)",
    )
    eval_limit: int | None = option(
        None,
        LOGGING,
        "held-out examples evaluated before and after training (the "
        "first usable ones; arith: how many to generate, none: 500)",
    )
    eval_batch_size: int = option(64, LOGGING, "prompts per generation batch in held-out evaluations")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, MODEL, "the projections that get LoRA adapters")
    save_every: int = option(50, RUNS, "optimizer steps between resumable checkpoints (0: only the final one)")
    keep_checkpoints: int = option(2, RUNS, "resumable checkpoints kept (the oldest are deleted first)")
    max_skipped_in_a_row: int = option(
        5,
        RUNS,
        "stop (after a checkpoint) when this many updates in a row were "
        "skipped for a non-finite reward, loss or gradient",
    )
    reward_timeout: float = option(
        60.0, RUNS, "seconds one reward-function call may take before its completions score 0 (0: no limit)"
    )
    eval_every: int = option(
        0, LOGGING, "optimizer steps between greedy held-out evaluations during training (0: none)"
    )
    eval_every_limit: int = option(100, LOGGING, "held-out examples in each of those evaluations (the first ones)")
    report_to: str = option(
        "none",
        LOGGING,
        "also log to: tensorboard (events in --output-dir/tensorboard); metrics.jsonl is always written",
        REPORT_TO,
    )


# Group size, completions per device step, gradient accumulation, prompt / completion limits
# of the paper's runs; `arith` is the embedded CPU task, tuned so that five minutes of
# training on two cores moves held-out accuracy.
# Real tasks check held-out accuracy on 500 examples (a fixed subset) before and after training.
RECIPES: dict[str, dict] = {
    "gsm8k": dict(
        group_size=4, batch_size=8, grad_accum=4, max_prompt_length=1024, max_completion_length=1024, eval_limit=500
    ),
    "math": dict(
        group_size=8, batch_size=16, grad_accum=4, max_prompt_length=1024, max_completion_length=1024, eval_limit=500
    ),
    "mmlu": dict(
        group_size=8, batch_size=16, grad_accum=4, max_prompt_length=1024, max_completion_length=1024, eval_limit=500
    ),
    "rag-qa": dict(
        group_size=4, batch_size=16, grad_accum=4, max_prompt_length=2048, max_completion_length=1024, eval_limit=500
    ),
    "arith": dict(
        group_size=8,
        batch_size=32,
        grad_accum=1,
        max_prompt_length=128,
        max_completion_length=64,
        system_prompt=False,
        lr_lora=5e-4,
        lr_gate=1e-3,
        lr_lambda=1e-2,
        max_steps=150,
        train_limit=4000,
        eval_limit=500,
        max_grad_norm=1.0,
        save_every=25,
    ),
}

# Fields a resumed run may change; every other one must equal the run's saved config.
RESUMABLE_OVERRIDES = (
    "save_every",
    "keep_checkpoints",
    "max_skipped_in_a_row",
    "reward_timeout",
    "eval_every",
    "eval_every_limit",
    "report_to",
    "device",
    "output_dir",
    "overwrite",
    "resume",
    "micro_batch_tokens",
    "gradient_checkpointing",
    "fsdp",
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} must be {allowed}, got {value!r}")


def _ints(cfg: TrainConfig, name: str, lo: int, hi: int | None = None, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi), name, allowed, v)


def _floats(
    cfg: TrainConfig, name: str, lo: float, hi: float | None, lo_open: bool = False, hi_open: bool = False
) -> None:
    v = getattr(cfg, name)
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = number and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    allowed = (
        f"a number in {'(' if lo_open else '['}{lo}, {'inf)' if hi is None else str(hi) + (')' if hi_open else ']')}"
    )
    _check(ok, name, allowed, v)


def _choice(cfg: TrainConfig, name: str, options) -> None:
    _check(getattr(cfg, name) in options, name, "one of " + ", ".join(map(str, options)), getattr(cfg, name))


def latent_for(cfg: TrainConfig) -> LatentParams:
    """The latent mode the method rolls out and trains (hrpo_kernels/latent_input.py)."""
    if cfg.method == "soft-tokens":
        return LatentParams("soft-noise", noise_std=cfg.noise_std)
    if cfg.method == "gumbel-soft":
        return LatentParams("gumbel-soft", gumbel_tau=cfg.gumbel_tau)
    return LatentParams()


def validate_config(cfg: TrainConfig) -> None:
    """Every option checked against its allowed range before any work starts (ConfigError),
    section by section in the order of the flags."""
    _check_run(cfg)
    _check_sampling(cfg)
    _check_update(cfg)
    _check_optimizer(cfg)
    _check_evaluation_and_saving(cfg)
    _check_data_sources(cfg)


def _check_run(cfg: TrainConfig) -> None:
    """The task, the output folder, the seed and device, the batch's shape."""
    _choice(cfg, "task", task_names())
    _check(
        isinstance(cfg.output_dir, str) and cfg.output_dir.strip() != "", "output_dir", "a folder path", cfg.output_dir
    )
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite and --resume contradict each other: replace the run, or continue it")
    _ints(cfg, "seed", 0)
    _check(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        "auto, cpu, cuda or cuda:N",
        cfg.device,
    )
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "engine", ENGINES)
    _choice(cfg, "method", METHODS)
    _floats(cfg, "noise_std", 0, None, lo_open=True)
    _floats(cfg, "gumbel_tau", 0, None, lo_open=True)
    if cfg.method in LATENT_METHODS and not cfg.hybrid:
        raise ConfigError(
            f"--method {cfg.method} trains thinking inputs: it needs --hybrid (plain GRPO is --method grpo)"
        )
    if cfg.method == "grpo" and cfg.hybrid:
        raise ConfigError("--method grpo trains plain tokens: --hybrid contradicts it (HRPO is --method hrpo)")
    _ints(cfg, "group_size", 2)
    _ints(cfg, "batch_size", cfg.group_size if isinstance(cfg.group_size, int) else 2)
    if cfg.batch_size % cfg.group_size:
        raise ConfigError(f"--batch-size must be a multiple of --group-size ({cfg.group_size}), got {cfg.batch_size}")
    _ints(cfg, "grad_accum", 1)


def _check_sampling(cfg: TrainConfig) -> None:
    """Prompt and completion lengths, temperatures, top-k and the answer marker."""
    _ints(cfg, "max_prompt_length", 1)
    _ints(cfg, "max_completion_length", 1)
    _floats(cfg, "temperature", 0, None, lo_open=True)
    if cfg.logprob_temperature is not None:
        _floats(cfg, "logprob_temperature", 0, None, lo_open=True)
    _ints(cfg, "top_k", 0)
    if cfg.method == "gumbel-soft" and cfg.top_k == 0:
        raise ConfigError(
            "--method gumbel-soft records g' over the top-k candidates: it needs --top-k >= 1 (the paper's: 5)"
        )
    if cfg.method == "gumbel-soft" and cfg.logprob_temperature not in (None, cfg.temperature):
        raise ConfigError(
            f"--method gumbel-soft scores the mixture the rollout drew at --temperature {cfg.temperature}: "
            f"leave --logprob-temperature unset (got {cfg.logprob_temperature})"
        )
    _check(isinstance(cfg.marker, str) and cfg.marker.strip() != "", "marker", "a non-empty string", cfg.marker)


def _check_update(cfg: TrainConfig) -> None:
    """The reward's format credit, the loss (KL weight, clipping, iterations, TIS,
    normalisation) and its micro-batches."""
    _floats(cfg, "format_reward", 0, 1, hi_open=True)
    _floats(cfg, "beta", 0, None)
    _floats(cfg, "epsilon", 0, 1, lo_open=True, hi_open=True)
    _ints(cfg, "num_iterations", 1)
    if cfg.tis is not None:
        _floats(cfg, "tis", 0, None, lo_open=True)
        if cfg.logprob_temperature not in (None, cfg.temperature):
            raise ConfigError(
                f"--tis compares the training forward's log-probs with the rollout's, so it needs them at "
                f"the sampling temperature: --logprob-temperature {cfg.logprob_temperature} differs "
                f"from --temperature {cfg.temperature}"
            )
    if cfg.method in LATENT_METHODS and cfg.tis is not None:
        raise ConfigError(
            f"--tis compares token log-probs with the rollout's; {cfg.method}'s thinking positions have a "
            f"log-density the rollout does not record: leave --tis unset with --method {cfg.method}"
        )
    _ints(cfg, "micro_batch_tokens", 1)
    _choice(cfg, "loss_norm", NORMS)


def _check_optimizer(cfg: TrainConfig) -> None:
    """LoRA's shape and targets, the learning rates and AdamW, the schedule's length, the gate's range."""
    _ints(cfg, "lora_rank", 1)
    _floats(cfg, "lora_alpha", 0, None, lo_open=True)
    _check(
        len(cfg.lora_targets) > 0 and all(isinstance(t, str) and t for t in cfg.lora_targets),
        "lora_targets",
        "one or more module names",
        cfg.lora_targets,
    )
    for name in ("lr_lora", "lr_gate", "lr_lambda", "weight_decay"):
        _floats(cfg, name, 0, None)
    _floats(cfg, "adam_beta1", 0, 1, hi_open=True)
    _floats(cfg, "adam_beta2", 0, 1, hi_open=True)
    _floats(cfg, "warmup_ratio", 0, 1)
    _floats(cfg, "max_grad_norm", 0, None, lo_open=True)
    _ints(cfg, "epochs", 1)
    _ints(cfg, "max_steps", 1, optional=True)
    _floats(cfg, "r_min", 0, 1, lo_open=True, hi_open=True)
    _floats(cfg, "r_max", 0, 1, lo_open=True, hi_open=True)
    if cfg.r_min > cfg.r_max:
        raise ConfigError(f"--r-min ({cfg.r_min}) must not exceed --r-max ({cfg.r_max})")


def _check_evaluation_and_saving(cfg: TrainConfig) -> None:
    """Data limits, held-out checks, checkpoints, fault limits and the metrics backend."""
    _ints(cfg, "train_limit", 1, optional=True)
    _ints(cfg, "eval_limit", 1, optional=True)
    _ints(cfg, "eval_batch_size", 1)
    _ints(cfg, "save_every", 0)
    _ints(cfg, "keep_checkpoints", 1)
    _ints(cfg, "max_skipped_in_a_row", 1)
    _floats(cfg, "reward_timeout", 0, None)
    _ints(cfg, "eval_every", 0)
    _ints(cfg, "eval_every_limit", 1)
    _choice(cfg, "report_to", REPORT_TO)


def _check_data_sources(cfg: TrainConfig) -> None:
    """--data / --eval-data: read by the task, and present when they name local paths."""
    for name in ("data", "eval_data"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if cfg.task == "arith":
            raise ConfigError(
                f"{flag(name)} {value}: the arith task generates its examples and reads no data; "
                f"drop {flag(name)} or choose another --task"
            )
        if not Path(value).expanduser().exists() and not _hub_name(value):
            raise ConfigError(f"{flag(name)} {value}: no such file or folder")


def _hub_name(value: str) -> bool:
    """owner/name or owner/name:config, as hub datasets are named (not a path)."""
    owner, _, rest = value.partition("/")
    return (
        bool(owner)
        and not value.startswith((".", "~"))
        and "/" not in rest
        and bool(rest)
        and not rest.endswith((".jsonl", ".json", ".parquet"))
    )


def config_for(task: str, **overrides) -> TrainConfig:
    """The task's recipe (a benchmark uses its family's: math500 trains as math) with overrides."""
    if task not in task_names():
        raise ConfigError(f"--task must be one of {', '.join(task_names())}, got {task!r}")
    values = {**RECIPES[get_task(task).recipe], **{k: v for k, v in overrides.items() if v is not None}, "task": task}
    if values.get("method") == "grpo" and overrides.get("hybrid") is None:
        values["hybrid"] = False  # --method grpo is --no-hybrid; an explicit --hybrid is refused by validation
    return TrainConfig(**values)


def default_text(name: str) -> str:
    """The default --help shows for a field: the dataclass's, or each recipe's where RECIPES
    sets it (recipes sharing a value named together)."""

    def text(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        if value is None:
            return "none"
        return " ".join(value) if isinstance(value, tuple) else str(value)

    default = TrainConfig.__dataclass_fields__[name].default
    values: dict[str, list[str]] = {}
    for recipe in sorted(RECIPES, key=lambda r: r != TrainConfig.task):  # the default task's first
        values.setdefault(text(RECIPES[recipe].get(name, default)), []).append(recipe)
    if len(values) == 1:
        return f"default: {next(iter(values))}"
    return "default: the task's recipe (" + ", ".join(f"{'/'.join(r)}: {v}" for v, r in values.items()) + ")"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; option help wrapped at spaces only, never inside a flag
    name such as --max-completion-length."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_config_args(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    """One --flag per TrainConfig field (booleans get --x / --no-x), in its section, with its
    help, default and choices; all default to None so that only what the user typed overrides
    the task's recipe."""
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        if fields is not None and f.name not in fields:
            continue
        choices = f.metadata["choices"]
        choices = choices() if callable(choices) else choices
        help = f"{f.metadata['help']} ({default_text(f.name)})".replace("%", "%%")  # argparse formats help with %
        group = groups[f.metadata["group"]]
        if f.type == "bool":
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.name == "lora_targets":
            group.add_argument(flag(f.name), nargs="+", default=None, help=help)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            group.add_argument(flag(f.name), type=kind, default=None, choices=choices, help=help)


# ---------------------------------------------------------------- resuming a run


def _comparable(cfg: TrainConfig | dict) -> dict:
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(values))  # tuples as lists, as config.json holds them


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run keeps its config: any difference outside RESUMABLE_OVERRIDES is an error."""
    now = _comparable(cfg)
    for key, value in now.items():
        if key not in RESUMABLE_OVERRIDES and key in saved and saved[key] != value:
            raise ConfigError(
                f"{flag(key)} {value!r} differs from the run's config ({saved[key]!r}); a resumed run keeps its config"
            )


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
            raise ConfigError(
                f"{flag(key)} {value!r} differs from the run's config ({saved.get(key)!r}); "
                "a resumed run keeps its config"
            )
    cfg.resume, cfg.overwrite = True, False
    return cfg
