"""One device step of GRPO: roll out, reward, reference log-probs, update.

This rank rolls out its share of the step's prompts (whole groups, with the noise those rows
have in the whole batch), scores the completions, takes the reference policy's log-probs and
accumulates its share of the whole batch's gradient; the optimizer steps every `grad_accum`
backward passes. A non-finite reward, loss or gradient skips the update (the weights stay as
they were) and is counted.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from hrpo.core.distributed import clip_grad_norm, shard
from hrpo.engine.rollout import Rollout
from hrpo.tasks.reward_guard import all_finite, score
from hrpo.training.checkpoint import capture_rng
from hrpo.training.evaluation import decode_completions
from hrpo.training.loss import group_advantages, tis_weights
from hrpo.training.reporting import peak_memory
from hrpo.training.setup import Setup
from hrpo.training.update import (
    micro_batches,
    policy_backward,
    policy_logprobs,
    record_gumbel_targets,
    reference_logprobs,
)


class StepFailed(RuntimeError):
    """The rollout or reward of a step failed on some process, before anything touched the
    weights: `error` is this process's failure, `rng` its RNG states from before the step,
    so the state before the step can be checkpointed."""

    def __init__(self, error: BaseException, rng):
        super().__init__(str(error))
        self.error, self.rng = error, rng


class Stepper(Setup):
    """A Setup that takes device steps (`device_step`) and optimizer steps (`optimizer_step`)."""

    def __init__(self, cfg, reward_fn, progress: bool):
        super().__init__(cfg, reward_fn, progress)
        self.poisoned = False  # a micro-batch of this accumulation window had a non-finite loss

    def device_step(self, s: int) -> dict:
        """Device step `s`: roll out and score, then (unless a reward is non-finite on some
        rank) the reference pass and the update. Returns the step's metrics."""
        times = {}
        out, rewards, errors = self.rollout(s, times)
        skipped = "non-finite reward" if self.group.any(not all_finite(rewards)) else None
        plan = micro_batches(out, self.cfg.micro_batch_tokens)
        length = self.group.max(len(plan))  # under FSDP each micro-batch is a collective: every rank runs as many
        record_gumbel_targets(self.hm, out, plan, self.update, length)  # gumbel-soft's g', before any pass scores it
        t = time.perf_counter()
        with peak_memory(self.device) as mem_ref:
            ref = (
                reference_logprobs(self.hm, out, plan, self.update, length)
                if skipped is None and self.cfg.beta
                else None
            )
        times["time_reference_s"] = time.perf_counter() - t
        times["mem_reference_gb"] = mem_ref()
        loss, info, grad_norm, skipped = self.learn(out, plan, length, rewards, ref, skipped, times)
        if skipped:
            self.state.skipped_updates += 1
            self.state.skipped_in_a_row += 1
            self.say(f"step {s}: update skipped ({skipped}); {self.state.skipped_in_a_row} in a row")
        else:
            self.state.skipped_in_a_row = 0
        self.state.step = s + 1
        return self.metrics(s, out, rewards, errors, loss, info, grad_norm, skipped, times)

    def rollout(self, s: int, times: dict) -> tuple[Rollout, list[float], int]:
        """This rank's completions of step s's prompts, their rewards and the count of reward
        calls that failed. A failure on any rank raises StepFailed on every rank."""
        cfg, group = self.cfg, self.group
        idx = shard(self.order[s * self.prompts_per_step : (s + 1) * self.prompts_per_step], group)
        prompts = [self.train_prompts[i] for i in idx for _ in range(cfg.group_size)]
        answers = [self.train_ex[i].answer for i in idx for _ in range(cfg.group_size)]
        row_span = (group.rank * len(prompts), cfg.batch_size)  # where this rank's rows sit in the whole batch
        rng_before = capture_rng(self.generator)
        failure = None
        try:
            self.hm.eval()
            t = time.perf_counter()
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
            with peak_memory(self.device) as mem_rollout:
                out = self.engine.generate(prompts, self.sampling, seed=seed, row_span=row_span)
            times["time_rollout_s"] = time.perf_counter() - t
            times["mem_rollout_gb"] = mem_rollout()
            t = time.perf_counter()
            rewards, errors = score(
                self.train_reward_fn, decode_completions(self.tokenizer, out), answers, cfg.reward_timeout
            )
            times["time_reward_s"] = time.perf_counter() - t
        except Exception as err:
            failure = err
        if group.any(failure is not None):  # every rank stops here together
            raise StepFailed(failure or RuntimeError(f"step {s} failed on another process"), rng_before)
        return out, rewards, errors

    def learn(
        self, out: Rollout, plan, length: int, rewards: list[float], ref, skipped: str | None, times: dict
    ) -> tuple[float, dict, float | None, str | None]:
        """num_iterations backward passes of the GRPO loss over this rollout (none when
        `skipped`), each counted on the accumulation clock. Returns the loss, its info (kl,
        clip_frac), the last optimizer step's gradient norm and why the update was skipped."""
        cfg, group = self.cfg, self.group
        t = time.perf_counter()
        self.hm.train()
        loss, info, grad_norm = float("nan"), {"kl": float("nan"), "clip_frac": float("nan")}, None
        reward_t = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        adv = group_advantages(reward_t, cfg.group_size) if skipped is None else None
        # the dapo normalisation's count: the whole batch's tokens
        total_tokens = group.sum([float(out.completion_mask.sum())])[0]
        policy_s = 0.0
        with peak_memory(self.device) as mem_policy:
            # The training forward's own log-probs before any update: the clipped ratio's "old"
            # side (the engine's come from other, merged and rounded, weights) and TIS's numerator.
            old = (
                policy_logprobs(self.hm, out, plan, self.update, length)
                if skipped is None and (cfg.num_iterations > 1 or cfg.tis is not None)
                else None
            )
            tis = tis_weights(old, out.logprobs, cfg.tis) if old is not None and cfg.tis is not None else None
            for _ in range(cfg.num_iterations):
                if skipped is None:
                    loss, info, finite = policy_backward(
                        self.hm,
                        out,
                        plan,
                        adv,
                        ref,
                        old if cfg.num_iterations > 1 else None,
                        self.update,
                        scale=1.0 / cfg.grad_accum,
                        n_rows=cfg.batch_size,
                        n_tokens=total_tokens,
                        length=length,
                        tis=tis,
                    )
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
        times["mem_policy_gb"] = mem_policy()
        return loss, info, grad_norm, skipped

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

    def metrics(
        self,
        s: int,
        out: Rollout,
        rewards: list[float],
        errors: int,
        loss: float,
        info: dict,
        grad_norm: float | None,
        skipped: str | None,
        times: dict,
    ) -> dict:
        """The step's record, summed over the ranks (one collective) and averaged over the batch."""
        cfg = self.cfg
        n_tokens = float(out.completion_mask.sum())
        gates = out.gate_mean[torch.isfinite(out.gate_mean)]
        (reward_sum, full, loss_sum, kl_sum, clipped, comp, think, gate_sum, gate_n, upd_tokens, errs, tok_s) = (
            self.group.sum(
                [
                    sum(rewards),
                    float(sum(r >= 1.0 for r in rewards)),
                    loss,
                    info["kl"] * len(rewards),
                    info["clip_frac"] * n_tokens,
                    n_tokens,
                    float(out.think_mask.sum()),
                    float(gates.sum()),
                    float(gates.numel()),
                    float(out.prompt_mask.sum()) + n_tokens,
                    float(errors),
                    out.stats["tokens_per_s"],
                ]
            )
        )
        self.state.reward_errors += int(errs)
        n = cfg.batch_size
        return {
            "step": s,
            "opt_step": self.state.opt_step,
            "reward": reward_sum / n,
            "full_reward_frac": full / n,  # rollouts given the task's whole score (right), whatever --format-reward
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
