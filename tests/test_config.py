"""Every option is checked before any work starts, with one line naming its flag and range."""

import dataclasses
import math

import pytest
from conftest import small_config

from hrpo.core.errors import ConfigError, error_line
from hrpo.train import main as train_main
from hrpo.training.config import config_for, validate_config

BAD = [
    ("max_steps", -3, "--max-steps must be an integer >= 1, got -3"),
    ("max_steps", 0, "--max-steps must be an integer >= 1, got 0"),
    ("group_size", 0, "--group-size must be an integer >= 2, got 0"),
    ("group_size", 1, "--group-size must be an integer >= 2, got 1"),
    ("batch_size", 6, "--batch-size must be a multiple of --group-size (4), got 6"),
    ("batch_size", 2, "--batch-size must be an integer >= 4, got 2"),
    ("grad_accum", 0, "--grad-accum must be an integer >= 1, got 0"),
    ("temperature", 0.0, "--temperature must be a number in (0, inf), got 0.0"),
    ("temperature", math.nan, "--temperature must be a number in (0, inf), got nan"),
    ("top_k", -1, "--top-k must be an integer >= 0, got -1"),
    ("epsilon", 1.0, "--epsilon must be a number in (0, 1), got 1.0"),
    ("beta", -0.1, "--beta must be a number in [0, inf), got -0.1"),
    ("loss_norm", "mean", "--loss-norm must be one of grpo, dr_grpo, dapo, got 'mean'"),
    ("lr_lambda", math.inf, "--lr-lambda must be a number in [0, inf), got inf"),
    ("adam_beta2", 1.0, "--adam-beta2 must be a number in [0, 1), got 1.0"),
    ("warmup_ratio", 1.5, "--warmup-ratio must be a number in [0, 1], got 1.5"),
    ("max_grad_norm", 0.0, "--max-grad-norm must be a number in (0, inf), got 0.0"),
    ("r_min", 1.0, "--r-min must be a number in (0, 1), got 1.0"),
    ("r_max", 0.98, "--r-min (0.99) must not exceed --r-max (0.98)"),
    ("output_dir", "", "--output-dir must be a folder path, got ''"),
    ("output_dir", "  ", "--output-dir must be a folder path, got '  '"),
    ("seed", -1, "--seed must be an integer >= 0, got -1"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("dtype", "float8", "--dtype must be one of auto, float32, bfloat16, float16, got 'float8'"),
    ("engine", "vllm", "--engine must be one of fast, reference, got 'vllm'"),
    ("marker", "", "--marker must be a non-empty string, got ''"),
    ("eval_limit", 0, "--eval-limit must be an integer >= 1, got 0"),
    ("save_every", -1, "--save-every must be an integer >= 0, got -1"),
    ("keep_checkpoints", 0, "--keep-checkpoints must be an integer >= 1, got 0"),
    ("max_skipped_in_a_row", 0, "--max-skipped-in-a-row must be an integer >= 1, got 0"),
    ("reward_timeout", -1.0, "--reward-timeout must be a number in [0, inf), got -1.0"),
    ("eval_every", -2, "--eval-every must be an integer >= 0, got -2"),
    ("report_to", "wandb", "--report-to must be one of none, tensorboard, got 'wandb'"),
    ("lora_targets", (), "--lora-targets must be one or more module names, got ()"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_option_is_checked(name, value, message):
    cfg = dataclasses.replace(config_for("gsm8k"), **{name: value})
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value) == message


def test_recipes_and_defaults_are_valid():
    for task in ("arith", "gsm8k", "math", "mmlu", "rag-qa"):
        validate_config(config_for(task))
    with pytest.raises(ConfigError, match="--overwrite and --resume contradict"):
        validate_config(config_for("arith", overwrite=True, resume=True))
    with pytest.raises(
        ConfigError,
        match="--task must be one of 2wiki, arc-c, arith, bamboogle, gsm8k, hotpotqa, math, math500, mmlu, "
        "mmlu-stem, nq, rag-qa, triviaqa, got 'gsm9k'",
    ):
        config_for("gsm9k")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-steps", "-3"], "error: --max-steps must be an integer >= 1, got -3"),
        (["--group-size", "0"], "error: --group-size must be an integer >= 2, got 0"),
        (["--output-dir", ""], "error: --output-dir must be a folder path, got ''"),
    ],
)
def test_cli_refuses_bad_options_before_any_work(args, message, model_dir, tmp_path, monkeypatch, capsys):
    """The error comes before the model is loaded, and no folder is created."""
    import hrpo.training.setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        hrpo.training.setup, "load_base_model", lambda *a: pytest.fail("loaded the model before validating")
    )
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--output-dir", str(out)] + args
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []


def test_small_config_is_valid(model_dir, tmp_path):
    validate_config(small_config(model_dir, tmp_path / "x"))


def test_error_line_quotes_an_error_in_one_line():
    assert error_line(ValueError("  --lr must be positive\n  (got -1)\n")) == "--lr must be positive"
    assert error_line(KeyError()) == "KeyError"  # no message: its type
    assert error_line(OSError("\n")) == "OSError"
