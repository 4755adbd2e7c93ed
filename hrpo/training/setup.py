"""A training run's starting point: the checks, the policy and its rollout engine, the data and
its order, the optimizer with its learning-rate schedule, and the state a resume restores.

`Setup(cfg, reward_fn, progress)` holds all of it; hrpo.training.step adds the device step and
hrpo.training.loop the schedule around it. Nothing here writes: the output folder is only
checked (the loop takes it once every input has passed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from hrpo.core.distributed import init_group, shard_layers
from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import SYSTEM_PROMPT, encode_prompts
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import build_policy, eos_token_ids, load_base_model, resolve_device, resolve_dtype
from hrpo.tasks import load_examples, user_messages
from hrpo.tasks.rewards import get_reward_fn
from hrpo.training.checkpoint import complete_checkpoints, load_checkpoint, load_training_state
from hrpo.training.config import TrainConfig, check_resumable, latent_for, saved_config
from hrpo.training.runs import RunDir
from hrpo.training.update import UpdateSettings


def make_optimizer(hm: HybridModel, cfg: TrainConfig, total_steps: int):
    """AdamW over LoRA, the gate linears and Lambda, each at its own learning rate, all with
    weight decay (the original's groups: patch.py:17-47), and a warm-up + cosine schedule."""
    groups = hm.gate.param_groups()
    lora = [p for n, p in hm.model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": lora, "lr": cfg.lr_lora, "name": "lora"},
        {"params": groups["gate"], "lr": cfg.lr_gate, "name": "gate"},
        {"params": groups["lambda"], "lr": cfg.lr_lambda, "name": "lambda"},
    ]
    opt = torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total_steps, cfg.warmup_ratio, cfg.hf_warmup))


