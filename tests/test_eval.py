import json

import pytest
from conftest import DATA, build_model, build_tokenizer, needs_data

from hrpo.config import config_for
from hrpo.eval import main as eval_main
from hrpo.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    tok = build_tokenizer()
    build_model("qwen2", len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg = config_for(
        "arith", model=str(root / "base"), output_dir=str(root / "run"), max_steps=1, batch_size=4, group_size=2,
        max_completion_length=6, max_prompt_length=256, train_limit=4, eval_limit=4, lora_rank=4, lora_alpha=8,
    )
    train(cfg, progress=False)
    return root


@pytest.mark.parametrize("hybrid", ["--hybrid", "--no-hybrid"])
def test_eval_checkpoint_writes_metrics_and_samples(trained, tmp_path, hybrid):
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(trained / "run" / "checkpoint"), "--limit", "5", "--max-new-tokens", "6", "--max-prompt-length", "256", "--output", str(out), hybrid]
    assert eval_main(args) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and len(result["samples"]) == 5
    assert result["hybrid"] is (hybrid == "--hybrid") and result["greedy"] is True
    assert result["model"] == str(trained / "base")  # the base comes from the checkpoint
    assert {"question", "answer", "completion", "reward"} <= set(result["samples"][0])
    assert result["accuracy"] == sum(s["reward"] for s in result["samples"]) / 5
    assert eval_main(args) == 2  # the result file is not overwritten unless asked
    assert eval_main(args + ["--overwrite"]) == 0


@needs_data
def test_eval_base_model_and_real_task_data(trained, tmp_path, capsys):
    data = DATA / "gsm8k" / "test.jsonl"
    out = tmp_path / "gsm8k.json"
    args = ["--task", "gsm8k", "--model", str(trained / "base"), "--data", str(data), "--limit", "3",
            "--max-new-tokens", "4", "--output", str(out)]
    assert eval_main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["accuracy"] == 0.0  # 4 random tokens never hold the marker


def test_eval_engines_agree_on_a_lora_checkpoint(trained, tmp_path):
    """The CLI's --engine choice reaches the rollout: both loops give the same greedy
    completions of a checkpoint (after one step its adapters barely move the model; the
    merge itself is tested with large adapters in test_engine.py)."""
    results = {}
    for kind in ("fast", "reference"):
        out = tmp_path / f"{kind}.json"
        args = ["--checkpoint", str(trained / "run" / "checkpoint"), "--limit", "6", "--max-new-tokens", "12",
                "--max-prompt-length", "256", "--output", str(out), "--engine", kind]
        assert eval_main(args) == 0
        results[kind] = [s["completion"] for s in json.loads(out.read_text())["samples"]]
    assert len(results["fast"]) == 6 and results["fast"] == results["reference"]
