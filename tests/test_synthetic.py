"""The synthetic arithmetic task and the tiny embedded model built on it."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from hrpo.core.prompts import ANSWER_MARKER, Example, format_prompt
from hrpo.tasks.synthetic import apply_op, make_example, synthetic_split

TINY = Path(__file__).resolve().parents[1] / "hrpo" / "assets" / "tiny"


def test_split_is_deterministic():
    a, b = synthetic_split("train", 300, seed=3), synthetic_split("train", 300, seed=3)
    assert [(e.question, e.answer, e.meta) for e in a] == [(e.question, e.answer, e.meta) for e in b]
    # A longer list extends the shorter one, and another seed gives other problems.
    assert [e.question for e in synthetic_split("train", 400, seed=3)[:300]] == [e.question for e in a]
    assert [e.question for e in synthetic_split("train", 300, seed=4)] != [e.question for e in a]


def test_train_and_test_are_disjoint():
    test = synthetic_split("test", 500)
    assert len({e.question for e in test}) == 500
    train = {e.question for seed in (0, 1) for e in synthetic_split("train", 3000, seed=seed)}
    assert not train & {e.question for e in test}
    with pytest.raises(ValueError):
        synthetic_split("dev", 1)


def test_solutions_are_correct():
    rng = random.Random(0)
    for ex in [make_example(rng) for _ in range(500)] + synthetic_split("test", 200):
        assert isinstance(ex, Example) and isinstance(ex.answer, str)
        ops = ex.meta["ops"]
        assert 2 <= len(ops) <= 4
        value, expected_steps = ex.meta["start"], []
        assert str(value) in ex.question
        for op, n in ops:
            new = apply_op(value, op, n)
            assert 0 <= new <= 99
            expected_steps.append(f"{value} {op} {n} = {new}.")
            value = new
        solution = ex.meta["solution"]
        assert solution == " ".join(expected_steps) + f" {ANSWER_MARKER} {value}"
        assert solution.count(ANSWER_MARKER) == 1
        assert solution.split(ANSWER_MARKER)[1].strip() == ex.answer == str(value)
        # Check the written equations independently of apply_op, by parsing them.
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", solution):
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_tokenizer_round_trip(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for ex in synthetic_split("test", 50):
        for text in (ex.meta["solution"], ex.question):
            ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False).input_ids
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Digits never merge: every token holds at most one digit.
    assert all(sum(ch.isdigit() for ch in tok) <= 1 for tok in tokenizer.get_vocab())


def test_chat_template(tokenizer):
    q = "Tom has 7 apples. He buys 5 more. How many apples does Tom have now?"
    assert format_prompt(tokenizer, q, system=None) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, q, system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    ids = tokenizer(format_prompt(tokenizer, q, system=None), add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"user\n{q}\nassistant\n"


def test_shipped_model_loads_and_runs(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY)
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    assert model.config.eos_token_id == tokenizer.eos_token_id
    prompt = format_prompt(tokenizer, synthetic_split("test", 1)[0].question, system=None)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(tokenizer))
    assert model.config.vocab_size == len(tokenizer)
    assert torch.isfinite(logits).all()
