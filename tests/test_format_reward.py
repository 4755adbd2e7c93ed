"""--format-reward W: the training reward's format credit, worked out by hand on completions
of the kind SmolLM2-135M-Instruct writes on arith (docs/real-model.md), and its wiring: the
rollouts get the credit, the held-out accuracy stays strict."""

import dataclasses
import json

import pytest
from conftest import small_config

import hrpo.training.evaluation as evaluation
import hrpo.training.step as step
from hrpo.core.errors import ConfigError
from hrpo.tasks.rewards import get_reward_fn
from hrpo.train import train
from hrpo.training.config import config_for, validate_config

# (completion, gold "8"), what the strict reward gives, what W = 0.1 gives
CASES = [
    ("Tom has 3 + 5 = 8 apples.\n#### 8", 1.0, 1.0),  # right: the task's score, not 1 + W
    ("Tom has 3 + 5 = 8 apples.\n#### 8\nThe answer is 8.", 1.0, 1.0),  # text after the answer line
    ("Tom has 3 * 5 = 15 apples.\n#### 15", 0.0, 0.1),  # one marker, a readable wrong number
    ("#### 8\nTom has 8 apples.\n#### 8", 0.0, 0.0),  # two markers, both right: no hedging
    ("#### 15\nThe answer is 15.\n#### 16", 0.0, 0.0),  # two markers, wrong
    ("Tom has 3 + 5 = 8 apples. The answer is 8.", 0.0, 0.0),  # no marker
    ("Tom has 3 + 5 = 8 apples.\n#### eight", 0.0, 0.0),  # a marker without a number
    ("Tom has 3 + 5 = 8 apples.\n####", 0.0, 0.0),  # cut right after the marker
]


def test_strict_reward_is_the_default_and_the_credit_by_hand():
    texts = [c for c, _, _ in CASES]
    golds = ["8"] * len(CASES)
    assert get_reward_fn("arith")(texts, golds) == [s for _, s, _ in CASES]
    assert get_reward_fn("arith", format_credit=0.1)(texts, golds) == [w for _, _, w in CASES]
    assert get_reward_fn("arith", format_credit=0.25)(texts[2:3], golds[:1]) == [0.25]


def test_credit_reads_answers_as_the_task_does():
    """MATH reads a LaTeX answer: a wrong fraction after the only marker is formatted; an empty
    answer line is not."""
    fn = get_reward_fn("math", format_credit=0.2)
    assert fn(["so x = 1/2.\n#### \\frac{1}{2}", "#### \\frac{1}{3}", "#### "], ["\\frac{1}{2}"] * 3) == [1.0, 0.2, 0.0]


@pytest.mark.parametrize("w", [1.0, -0.1, 1.5])
def test_credit_outside_its_range_is_refused(w):
    with pytest.raises(ValueError, match=f"format_credit must lie in \\[0, 1\\), got {w}"):
        get_reward_fn("arith", format_credit=w)
    with pytest.raises(ConfigError) as err:
        validate_config(dataclasses.replace(config_for("arith"), format_reward=w))
    assert str(err.value) == f"--format-reward must be a number in [0, 1), got {w}"


def test_credit_is_refused_beside_a_custom_reward(model_dir, tmp_path):
    cfg = small_config(model_dir, tmp_path / "run", format_reward=0.1)
    with pytest.raises(ConfigError, match="--format-reward credits the task's own reward"):
        train(cfg, reward_fn=get_reward_fn("arith"), progress=False)


def test_rollouts_get_the_credit_and_held_out_accuracy_stays_strict(model_dir, tmp_path, monkeypatch):
    """The tiny model writes no marker, so its decoded text is replaced: each group of 4 rollouts
    reads [right-format wrong number, no marker, two markers, right-format wrong number] (W each
    for the first and last: mean reward W / 2), and every held-out completion is a formatted wrong
    number (strict accuracy 0, where the credited reward would give W)."""
    rollout = ["#### 1000001", "1000001", "#### 1000001\n#### 1000001", "so #### 1000002"]
    monkeypatch.setattr(step, "decode_completions", lambda tok, out: rollout * (len(out.completion_ids) // 4))
    monkeypatch.setattr(evaluation, "decode_completions", lambda tok, out: ["#### 1000001"] * len(out.completion_ids))
    out = tmp_path / "run"
    summary = train(small_config(model_dir, out, max_steps=1, format_reward=0.1), progress=False)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["reward"] == pytest.approx(0.05)
    assert record["full_reward_frac"] == 0.0
    assert record["skipped"] is None and record["grad_norm"] > 0  # the format's spread is a signal
    assert summary["accuracy_before"] == 0.0 and summary["accuracy_after"] == 0.0
