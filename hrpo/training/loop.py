"""The training loop around the device step: held-out evaluation before and after (and every
`eval_every` optimizer steps), the metrics log, resumable checkpoints every `save_every`
optimizer steps, on a signal and when the run stops itself, and the run's summary.

A run survives: resumable checkpoints are written atomically; `--resume` continues from the
latest one and reproduces the uninterrupted run; a step whose rollout or reward fails saves
the state before it; SIGTERM or Ctrl-C save and stop; too many skipped updates in a row save
and stop.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

from tqdm import tqdm

from hrpo.core.distributed import shard
from hrpo.core.signals import SignalStop, StopRequests
from hrpo.engine.rollout import SamplingConfig
from hrpo.model.loading import recorded_name
from hrpo.tasks import get_task
from hrpo.training.checkpoint import (
    all_ranks_rng,
    capture_rng,
    complete_checkpoints,
    policy_tensors,
    prune_checkpoints,
    save_checkpoint,
    save_training_checkpoint,
    step_folder,
)
from hrpo.training.config import latent_for
from hrpo.training.evaluation import evaluate
from hrpo.training.plots import plot_curves
from hrpo.training.reporting import MetricsLog, json_safe
from hrpo.training.runs import write_json
from hrpo.training.step import StepFailed, Stepper


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many skipped updates in a row), after a checkpoint."""


