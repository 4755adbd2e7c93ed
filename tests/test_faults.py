"""Faults: non-finite rewards, losses and gradients skip their update; a reward function
that raises or hangs costs its completions, not the run; a broken one is one line."""

import json
import math
import time

import pytest
import torch
from conftest import small_config

from hrpo.tasks.reward_guard import RewardFnError, score
from hrpo.tasks.rewards import get_reward_fn
from hrpo.train import Trainer, TrainingStopped, train

arith = get_reward_fn("arith")


def trainable(hm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in hm.named_parameters() if p.requires_grad}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_reward_skips_that_update_and_counts_it(model_dir, tmp_path):
    calls = []

    def nan_in_step_1(completions, answers):
        calls.append(1)
        out = arith(completions, answers)
        return [math.nan] + out[1:] if len(calls) == 2 else out

    trainer = Trainer(small_config(model_dir, tmp_path / "run", max_steps=3), nan_in_step_1, progress=False)
    trainer.open_run()
    trainer.device_step(0)
    before = trainable(trainer.hm)
    opt_before = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.opt.state_dict()["state"].items()}
    rec = trainer.device_step(1)
    assert rec["skipped"] == "non-finite reward" and rec["skipped_updates"] == 1
    assert math.isnan(rec["reward"]) and math.isnan(rec["loss"])
    after = trainable(trainer.hm)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped update moved the weights"
    for i, s in trainer.opt.state_dict()["state"].items():  # AdamW's moments untouched too
        assert all(torch.equal(v, opt_before[i][k]) for k, v in s.items())
    rec = trainer.device_step(2)
    assert rec["skipped"] is None and trainer.state.skipped_in_a_row == 0
    assert any(not torch.equal(before[n], p) for n, p in trainable(trainer.hm).items())
    assert all(torch.isfinite(p).all() for p in trainable(trainer.hm).values())


def test_too_many_skips_in_a_row_stop_the_run_with_a_checkpoint(model_dir, tmp_path):
    def always_nan(completions, answers):
        return [math.inf] * len(completions)

    run = tmp_path / "run"
    cfg = small_config(model_dir, run, max_steps=6, max_skipped_in_a_row=3, save_every=0, eval_limit=2)
    with pytest.raises(
        TrainingStopped, match=r"^stopped at step 2: 3 updates in a row were skipped \(last: non-finite reward\)"
    ):
        train(cfg, reward_fn=always_nan, progress=False)
    recs = records(run)
    assert [r["skipped"] for r in recs] == ["non-finite reward"] * 3
    assert [r["reward"] for r in recs] == [None] * 3  # JSON null, not NaN
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_updates"] == 3 and summary["status"].startswith("stopped: stopped at step 2")
    assert (run / "checkpoints" / "step-00000003" / "adapter.safetensors").is_file()


def test_non_finite_loss_and_gradient_skip_the_update(model_dir, tmp_path, monkeypatch):
    import hrpo.training.update

    # Micro-batches of one group each: the second one's loss is NaN after the first one's
    # backward has already run, and the whole update must still be dropped.
    trainer = Trainer(
        small_config(model_dir, tmp_path / "run", max_steps=4, micro_batch_tokens=1), None, progress=False
    )
    trainer.open_run()
    real, calls = hrpo.training.update.per_token_terms, []

    def nan_on_second(*a, **k):
        calls.append(1)
        per_token, kl, clip = real(*a, **k)
        return (per_token * math.nan if len(calls) == 2 else per_token), kl, clip

    monkeypatch.setattr(hrpo.training.update, "per_token_terms", nan_on_second)
    before = trainable(trainer.hm)
    rec = trainer.device_step(0)
    assert rec["skipped"] == "non-finite loss" and len(calls) == 2
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer.hm).items())
    monkeypatch.setattr(hrpo.training.update, "per_token_terms", real)
    # A gradient that overflows to inf on one LoRA weight: the whole update is dropped.
    lora = next(p for n, p in trainer.hm.named_parameters() if "lora_A" in n)
    lora.register_hook(lambda g: g * math.inf)
    rec = trainer.device_step(1)
    assert rec["skipped"] == "non-finite gradient" and not math.isfinite(rec["grad_norm"])
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer.hm).items())
    assert trainer.state.skipped_updates == 2 and trainer.state.skipped_in_a_row == 2
    assert all(p.grad is None for p in trainer.hm.parameters())  # nothing carried into the next update


def test_reward_errors_score_zero_and_are_counted(model_dir, tmp_path, recwarn):
    def picky(completions, answers):
        if len(completions) > 1:
            raise ValueError("batch too big")
        if completions[0].count("1") > 1:
            raise ZeroDivisionError("cannot score this one")
        return [1.0]

    comps = ["a", "11", "b", "1x1"]
    rewards, errors = score(picky, comps, ["?"] * 4)
    assert rewards == [1.0, 0.0, 1.0, 0.0] and errors == 2
    msg = str(recwarn.pop(RuntimeWarning).message)
    assert msg == (
        "reward function picky: 2 of 4 completions scored 0 because the call failed "
        "(first: completion 1, ZeroDivisionError: cannot score this one)"
    )
    # Through training: the counts reach the metrics and the summary.
    run = tmp_path / "run"

    def flaky(completions, answers):
        if len(completions) > 1:
            raise RuntimeError("flaky")
        return arith(completions, answers) if len(completions[0]) % 2 else [1 / 0]

    summary = train(small_config(model_dir, run, max_steps=1, eval_limit=2), reward_fn=flaky, progress=False)
    assert summary["reward_errors"] > 0 and summary["reward_errors"] == records(run)[-1]["reward_errors"]
    assert summary["status"] == "finished"


def test_a_hanging_reward_call_times_out(recwarn):
    def slow_on_x(completions, answers):
        if "x" in completions:
            time.sleep(30)
        return [0.5] * len(completions)

    start = time.monotonic()
    rewards, errors = score(slow_on_x, ["a", "x", "b"], [1, 2, 3], timeout=0.2)
    assert rewards == [0.5, 0.0, 0.5] and errors == 1
    assert time.monotonic() - start < 10  # two limited calls, not a 30 s sleep
    assert "RewardTimeout: took longer than 0.2 s" in str(recwarn.pop(RuntimeWarning).message)


@pytest.mark.parametrize(
    "returned,message",
    [
        (None, "reward function broken returned NoneType, expected a list of 3 numbers"),
        ([1.0, 0.0], "reward function broken returned 2 values for 3 completions"),
        ("110", "reward function broken returned str, expected a list of 3 numbers"),
        ([1.0, None, 0.0], "reward function broken returned NoneType for completion 1, expected a number"),
        ([1.0, "0", 0.0], "reward function broken returned str for completion 1, expected a number"),
    ],
)
def test_a_broken_reward_function_is_one_line(returned, message):
    def broken(completions, answers):
        return returned

    with pytest.raises(RewardFnError) as err:
        score(broken, ["a", "b", "c"], [1, 2, 3])
    assert str(err.value) == message


def test_scores_accept_tensors_and_keep_nan_for_the_trainer():
    rewards, errors = score(lambda c, a: torch.tensor([1.0, float("nan")]), ["a", "b"], [1, 2])
    assert rewards[0] == 1.0 and math.isnan(rewards[1]) and errors == 0


def test_gsm8k_reward_survives_enormous_answers():
    reward = get_reward_fn("gsm8k")
    huge = "9" * 5000
    assert reward([f"#### {huge}", f"#### {huge}1", f"#### -{huge}"], [huge, huge, huge]) == [1.0, 0.0, 0.0]
