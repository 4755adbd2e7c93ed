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
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from hrpo.core.distributed import clip_grad_norm, finish_group, init_group, shard, shard_layers
from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import SYSTEM_PROMPT, encode_prompts
from hrpo.core.signals import SignalStop, StopRequests, stop_at_once
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.eval import decode_completions, evaluate
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import (
    ALIASES,
    build_policy,
    cpu_threads,
    eos_token_ids,
    load_base_model,
    quiet_libraries,
    recorded_name,
    resolve_device,
    resolve_dtype,
)
from hrpo.tasks import get_task, load_examples, user_messages
from hrpo.tasks.reward_guard import all_finite, score
from hrpo.tasks.rewards import get_reward_fn
from hrpo.training.checkpoint import (
    all_ranks_rng,
    capture_rng,
    complete_checkpoints,
    load_checkpoint,
    load_training_state,
    policy_tensors,
    prune_checkpoints,
    save_checkpoint,
    save_training_checkpoint,
    step_folder,
)
from hrpo.training.config import (
    STEPS,
    HelpFormatter,
    TrainConfig,
    add_config_args,
    check_resumable,
    config_for,
    latent_for,
    resume_config,
    saved_config,
    validate_config,
)
from hrpo.training.loss import group_advantages, tis_weights
from hrpo.training.plots import plot_curves
from hrpo.training.reporting import MetricsLog, json_safe, peak_memory
from hrpo.training.runs import MANIFEST, RunDir, write_json
from hrpo.training.update import UpdateSettings, micro_batches, policy_backward, policy_logprobs, reference_logprobs


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many skipped updates in a row), after a checkpoint."""


class Interrupted(RuntimeError):
    """SIGTERM or Ctrl-C: the run saved a checkpoint and stopped; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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
    opt = torch.optim.AdamW(
        param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
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


class Trainer:
    """One run: set up from a validated config, then `run()`."""

    def __init__(self, cfg: TrainConfig, reward_fn, progress: bool):
        self.cfg = cfg
        self.group = init_group(cfg.device)
        self.main = self.group.main  # rank 0 alone writes files and prints
        self.show = progress and self.main
        self.prompts_per_step = cfg.batch_size // cfg.group_size
        if self.prompts_per_step % self.group.world:
            raise ConfigError(f"--batch-size / --group-size = {self.prompts_per_step} prompts per step do not split "
                              f"evenly over {self.group.world} processes (whole groups per process)")
        self.run_dir = RunDir(cfg.output_dir, cfg.overwrite, cfg.resume)  # checks only: writes nothing
        if cfg.resume:
            check_resumable(saved_config(self.run_dir.root), cfg)
        if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install 'hrpo[tensorboard]'")
        self.reward_fn = reward_fn or get_reward_fn(cfg.task)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device, self.group.local_rank)
        model, self.tokenizer = load_base_model(cfg.model, self.device, resolve_dtype(cfg.dtype, self.device))
        self.hm = build_policy(model, cfg)
        self.system = SYSTEM_PROMPT if cfg.system_prompt else None
        self.train_ex = load_examples(cfg, "train", cfg.data, cfg.train_limit)
        self.eval_ex = load_examples(cfg, "test", heldout_sources(cfg), cfg.eval_limit)
        self.train_prompts = encode_prompts(self.tokenizer, user_messages(cfg.task, self.train_ex), cfg.max_prompt_length,
                                            self.system)
        # fail now, not after training
        encode_prompts(self.tokenizer, user_messages(cfg.task, self.eval_ex), cfg.max_prompt_length, self.system)
        self.matcher = MarkerMatcher(self.tokenizer, cfg.marker, model.config.vocab_size)
        self.eos = eos_token_ids(model, self.tokenizer)
        self.sampling = SamplingConfig(cfg.max_completion_length, cfg.temperature, cfg.top_k, greedy=False, hybrid=cfg.hybrid,
                                       latent=latent_for(cfg))
        self.greedy = dataclasses.replace(self.sampling, greedy=True)
        self.engine = make_engine(self.hm, self.matcher, self.eos, self.tokenizer.pad_token_id, kind=cfg.engine)

        self.order = [i for _ in range(cfg.epochs) for i in random.sample(range(len(self.train_ex)), len(self.train_ex))]
        self.device_steps = len(self.order) // self.prompts_per_step
        if cfg.max_steps is not None:
            # each device step makes num_iterations passes, and grad_accum passes make an optimizer step
            self.device_steps = min(self.device_steps, math.ceil(cfg.max_steps * cfg.grad_accum / cfg.num_iterations))
        if self.device_steps == 0:
            raise ConfigError(f"{len(self.train_ex)} training examples make no step of {self.prompts_per_step} prompts "
                              f"(--batch-size {cfg.batch_size} / --group-size {cfg.group_size})")
        self.opt_steps = math.ceil(self.device_steps * cfg.num_iterations / cfg.grad_accum)
        self.ckpt_root = self.run_dir.root / "checkpoints"
        self.resume_from = None
        if cfg.resume:
            found = complete_checkpoints(self.ckpt_root)
            if not found:
                raise ConfigError(f"nothing to resume in {self.run_dir.root} (no complete checkpoint); "
                                  "start over with --overwrite")
            self.resume_from = found[-1]
            load_checkpoint(self.hm, self.resume_from)  # the policy, before any sharding
        if cfg.fsdp and self.group.active:
            shard_layers(self.hm, self.group)
        self.opt, self.sched = make_optimizer(self.hm, cfg, self.opt_steps)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.state = Progress(order_digest=self._order_digest())
        self.records: list[dict] = []
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.last_saved = self.state.step if cfg.resume else -1
        self.progressed = False  # a device step finished in this process: no rollback from here on
        self.poisoned = False  # a micro-batch of this accumulation window had a non-finite loss
        if cfg.gradient_checkpointing:
            self.hm.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Prefix sharing runs the body once or twice per micro-batch depending on its data (its
        # completions' width); under FSDP each run is a collective, so there it is off: one
        # body run per micro-batch, real or padding, on every rank.
        sharded = cfg.fsdp and self.group.active
        logprob_t = cfg.temperature if cfg.logprob_temperature is None else cfg.logprob_temperature
        self.update = UpdateSettings(logprob_t, cfg.hybrid, cfg.beta, cfg.epsilon, cfg.loss_norm,
                                     cfg.max_completion_length, cfg.micro_batch_tokens,
                                     share_prefix=not (cfg.gradient_checkpointing or sharded), latent=latent_for(cfg),
                                     top_k=cfg.top_k)

    # ------------------------------------------------------------------ checkpoints

    def _order_digest(self) -> str:
        """Names the data order, so a resume on changed data is refused rather than misread."""
        return hashlib.sha256(json.dumps(self.order).encode()).hexdigest()[:16]

    def _load(self, path: Path) -> None:
        trainer, self.records = load_training_state(path, self.hm, self.opt, self.sched, self.generator,
                                                    self.group.rank, self.group.world)
        self.state = Progress(**trainer)
        if self.state.order_digest != self._order_digest():
            raise ConfigError(f"--resume: {path} was trained on another data order (the training data changed)")

    def checkpoint(self, rng=None) -> Path:
        """A resumable checkpoint of the state now (rng: this rank's RNG states to record
        instead of the current ones, for a step that failed part way). Every rank calls it;
        rank 0 writes it, with every rank's RNG states."""
        tensors, meta = rng or capture_rng(self.generator)
        every = all_ranks_rng(list(zip(self.group.gather_tensors(tensors), self.group.gather(meta))))
        path = step_folder(self.ckpt_root, self.state.step)
        failure = None
        try:  # every rank: FSDP's shards are gathered; rank 0 writes
            save_training_checkpoint(step_folder(self.run_dir.path("checkpoints") if self.main else self.ckpt_root,
                                                 self.state.step),
                                     self.hm, recorded_name(self.cfg.model), self._policy_meta(), self.opt, self.sched, every,
                                     dataclasses.asdict(self.state), self.records, write=self.main)
            if self.main:
                prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints)
                self._plot()
        except Exception as err:  # a full disk: every rank stops, not just this one
            failure = err
        if self.group.any(failure is not None):
            raise failure or RuntimeError("rank 0 failed to save a checkpoint")
        self.last_saved = self.state.step
        return path

    def _policy_meta(self) -> dict:
        latent = latent_for(self.cfg)
        return {"task": self.cfg.task, "hybrid": self.cfg.hybrid, "method": self.cfg.method,
                "latent_mode": latent.mode, "noise_std": latent.noise_std,
                "marker": self.cfg.marker, "system_prompt": self.cfg.system_prompt, "step": self.state.step}

    def _plot(self) -> None:
        if self.records:
            plot_curves(self.records, self.run_dir.path("curves.png"),
                        f"{'HRPO' if self.cfg.hybrid else 'GRPO'} on {self.cfg.task}, seed {self.cfg.seed}")

    # ------------------------------------------------------------------ evaluation

    def heldout(self, examples, how: SamplingConfig) -> dict:
        """Accuracy on `examples`, each rank evaluating its share, the samples merged."""
        cfg = self.cfg
        mine = shard(list(range(len(examples))), self.group)
        run = mine
        if cfg.fsdp and self.group.active:
            # Generation under FSDP makes collectives (the engine's gathers, the reference loop's
            # forwards): every rank runs as many examples, so as many batches; the repeats of the
            # last example that fill a shorter share are dropped below.
            run = mine + [mine[-1] if mine else 0] * (-(-len(examples) // self.group.world) - len(mine))
        result = evaluate(self.hm.eval(), self.tokenizer, get_task(cfg.task), [examples[i] for i in run], how,
                          self.engine, progress=self.show, max_prompt_length=cfg.max_prompt_length,
                          system=self.system, batch_size=cfg.eval_batch_size, seed=cfg.seed, reward_fn=self.reward_fn,
                          reward_timeout=cfg.reward_timeout, indices=run)
        result["samples"] = result["samples"][: len(mine)]
        if self.group.active:
            samples = sorted((s for part in self.group.gather(result["samples"]) for s in part), key=lambda s: s["index"])
            n = max(len(samples), 1)
            result.update(samples=samples, n=len(samples), accuracy=sum(s["correct"] for s in samples) / n,
                          mean_completion_tokens=sum(s["completion_tokens"] for s in samples) / n)
        return result

    def heldout_both(self, when: str) -> tuple[dict, dict]:
        """Greedy accuracy (the headline) and accuracy when sampling as in training."""
        greedy, sampled = self.heldout(self.eval_ex, self.greedy), self.heldout(self.eval_ex, self.sampling)
        self.say(f"held-out accuracy {when} training: {greedy['accuracy']:.3f} greedy, "
              f"{sampled['accuracy']:.3f} sampled (T={self.cfg.temperature}), {greedy['n']} examples")
        return greedy, sampled

    # ------------------------------------------------------------------ one step

    def optimizer_step(self) -> tuple[float | None, bool]:
        """Clip and step; a non-finite gradient norm drops the accumulated update instead.
        Returns (gradient norm, whether the update was dropped)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.state.opt_step += 1
        norm, dropped = None, self.poisoned
        if any(p.grad is not None for p in params) and not dropped:
            self.group.sum_grads(params)  # each rank's share summed: the whole batch's gradient
            norm = clip_grad_norm(params, self.cfg.max_grad_norm, self.group)
            dropped = not math.isfinite(norm)
            if not dropped:
                self.opt.step()
        self.poisoned = False
        with warnings.catch_warnings():  # a schedule that steps past a dropped first update is intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm, dropped

    def device_step(self, s: int) -> dict:
        """One device step: this rank rolls out its share of the step's prompts (whole groups,
        with the noise those rows have in the whole batch), scores them, and accumulates its
        share of the whole batch's gradient; the optimizer steps every grad_accum of them."""
        cfg, hm, group = self.cfg, self.hm, self.group
        idx = shard(self.order[s * self.prompts_per_step : (s + 1) * self.prompts_per_step], group)
        prompts = [self.train_prompts[i] for i in idx for _ in range(cfg.group_size)]
        answers = [self.train_ex[i].answer for i in idx for _ in range(cfg.group_size)]
        rows = (group.rank * len(prompts), cfg.batch_size)
        rng_before = capture_rng(self.generator)
        times, failure = {}, None
        try:  # nothing has touched the weights or gradients yet: a failure here can be checkpointed
            hm.eval()
            t = time.perf_counter()
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
            with peak_memory(self.device) as mem_rollout:
                out = self.engine.generate(prompts, self.sampling, seed=seed, rows=rows)
            times["time_rollout_s"] = time.perf_counter() - t
            times["mem_rollout_gb"] = mem_rollout()
            t = time.perf_counter()
            rewards, errors = score(self.reward_fn, decode_completions(self.tokenizer, out), answers, cfg.reward_timeout)
            times["time_reward_s"] = time.perf_counter() - t
        except Exception as err:
            failure = err
        if group.any(failure is not None):  # every rank stops here together
            if self.state.step > self.last_saved and self.state.step > 0:
                path = self.checkpoint(rng=rng_before)
                self.say(f"hrpo: step {s} failed; the state before it is saved in {path}", err=True)
            raise failure or RuntimeError(f"step {s} failed on another process")
        skipped = None if not group.any(not all_finite(rewards)) else "non-finite reward"
        reward_t = torch.tensor(rewards, dtype=torch.float32, device=self.device)

        plan = micro_batches(out, cfg.micro_batch_tokens)
        length = group.max(len(plan))  # under FSDP each micro-batch is a collective: every rank runs as many
        t = time.perf_counter()
        with peak_memory(self.device) as mem_ref:
            ref = reference_logprobs(hm, out, plan, self.update, length) if skipped is None and cfg.beta else None
        times["time_reference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        hm.train()
        loss_value, info, grad_norm = float("nan"), {"kl": float("nan"), "clip_frac": float("nan")}, None
        adv = group_advantages(reward_t, cfg.group_size) if skipped is None else None
        n_tokens = float(out.completion_mask.sum())
        total_tokens = group.sum([n_tokens])[0]  # the dapo normalisation's count: the whole batch's
        policy_s = 0.0
        with peak_memory(self.device) as mem_policy:
            # The training forward's own log-probs before any update: the clipped ratio's "old"
            # side (the engine's come from other, merged and rounded, weights) and TIS's numerator.
            old = (policy_logprobs(hm, out, plan, self.update, length)
                   if skipped is None and (cfg.num_iterations > 1 or cfg.tis is not None) else None)
            tis = tis_weights(old, out.logprobs, cfg.tis) if old is not None and cfg.tis is not None else None
            for _ in range(cfg.num_iterations):
                if skipped is None:
                    loss_value, info, finite = policy_backward(
                        hm, out, plan, adv, ref, old if cfg.num_iterations > 1 else None, self.update,
                        scale=1.0 / cfg.grad_accum, rows=cfg.batch_size, tokens=total_tokens, length=length, tis=tis)
                    if group.any(not finite):
                        skipped, self.poisoned = "non-finite loss", True
                policy_s = time.perf_counter() - t
                self.state.micro += 1
                if self.state.micro % cfg.grad_accum == 0:
                    grad_norm, dropped = self.optimizer_step()
                    if dropped and skipped is None:
                        skipped = "non-finite gradient"
        times["time_update_s"] = time.perf_counter() - t
        times["time_policy_s"], times["time_optimizer_s"] = policy_s, times["time_update_s"] - policy_s
        times["mem_reference_gb"], times["mem_policy_gb"] = mem_ref(), mem_policy()

        if skipped:
            self.state.skipped_updates += 1
            self.state.skipped_in_a_row += 1
            self.say(f"step {s}: update skipped ({skipped}); {self.state.skipped_in_a_row} in a row")
        else:
            self.state.skipped_in_a_row = 0
        self.state.step = s + 1
        gates = out.gate_mean[torch.isfinite(out.gate_mean)]
        (reward_sum, loss_sum, kl_sum, clipped, comp, think, gate_sum, gate_n, upd_tokens, errs,
         tok_s) = group.sum([sum(rewards), loss_value, info["kl"] * len(rewards), info["clip_frac"] * n_tokens,
                             n_tokens, float(out.think_mask.sum()), float(gates.sum()), float(gates.numel()),
                             float(out.prompt_mask.sum()) + n_tokens, float(errors), out.stats["tokens_per_s"]])
        self.state.reward_errors += int(errs)
        n = cfg.batch_size
        return {
            "step": s,
            "opt_step": self.state.opt_step,
            "reward": reward_sum / n,
            "loss": loss_sum,  # each rank's share is already normalised by the whole batch
            "completion_tokens": comp / n,
            "gate_a": gate_sum / gate_n if cfg.hybrid and gate_n else float("nan"),
            "think_frac": think / max(comp, 1.0),
            "lr_lora": self.opt.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "skipped": skipped,
            "skipped_updates": self.state.skipped_updates,
            "reward_errors": self.state.reward_errors,
            "rollout_tokens_per_s": tok_s,
            "update_tokens": int(upd_tokens),
            **times,
            "kl": kl_sum / n,
            "clip_frac": clipped / max(comp, 1.0),
        }

    # ------------------------------------------------------------------ the run

    def say(self, line: str, err: bool = False) -> None:
        """A line on the terminal, from rank 0 only."""
        if self.main:
            tqdm.write(line, file=sys.stderr if err else sys.stdout)

    def open_run(self) -> None:
        """Take the output folder (after every check has passed) and write the config."""
        if self.main:
            self.run_dir.open()
            if not self.cfg.resume:
                write_json(self.run_dir.path("config.json"), {**dataclasses.asdict(self.cfg), "world_size": self.group.world})

    def run(self) -> dict:
        cfg, run = self.cfg, self.run_dir
        self.open_run()
        try:
            if not cfg.resume:
                before, before_sampled = self.heldout_both("before")
                self.state.eval_before = {"greedy": before["accuracy"], "sampled": before_sampled["accuracy"], "n": before["n"]}
                if self.main:
                    write_json(run.path("eval_before.json"), before)
            else:
                self.say(f"resuming from {self.resume_from} (step {self.state.step} of {self.device_steps})")
            log = None
            if self.main:
                tb = run.path("tensorboard") if cfg.report_to == "tensorboard" else None
                log = MetricsLog(run.path("metrics.jsonl"), self.records, tb, self.state.step)
            with StopRequests() as stop:
                try:
                    self._loop(log, stop)
                finally:
                    if log is not None:
                        log.close()
            return self._finish()
        except TrainingStopped as err:
            if self.main:
                write_json(run.path("summary.json"), self._summary(status=f"stopped: {err}"))
            raise
        except BaseException as err:
            if not self.progressed and self.main:
                run.rollback()
            if isinstance(err, SignalStop):  # a second Ctrl-C, or a signal outside the training loop
                raise self._stopped(err.signum) from None
            raise

    def _stopped(self, signum: int) -> Interrupted:
        name = signal.Signals(signum).name
        if not self.progressed:
            return Interrupted(f"stopped by {name} before the first step; nothing to resume", signum)
        found = complete_checkpoints(self.ckpt_root)
        where = f"continue with --resume from {found[-1]}" if found else "nothing to resume"
        return Interrupted(f"stopped by {name} after {_steps(self.state.step)}; {where}", signum)

    def _loop(self, log: MetricsLog, stop: StopRequests) -> None:
        cfg = self.cfg
        start = time.perf_counter() - self.state.elapsed_s
        bar = tqdm(total=self.device_steps, initial=self.state.step, desc="hrpo" if cfg.hybrid else "grpo",
                   disable=not self.show)
        for s in range(self.state.step, self.device_steps):
            record = self.device_step(s)
            boundary = self.state.micro % cfg.grad_accum == 0
            if boundary and cfg.eval_every and self.state.opt_step % cfg.eval_every == 0:
                limited = self.eval_ex[: cfg.eval_every_limit]
                record["eval_accuracy"] = self.heldout(limited, self.greedy)["accuracy"]
                self.say(f"step {s}: held-out accuracy {record['eval_accuracy']:.3f} (greedy, {len(limited)} examples)")
            self.state.elapsed_s = time.perf_counter() - start
            record["elapsed_s"] = self.state.elapsed_s
            self.records.append(json_safe(record))
            if log is not None:
                log.append(record)
            if not self.progressed:
                self.progressed = True
                if self.main:
                    self.run_dir.started()
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
            if self.state.skipped_in_a_row >= cfg.max_skipped_in_a_row:
                path = self.checkpoint()
                raise TrainingStopped(f"stopped at step {s}: {self.state.skipped_in_a_row} updates in a row were skipped "
                                      f"(last: {record['skipped']}); the last good state is saved in {path}")
            if self.group.any(stop.signum is not None):  # a signal to any process stops them all here
                path = self.checkpoint()
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                bar.close()
                raise Interrupted(f"stopped by {name} after {_steps(self.state.step)}; checkpoint {path}; "
                                  "continue with --resume", stop.signum or signal.SIGTERM)
            if boundary and cfg.save_every and self.state.opt_step % cfg.save_every == 0 and s + 1 < self.device_steps:
                self.checkpoint()
        bar.close()
        if self.last_saved != self.state.step:
            self.checkpoint()

    def _finish(self) -> dict:
        run = self.run_dir
        after, after_sampled = self.heldout_both("after")
        summary = self._summary("finished", after, after_sampled)
        policy = policy_tensors(self.hm)  # every rank: FSDP's shards are gathered
        if self.main:
            save_checkpoint(self.hm, run.path("checkpoint"), recorded_name(self.cfg.model), self._policy_meta(), policy)
            self._plot()
            write_json(run.path("eval_after.json"), after)
            write_json(run.path("summary.json"), summary)
        return summary

    def _summary(self, status: str, after: dict | None = None, after_sampled: dict | None = None) -> dict:
        cfg, before = self.cfg, self.state.eval_before or {}
        return {
            "status": status,
            "task": cfg.task,
            "world_size": self.group.world,
            "hybrid": cfg.hybrid,
            "seed": cfg.seed,
            "accuracy_before": before.get("greedy"),
            "accuracy_after": after["accuracy"] if after else None,
            "sampled_accuracy_before": before.get("sampled"),
            "sampled_accuracy_after": after_sampled["accuracy"] if after_sampled else None,
            "eval_examples": after["n"] if after else before.get("n"),
            "device_steps": self.state.step,
            "optimizer_steps": self.state.opt_step,
            "skipped_updates": self.state.skipped_updates,
            "reward_errors": self.state.reward_errors,
            "train_seconds": self.state.elapsed_s,
            "final_gate_a": self.records[-1]["gate_a"] if self.records else None,
            **self._throughput(),
        }

    def _throughput(self) -> dict:
        """Completions per hour of training, and tokens per second of the rollout (new tokens)
        and of the update (prompt and completion tokens through the reference pass, the
        policy's forward and backward and the optimizer)."""
        recs = self.records

        def total(key):
            return sum(r.get(key) or 0.0 for r in recs)

        rollout_s, update_s = total("time_rollout_s"), total("time_reference_s") + total("time_update_s")
        new_tokens = sum((r.get("completion_tokens") or 0.0) * self.cfg.batch_size for r in recs)
        return {
            "completions_per_hour": len(recs) * self.cfg.batch_size / max(self.state.elapsed_s, 1e-9) * 3600,
            "rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9),
            "update_tokens_per_s": total("update_tokens") / max(update_s, 1e-9),
        }


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


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
        raise ConfigError(f"--task {cfg.task} needs --model (a hub name, a folder, a .gguf, or "
                          f"{' or '.join(ALIASES)})")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per TrainConfig field, in sections, each with its help,
    default and choices (hrpo.training.config documents them)."""
    steps = textwrap.fill(f"{STEPS} A benchmark task trains with its family's recipe.", width=100,
                          break_on_hyphens=False)
    p = argparse.ArgumentParser(prog="python -m hrpo.train", description=f"{__doc__}\n{steps}",
                                formatter_class=HelpFormatter)
    add_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    # not a TrainConfig field: how the command talks, not what the run is
    p.add_argument("--verbose", action="store_true", help="show third-party warnings and model-loading progress bars")
    args = p.parse_args(argv)
    verbose = args.verbose
    given = {k: v for k, v in vars(args).items() if v is not None and k != "verbose"}
    torch.set_num_threads(cpu_threads())
    try:
        with stop_at_once(), quiet_libraries(verbose):
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
            summary = train(cfg)
    except SignalStop as err:  # before the run took its folder: loading the model or the data
        print(f"hrpo: stopped by {signal.Signals(err.signum).name} before the first step; nothing to resume",
              file=sys.stderr)
        return 128 + err.signum
    except Interrupted as err:
        print(f"hrpo: {err}", file=sys.stderr)
        return 128 + err.signum
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as err:  # ConfigError, DataError, ModelError, CheckpointError, a full disk...
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}", file=sys.stderr)
        return 2
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    if summary["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
        print(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} ({gain:+.3f}); run in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
