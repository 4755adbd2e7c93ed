import json
import shutil

import pytest
from conftest import DATA, build_model, build_tokenizer, needs_data

from hrpo.eval import main as eval_main
from hrpo.eval import select
from hrpo.train import train
from hrpo.training.config import config_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    tok = build_tokenizer()
    build_model("qwen2", len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg = config_for(
        "arith",
        model=str(root / "base"),
        output_dir=str(root / "run"),
        max_steps=1,
        batch_size=4,
        group_size=2,
        max_completion_length=6,
        max_prompt_length=256,
        train_limit=4,
        eval_limit=4,
        lora_rank=4,
        lora_alpha=8,
    )
    train(cfg, progress=False)
    return root


def samples_of(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def arith_args(trained, out, *extra):
    return [
        "--task",
        "arith",
        "--checkpoint",
        str(trained / "run" / "checkpoint"),
        "--limit",
        "5",
        "--max-new-tokens",
        "6",
        "--max-prompt-length",
        "256",
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("hybrid", ["--hybrid", "--no-hybrid"])
def test_eval_checkpoint_writes_results_and_samples(trained, tmp_path, hybrid):
    out = tmp_path / "eval"
    assert eval_main(arith_args(trained, out, hybrid)) == 0
    row = json.loads((out / "results.json").read_text())["benchmarks"]["arith"]
    samples = samples_of(out)
    assert row["n"] == 5 and len(samples) == 5 and row["metric"] == "accuracy" and row["protocol"] == "paper"
    assert row["decoding"] == {
        "greedy": True,
        "temperature": 0.5,
        "top_k": 50,
        "max_new_tokens": 6,
        "hybrid": hybrid == "--hybrid",
    }
    assert row["model"] == str(trained / "base")  # the base comes from the checkpoint
    assert row["checkpoint"] == str(trained / "run" / "checkpoint") and row["seconds"] > 0
    assert {"index", "prompt", "completion", "extracted", "golds", "correct", "completion_tokens", "gate_mean"} <= set(
        samples[0]
    )
    assert row["value"] == sum(s["correct"] for s in samples) / 5
    if hybrid == "--hybrid":  # completions that blended at least once report their gate
        gates = [s["gate_mean"] for s in samples if s["gate_mean"] is not None]
        assert gates and all(0.9 < g <= 1.0 for g in gates)
    else:
        assert all(s["gate_mean"] is None for s in samples)


def test_interrupted_eval_resumes_without_recomputing(trained, tmp_path, monkeypatch):
    import hrpo.engine.rollout_engine

    out = tmp_path / "eval"
    calls = []
    real = hrpo.engine.rollout_engine.RolloutEngine.generate

    def flaky(self, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise OSError("disk unplugged")
        return real(self, prompts, *a, **k)

    monkeypatch.setattr(hrpo.engine.rollout_engine.RolloutEngine, "generate", flaky)
    args = arith_args(trained, out, "--batch-size", "2")
    assert eval_main(args) == 2
    first = samples_of(out)
    assert len(first) == 4 and calls == [2, 2, 1]
    calls.clear()
    assert eval_main(args) == 0
    assert calls == [1]  # only the unfinished example
    samples = samples_of(out)
    assert samples[:4] == first and len(samples) == 5
    assert json.loads((out / "results.json").read_text())["benchmarks"]["arith"]["n"] == 5
    # Other settings in the same folder are refused; --overwrite replaces the evaluation.
    assert eval_main(arith_args(trained, out, "--protocol", "strict")) == 2
    assert eval_main(arith_args(trained, out, "--protocol", "strict", "--overwrite")) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["arith"]["protocol"] == "strict"
    assert len(samples_of(out)) == 5


def test_limit_and_seed_draw_a_reproducible_subset():
    assert select(10, None, 0) == list(range(10))
    a, b, c = select(1000, 7, 0), select(1000, 7, 0), select(1000, 7, 1)
    assert a == b and a != c and a == sorted(a) and len(set(a)) == 7


def test_compare_prints_and_draws(trained, tmp_path, capsys):
    runs = []
    for hybrid in ("--hybrid", "--no-hybrid"):
        out = tmp_path / hybrid.strip("-")
        assert eval_main(arith_args(trained, out, hybrid)) == 0
        runs.append(out)
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert eval_main(["--compare", *map(str, runs), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| benchmark | metric | hybrid | no-hybrid | paper best |" in printed
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert eval_main(["--compare", *map(str, runs), "--png", str(png)]) == 2  # not overwritten unless asked


@needs_data
def test_eval_base_model_on_real_gsm8k(trained, tmp_path, capsys):
    out = tmp_path / "gsm8k"
    args = [
        "--task",
        "gsm8k",
        "--model",
        str(trained / "base"),
        "--data-root",
        str(DATA),
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert eval_main(args) == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())["benchmarks"]["gsm8k"]
    assert row["n"] == 3 and row["value"] == 0.0  # 4 random tokens never hold the marker
    assert row["data"] == str(DATA / "gsm8k" / "test.jsonl")
    questions = [json.loads(line)["question"] for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples_of(out)] == [questions[i] for i in select(1319, 3, 0)]


def test_eval_engines_agree_on_a_lora_checkpoint(trained, tmp_path):
    """The CLI's --engine choice reaches the rollout: both loops give the same greedy
    completions of a checkpoint (after one step its adapters barely move the model; the
    merge itself is tested with large adapters in test_engine.py)."""
    results = {}
    for kind in ("fast", "reference"):
        out = tmp_path / kind
        args = arith_args(trained, out, "--engine", kind, "--max-new-tokens", "12")
        assert eval_main(args) == 0
        results[kind] = [s["completion"] for s in samples_of(out)]
    assert len(results["fast"]) == 5 and results["fast"] == results["reference"]


@needs_data
def test_the_whole_table_from_the_shared_data_layout(tmp_path, capsys):
    """--task all reads every benchmark's real file; 2wiki and bamboogle records carry no
    passages and get their top 3 from --corpus (BM25, cached beside a copy of the corpus)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(DATA / "wiki_corpus" / "hipporag_2wiki_dev_corpus.jsonl", corpus)
    out = tmp_path / "all"
    args = [
        "--task",
        "all",
        "--model",
        str(tmp_path / "model"),
        "--data-root",
        str(DATA),
        "--corpus",
        str(corpus),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--max-prompt-length",
        "16000",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert eval_main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["benchmarks"]
    assert list(rows) == [
        "gsm8k",
        "math",
        "math500",
        "mmlu-stem",
        "arc-c",
        "nq",
        "triviaqa",
        "hotpotqa",
        "2wiki",
        "bamboogle",
    ]
    assert all(r["n"] == 2 for r in rows.values())
    assert (
        rows["nq"]["metric"] == "exact_match" and "f1" in rows["nq"] and rows["math"]["decoding"]["max_new_tokens"] == 2
    )
    samples = samples_of(out)
    wiki = [s for s in samples if s["task"] == "2wiki"]
    assert all(s["prompt"].startswith("Context (which may or may not be relevant):\n") for s in wiki)
    assert all(s["prompt"].count("::::") == 3 for s in wiki)
    assert (tmp_path / "corpus.jsonl.bm25").is_dir()  # the index, cached beside the corpus
    assert "| hotpotqa | exact_match |" in printed and "| 31.6 |" in printed


def test_an_evaluation_is_not_continued_under_another_answer_marker(trained, tmp_path, capsys):
    """The marker ends thinking (where latents stop being blended): a folder evaluated under
    one marker is not continued under another, even for the same checkpoint path."""
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(trained / "run" / "checkpoint", ckpt)
    out = tmp_path / "eval"
    args = [*arith_args(trained, out), "--checkpoint", str(ckpt)]  # the later --checkpoint wins
    assert eval_main(args) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["arith"]["marker"] == "####"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "marker": "The answer is"}))
    capsys.readouterr()
    assert eval_main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --output-dir {out} holds arith evaluated with other settings; choose another folder or pass "
        "--overwrite\n"
    )
    assert eval_main([*args, "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["arith"]["marker"] == "The answer is"