class Interrupted(RuntimeError):
    """SIGTERM or Ctrl-C: the run saved a checkpoint and stopped; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Trainer(Stepper):
    """One run: set up from a validated config (hrpo.training.setup), then `run()`."""

    def __init__(self, cfg, reward_fn, progress: bool):
        super().__init__(cfg, reward_fn, progress)
        self.last_saved = self.state.step if cfg.resume else -1
        self.progressed = False  # a device step finished in this process: no rollback from here on

    # ------------------------------------------------------------------ the run

    def open_run(self) -> None:
        """Take the output folder (after every check has passed) and write the config."""
        if self.main:
            self.run_dir.open()
            if not self.cfg.resume:
                write_json(
                    self.run_dir.path("config.json"), {**dataclasses.asdict(self.cfg), "world_size": self.group.world}
                )

    def run(self) -> dict:
        """Evaluate (unless resuming), train to the last device step, evaluate again and save
        the policy; returns the summary. A failure before the first step gives the folder back."""
        cfg, run = self.cfg, self.run_dir
        self.open_run()
        try:
            if not cfg.resume:
                before, before_sampled = self.heldout_both("before")
                self.state.eval_before = {
                    "greedy": before["accuracy"],
                    "sampled": before_sampled["accuracy"],
                    "n": before["n"],
                }
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

    def _loop(self, log: MetricsLog | None, stop: StopRequests) -> None:
        cfg = self.cfg
        start = time.perf_counter() - self.state.elapsed_s
        bar = tqdm(
            total=self.device_steps,
            initial=self.state.step,
            desc="hrpo" if cfg.hybrid else "grpo",
            disable=not self.show,
        )
        for s in range(self.state.step, self.device_steps):
            record = self._step(s)
            boundary = self.state.micro % cfg.grad_accum == 0
            if boundary and cfg.eval_every and self.state.opt_step % cfg.eval_every == 0:
                limited = self.eval_ex[: cfg.eval_every_limit]
                record["eval_accuracy"] = self.heldout(limited, self.greedy)["accuracy"]
                self.say(f"step {s}: held-out accuracy {record['eval_accuracy']:.3f} (greedy, {len(limited)} examples)")
            self.state.elapsed_s = time.perf_counter() - start
            record["elapsed_s"] = self.state.elapsed_s
            self._log(record, log)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
            self._stop_if_asked(s, record, stop, bar)
            if boundary and cfg.save_every and self.state.opt_step % cfg.save_every == 0 and s + 1 < self.device_steps:
                self.checkpoint()
        bar.close()
        if self.last_saved != self.state.step:
            self.checkpoint()

    def _step(self, s: int) -> dict:
        """device_step(s); when its rollout or reward fails, the state before it is saved
        (unless that is saved already) and the failure raised."""
        try:
            return self.device_step(s)
        except StepFailed as failed:
            if self.state.step > self.last_saved and self.state.step > 0:
                path = self.checkpoint(rng=failed.rng)
                self.say(f"hrpo: step {s} failed; the state before it is saved in {path}", err=True)
            raise failed.error from None

    def _log(self, record: dict, log: MetricsLog | None) -> None:
        self.records.append(json_safe(record))
        if log is not None:
            log.append(record)
        if not self.progressed:
            self.progressed = True
            if self.main:
                self.run_dir.started()

    def _stop_if_asked(self, s: int, record: dict, stop: StopRequests, bar: tqdm) -> None:
        """Save and stop after too many skipped updates in a row, or on a signal to any process."""
        if self.state.skipped_in_a_row >= self.cfg.max_skipped_in_a_row:
            path = self.checkpoint()
            raise TrainingStopped(
                f"stopped at step {s}: {self.state.skipped_in_a_row} updates in a row were skipped "
                f"(last: {record['skipped']}); the last good state is saved in {path}"
            )
        if self.group.any(stop.signum is not None):  # a signal to any process stops them all here
            path = self.checkpoint()
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            bar.close()
            raise Interrupted(
                f"stopped by {name} after {_steps(self.state.step)}; checkpoint {path}; continue with --resume",
                stop.signum or signal.SIGTERM,
            )

    def _stopped(self, signum: int) -> Interrupted:
        name = signal.Signals(signum).name
        if not self.progressed:
            return Interrupted(f"stopped by {name} before the first step; nothing to resume", signum)
        found = complete_checkpoints(self.ckpt_root)
        where = f"continue with --resume from {found[-1]}" if found else "nothing to resume"
        return Interrupted(f"stopped by {name} after {_steps(self.state.step)}; {where}", signum)

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

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, rng=None) -> Path:
        """A resumable checkpoint of the state now (rng: this rank's RNG states to record
        instead of the current ones, for a step that failed part way). Every rank calls it;
        rank 0 writes it, with every rank's RNG states."""
        tensors, meta = rng or capture_rng(self.generator)
        every = all_ranks_rng(list(zip(self.group.gather_tensors(tensors), self.group.gather(meta))))
        path = step_folder(self.ckpt_root, self.state.step)
        failure = None
        try:  # every rank: FSDP's shards are gathered; rank 0 writes
            save_training_checkpoint(
                step_folder(self.run_dir.path("checkpoints") if self.main else self.ckpt_root, self.state.step),
                self.hm,
                recorded_name(self.cfg.model),
                self._policy_meta(),
                self.opt,
                self.sched,
                every,
                dataclasses.asdict(self.state),
                self.records,
                write=self.main,
            )
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
        return {
            "task": self.cfg.task,
            "hybrid": self.cfg.hybrid,
            "method": self.cfg.method,
            "latent_mode": latent.mode,
            "noise_std": latent.noise_std,
            "gumbel_tau": latent.gumbel_tau,
            "marker": self.cfg.marker,
            "system_prompt": self.cfg.system_prompt,
            "step": self.state.step,
        }

    def _plot(self) -> None:
        if self.records:
            plot_curves(
                self.records,
                self.run_dir.path("curves.png"),
                f"{'HRPO' if self.cfg.hybrid else 'GRPO'} on {self.cfg.task}, seed {self.cfg.seed}",
            )

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
        result = evaluate(
            self.hm.eval(),
            self.tokenizer,
            get_task(cfg.task),
            [examples[i] for i in run],
            how,
            self.engine,
            progress=self.show,
            max_prompt_length=cfg.max_prompt_length,
            system=self.system,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
            reward_fn=self.reward_fn,
            reward_timeout=cfg.reward_timeout,
            indices=run,
        )
        result["samples"] = result["samples"][: len(mine)]
        if self.group.active:
            samples = sorted(
                (s for part in self.group.gather(result["samples"]) for s in part), key=lambda s: s["index"]
            )
            n = max(len(samples), 1)
            result.update(
                samples=samples,
                n=len(samples),
                accuracy=sum(s["correct"] for s in samples) / n,
                mean_completion_tokens=sum(s["completion_tokens"] for s in samples) / n,
            )
        return result

    def heldout_both(self, when: str) -> tuple[dict, dict]:
        """Greedy accuracy (the headline) and accuracy when sampling as in training."""
        greedy, sampled = self.heldout(self.eval_ex, self.greedy), self.heldout(self.eval_ex, self.sampling)
        self.say(
            f"held-out accuracy {when} training: {greedy['accuracy']:.3f} greedy, "
            f"{sampled['accuracy']:.3f} sampled (T={self.cfg.temperature}), {greedy['n']} examples"
        )
        return greedy, sampled

    # ------------------------------------------------------------------ the summary

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
