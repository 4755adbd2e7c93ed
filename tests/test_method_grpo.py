"""`python -m hrpo.train --method grpo`: plain tokens, the same run as --no-hybrid; a flag that
contradicts it is a one-line error before any work."""

import json

import pytest
from conftest import small_config

from hrpo.core.errors import ConfigError
from hrpo.eval import parser as eval_parser
from hrpo.eval import recorded_settings
from hrpo.train import main as train_main
from hrpo.train import train
from hrpo.training.checkpoint import read_checkpoint_meta
from hrpo.training.config import config_for, validate_config


def test_method_grpo_is_the_no_hybrid_config():
    grpo, no_hybrid = config_for("arith", method="grpo"), config_for("arith", hybrid=False)
    validate_config(grpo)
    assert grpo.hybrid is False and grpo.method == "grpo"
    assert {**vars(grpo), "method": "hrpo"} == vars(no_hybrid)
    assert config_for("arith", method="grpo", hybrid=False).hybrid is False
    with pytest.raises(ConfigError, match="--method grpo trains plain tokens: --hybrid contradicts it"):
        validate_config(config_for("arith", method="grpo", hybrid=True))
    with pytest.raises(ConfigError, match="plain GRPO is --method grpo"):
        validate_config(config_for("arith", method="soft-tokens", hybrid=False))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "grpo", "--hybrid"], "--method grpo trains plain tokens: --hybrid contradicts it"),
        (["--method", "soft-tokens", "--no-hybrid"], "--method soft-tokens trains thinking inputs"),
    ],
)
def test_cli_refuses_a_contradiction_before_any_work(args, message, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--model", str(model_dir), "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def _metrics(out):
    keep = ("step", "loss", "reward", "kl", "grad_norm", "completion_tokens", "think_frac", "gate_a")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows]


def test_method_grpo_trains_exactly_the_no_hybrid_run(model_dir, tmp_path):
    """Two optimizer steps each way, same seed: the same losses, rewards and KL; the checkpoint
    records plain tokens, so hrpo.eval decodes it without latents."""
    train(small_config(model_dir, tmp_path / "grpo", method="grpo"), progress=False)
    train(small_config(model_dir, tmp_path / "plain", hybrid=False), progress=False)
    grpo, plain = _metrics(tmp_path / "grpo"), _metrics(tmp_path / "plain")
    assert len(grpo) == 2 and all(len(r) == 8 for r in grpo) and grpo == plain
    assert all(r["think_frac"] == 0 for r in grpo)  # no thinking inputs: plain tokens
    meta = read_checkpoint_meta(tmp_path / "grpo" / "checkpoint")
    assert meta["method"] == "grpo" and meta["hybrid"] is False
    args = eval_parser().parse_args(["--checkpoint", str(tmp_path / "grpo" / "checkpoint")])
    recorded_settings(args, meta)
    assert args.hybrid is False
