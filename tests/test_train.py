import json
import math

import pytest
import torch
from conftest import build_model, small_config
from transformers import AutoConfig, AutoModelForCausalLM

from hrpo.model.hybrid import HybridModel, ModelError
from hrpo.model.loading import attach_lora, build_policy
from hrpo.train import Trainer, train
from hrpo.train import main as train_main
from hrpo.training.checkpoint import load_checkpoint, save_checkpoint
from hrpo.training.config import config_for
from hrpo.training.setup import lr_schedule, make_optimizer


def test_optimizer_groups_and_learning_rates():
    torch.manual_seed(0)
    cfg = config_for("gsm8k")
    hm = build_policy(build_model("qwen2", 320), cfg)
    opt, sched = make_optimizer(hm, cfg, total_steps=100)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lora", "gate", "lambda"}
    names = {id(p): n for n, p in hm.named_parameters()}
    assert all("lora_" in names[id(p)] for p in groups["lora"]["params"])
    assert len(groups["lora"]["params"]) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert {names[id(p)] for p in groups["gate"]["params"]} == {
        "gate.w_r.weight",
        "gate.w_r.bias",
        "gate.w_i.weight",
        "gate.w_i.bias",
    }
    assert [names[id(p)] for p in groups["lambda"]["params"]] == ["gate.lam"]
    # Every group decays, gate biases included, as the original's patch.py:34-47.
    assert all(g.get("weight_decay", opt.defaults["weight_decay"]) == 0.1 for g in opt.param_groups)
    # Warm-up starts at 1/10 of the peak rates: 5e-6, 1e-4, 1e-3.
    assert groups["lora"]["lr"] == pytest.approx(5e-7)
    assert groups["gate"]["lr"] == pytest.approx(1e-5)
    assert groups["lambda"]["lr"] == pytest.approx(1e-4)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0.1
    assert all(not p.requires_grad for n, p in hm.model.named_parameters() if "lora_" not in n)
    for _ in range(10):
        sched.step()
    assert groups["lora"]["lr"] == pytest.approx(5e-6)  # peak after 10% warm-up
    for _ in range(90):
        sched.step()
    assert groups["lora"]["lr"] < 1e-8  # cosine to zero


def test_checkpoint_round_trip(tmp_path):
    cfg = config_for("gsm8k", lora_rank=4, lora_alpha=8)
    torch.manual_seed(1)
    hm = build_policy(build_model("llama", 320), cfg)
    with torch.no_grad():
        for p in hm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(hm, tmp_path / "ckpt", "tiny-llama")
    assert {f.name for f in (tmp_path / "ckpt").iterdir()} == {
        "adapter.safetensors",
        "gate.safetensors",
        "checkpoint.json",
    }
    fresh = load_checkpoint(build_policy(build_model("llama", 320), cfg), tmp_path / "ckpt")
    want = {n: p for n, p in hm.named_parameters() if p.requires_grad}
    got = dict(fresh.named_parameters())
    for n, p in want.items():
        assert torch.equal(p, got[n]), n
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(hm.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_checkpoint_from_another_base_is_refused(tmp_path):
    cfg = config_for("gsm8k", lora_rank=4, lora_alpha=8)
    save_checkpoint(build_policy(build_model("qwen2", 320), cfg), tmp_path / "ckpt", "tiny-qwen2")
    other = build_policy(build_model("qwen2", 320, hidden=32), cfg)
    with pytest.raises(ModelError, match=r"trained on base 'tiny-qwen2'.*hidden_size \(checkpoint 64, model 32\)"):
        load_checkpoint(other, tmp_path / "ckpt")
    with pytest.raises(ModelError, match="not an HRPO checkpoint"):
        load_checkpoint(other, tmp_path)


def test_model_without_expected_modules():
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    gpt2 = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ModelError, match=r"GPT2LMHeadModel has no modules named \['q_proj'"):
        attach_lora(gpt2, 4, 8, ("q_proj", "v_proj"))
    soft = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "gemma2",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=30.0,
        )
    )
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        HybridModel(soft)


def test_end_to_end_run_folder(model_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(small_config(model_dir, out), progress=False)
    written = {
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "summary.json",
        "checkpoint",
        "checkpoints",
        "eval_before.json",
        "eval_after.json",
    }
    assert {p.name for p in out.iterdir()} == written | {"hrpo-run.json"}
    assert set(json.loads((out / "hrpo-run.json").read_text())["files"]) == written
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(0.0 <= r["reward"] <= 1.0 and r["gate_a"] > 0.9 for r in records)
    assert summary["accuracy_before"] == json.loads((out / "summary.json").read_text())["accuracy_before"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # The run folder is not overwritten unless asked.
    with pytest.raises(ValueError, match="holds an hrpo run; pass --resume to continue it or --overwrite"):
        train(small_config(model_dir, out), progress=False)
    train(small_config(model_dir, out, overwrite=True, hybrid=False), progress=False)
    assert json.loads((out / "summary.json").read_text())["hybrid"] is False


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert train_main(["--model", str(model_dir), "--output-dir", str(tmp_path / "notes"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "holds no hrpo run" in err.splitlines()[-1]
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert train_main(["--model", str(model_dir), "--output-dir", str(tmp_path / "r"), "--max-prompt-length", "5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: prompt of example 0 has")
    assert train_main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not exist" in err.splitlines()[-1]


def test_learning_rate_schedules_by_hand():
    """35 optimizer steps, warm-up ratio 0.1: 3.5 warm-up steps. Ours: int() gives 3, the step
    being taken counts: 1/3, 2/3, 1, then the cosine over the 32 steps from step 3. HF's
    (--hf-warmup, the original's): ceil() gives 4, the first at rate 0: 0, 1/4, 2/4, 3/4, then
    the cosine over the 31 steps from step 4."""
    ours, hf = lr_schedule(35, 0.1), lr_schedule(35, 0.1, hf=True)
    assert [ours(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 32))])
    assert [hf(s) for s in range(6)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.5 * (1 + math.cos(math.pi / 31))])
    assert ours(34) == pytest.approx(0.5 * (1 + math.cos(math.pi * 31 / 32)))
    assert hf(35) == pytest.approx(0.0, abs=1e-12)


def test_hf_warmup_flag_reaches_the_optimizer():
    torch.manual_seed(0)
    cfg = config_for("gsm8k", hf_warmup=True)
    opt, _ = make_optimizer(build_policy(build_model("qwen2", 320), cfg), cfg, total_steps=100)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # HF's first step: rate 0


@pytest.mark.parametrize("iterations,grad_accum,device_steps", [(1, 2, 6), (2, 2, 3), (2, 4, 6), (3, 2, 2)])
def test_max_steps_counts_optimizer_steps(model_dir, tmp_path, iterations, grad_accum, device_steps):
    """--max-steps 3: each device step makes `iterations` passes and every grad_accum passes
    step the optimizer, so 3 x grad_accum / iterations device steps, rounded up (3 x 2 / 3 = 2)."""
    cfg = small_config(
        model_dir, tmp_path / "run", max_steps=3, num_iterations=iterations, grad_accum=grad_accum, train_limit=200
    )
    t = Trainer(cfg, None, progress=False)
    assert t.device_steps == device_steps
    assert t.opt_steps == 3