def lr_schedule(total_steps: int, warmup_ratio: float, hf: bool = False):
    """The learning-rate factor of each optimizer step: a linear warm-up, then a cosine to 0.
    Ours counts the step being taken, so the first update already moves the weights; hf is
    HF Trainer's, which the original used: ceil(ratio x steps) warm-up steps
    (transformers/training_args.py:2545) and step / warmup, so the first update has rate 0
    (transformers/optimization.py:137)."""
    warmup = math.ceil(warmup_ratio * total_steps) if hf else max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup) if hf else (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def heldout_sources(cfg: TrainConfig) -> str | None:
    source = cfg.eval_data or cfg.data
    if source is not None and cfg.eval_data is None and Path(source).is_file():
        raise ConfigError(f"--data {source} is one file; pass --eval-data with a held-out split")
    return source


def order_digest(order: list[int]) -> str:
    """Names the data order, so a resume on changed data is refused rather than misread."""
    return hashlib.sha256(json.dumps(order).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Progress:
    """The trainer's counters, saved in every checkpoint."""

    step: int = 0  # device steps done: the position in the data order
    micro: int = 0  # backward passes (or skipped ones) since the start: the accumulation clock
    opt_step: int = 0  # optimizer steps taken or skipped
    skipped_updates: int = 0
    skipped_in_a_row: int = 0
    reward_errors: int = 0
    elapsed_s: float = 0.0
    eval_before: dict | None = None
    order_digest: str = ""


class Setup:
    """One run's parts, built from a validated config in this order: the checks, the policy,
    the data, the engine, the data order and step counts, the resumed policy, the optimizer,
    the resumed training state, and the update's settings."""

    def __init__(self, cfg: TrainConfig, reward_fn, progress: bool):
        self.cfg = cfg
        self.group = init_group(cfg.device)
        self.main = self.group.main  # rank 0 alone writes files and prints
        self.show = progress and self.main
        self._check()
        if reward_fn is not None and cfg.format_reward:
            raise ConfigError("--format-reward credits the task's own reward's format: not a reward_fn passed in")
        # the held-out check's score; the rollouts' reward may add the format credit
        self.reward_fn = reward_fn or get_reward_fn(cfg.task)
        self.train_reward_fn = reward_fn or get_reward_fn(cfg.task, format_credit=cfg.format_reward)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device, self.group.local_rank)
        model, self.tokenizer = load_base_model(cfg.model, self.device, resolve_dtype(cfg.dtype, self.device))
        self.hm = build_policy(model, cfg)
        self._load_data()
        self._make_engine(model)
        self._schedule()
        self._resume_policy()
        if cfg.fsdp and self.group.active:
            shard_layers(self.hm, self.group)
        self.opt, self.sched = make_optimizer(self.hm, cfg, self.opt_steps)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.state = Progress(order_digest=order_digest(self.order))
        self.records: list[dict] = []
        if self.resume_from is not None:
            self._resume_training(self.resume_from)
        if cfg.gradient_checkpointing:
            self.hm.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.update = self._update_settings()

    def _check(self) -> None:
        """What can be refused before loading anything: the step's split over the processes,
        the output folder, a resume's config, the metrics backend."""
        cfg = self.cfg
        self.prompts_per_step = cfg.batch_size // cfg.group_size
        if self.prompts_per_step % self.group.world:
            raise ConfigError(
                f"--batch-size / --group-size = {self.prompts_per_step} prompts per step do not split "
                f"evenly over {self.group.world} processes (whole groups per process)"
            )
        self.run_dir = RunDir(cfg.output_dir, cfg.overwrite, cfg.resume)  # checks only: writes nothing
        self.ckpt_root = self.run_dir.root / "checkpoints"
        if cfg.resume:
            check_resumable(saved_config(self.run_dir.root), cfg)
        if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install 'hrpo[tensorboard]'")

    def _load_data(self) -> None:
        """The training and held-out examples, and the training prompts (the held-out ones are
        encoded too, to fail now rather than after training)."""
        cfg = self.cfg
        self.system = SYSTEM_PROMPT if cfg.system_prompt else None
        self.train_ex = load_examples(cfg, "train", cfg.data, cfg.train_limit)
        self.eval_ex = load_examples(cfg, "test", heldout_sources(cfg), cfg.eval_limit)
        self.train_prompts = encode_prompts(
            self.tokenizer, user_messages(cfg.task, self.train_ex), cfg.max_prompt_length, self.system
        )
        encode_prompts(self.tokenizer, user_messages(cfg.task, self.eval_ex), cfg.max_prompt_length, self.system)

    def _make_engine(self, model) -> None:
        """The rollout engine, training's sampling and the held-out check's greedy decoding."""
        cfg = self.cfg
        matcher = MarkerMatcher(self.tokenizer, cfg.marker, model.config.vocab_size)
        eos = eos_token_ids(model, self.tokenizer)
        self.sampling = SamplingConfig(
            cfg.max_completion_length,
            cfg.temperature,
            cfg.top_k,
            greedy=False,
            hybrid=cfg.hybrid,
            latent=latent_for(cfg),
        )
        self.greedy = dataclasses.replace(self.sampling, greedy=True)
        self.engine = make_engine(self.hm, matcher, eos, self.tokenizer.pad_token_id, kind=cfg.engine)

    def _schedule(self) -> None:
        """The data order (every epoch shuffled) and the device and optimizer steps it makes."""
        cfg, n = self.cfg, len(self.train_ex)
        self.order = [i for _ in range(cfg.epochs) for i in random.sample(range(n), n)]
        self.device_steps = len(self.order) // self.prompts_per_step
        if cfg.max_steps is not None:
            # each device step makes num_iterations passes, and grad_accum passes make an optimizer step
            self.device_steps = min(self.device_steps, math.ceil(cfg.max_steps * cfg.grad_accum / cfg.num_iterations))
        if self.device_steps == 0:
            raise ConfigError(
                f"{n} training examples make no step of {self.prompts_per_step} prompts "
                f"(--batch-size {cfg.batch_size} / --group-size {cfg.group_size})"
            )
        self.opt_steps = math.ceil(self.device_steps * cfg.num_iterations / cfg.grad_accum)

    def _resume_policy(self) -> None:
        """--resume: the latest complete checkpoint's policy, loaded before any sharding."""
        self.resume_from = None
        if not self.cfg.resume:
            return
        found = complete_checkpoints(self.ckpt_root)
        if not found:
            raise ConfigError(
                f"nothing to resume in {self.run_dir.root} (no complete checkpoint); start over with --overwrite"
            )
        self.resume_from = found[-1]
        load_checkpoint(self.hm, self.resume_from)

    def _resume_training(self, path: Path) -> None:
        """--resume: the optimizer, schedule, RNG, counters and metrics of the checkpoint."""
        trainer, self.records = load_training_state(
            path, self.hm, self.opt, self.sched, self.generator, self.group.rank, self.group.world
        )
        self.state = Progress(**trainer)
        if self.state.order_digest != order_digest(self.order):
            raise ConfigError(f"--resume: {path} was trained on another data order (the training data changed)")

    def _update_settings(self) -> UpdateSettings:
        cfg = self.cfg
        # Prefix sharing runs the body once or twice per micro-batch depending on its data (its
        # completions' width); under FSDP each run is a collective, so there it is off: one
        # body run per micro-batch, real or padding, on every rank.
        sharded = cfg.fsdp and self.group.active
        logprob_t = cfg.temperature if cfg.logprob_temperature is None else cfg.logprob_temperature
        return UpdateSettings(
            logprob_t,
            cfg.hybrid,
            cfg.beta,
            cfg.epsilon,
            cfg.loss_norm,
            cfg.max_completion_length,
            cfg.micro_batch_tokens,
            share_prefix=not (cfg.gradient_checkpointing or sharded),
            latent=latent_for(cfg),
            top_k=cfg.top_k,
        )

    def say(self, line: str, err: bool = False) -> None:
        """A line on the terminal, from rank 0 only."""
        if self.main:
            tqdm.write(line, file=sys.stderr if err else sys.stdout)
