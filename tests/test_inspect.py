import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import encode_prompts
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.inspect import Position, Trace, aggregates, describe, html_page, nearest_tokens, teacher_force, text_script
from hrpo.inspect.cli import main
from hrpo.inspect.scripts import cross_lingual
from hrpo.model.hybrid import HybridModel
from hrpo.model.loading import build_policy, eos_token_ids, load_base_model
from hrpo.training.checkpoint import save_checkpoint
from hrpo.training.config import config_for

C = 8.0  # the paper's constant, written here rather than read from the module under test
ROOT = Path(__file__).resolve().parents[1]


def test_nearest_tokens_on_a_hand_built_embedding():
    E = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [-1.0, 0, 0]])
    h = torch.stack([3 * E[2], E[3], torch.tensor([1.0, 0.2, 0])])
    sims, ids = nearest_tokens(h, E, k=3, chunk=2)  # two chunks
    assert ids[0, 0] == 2 and sims[0, 0] == pytest.approx(1.0)  # a scaled row is its own nearest, cosine 1
    assert ids[1].tolist()[0] == 3 and sims[1, 0] == pytest.approx(1.0)
    assert sorted(ids[1, 1:].tolist()) == [0, 1] and sims[1, 1] == pytest.approx(2**-0.5)
    assert ids[2].tolist() == [0, 3, 1]  # cosines 0.98, 0.83, 0.20 worked out by hand
    assert sims[2].tolist() == pytest.approx([1 / 1.04**0.5, 1.2 / (2 * 1.04) ** 0.5, 0.2 / 1.04**0.5])
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_script_classifier_on_hand_picked_tokens():
    expect = {
        "hello": "LATIN",
        "ĠCafé": "LATIN",
        " 東京": "CJK",
        "Привет": "CYRILLIC",
        "مرحبا": "ARABIC",
        "ひらがな": "KANA",
        "Ｈｅｌｌｏ": "LATIN",
        "한국": "HANGUL",
        "αβ": "GREEK",
        "42": "DIGIT",
        " 7": "DIGIT",
        " ,": "PUNCTUATION",
        "####": "PUNCTUATION",
        "  ": "SPACE",
        "\n": "SPACE",
        "\ufffd": "BYTES",
        "": "OTHER",
    }
    assert {t: text_script(t) for t in expect} == expect
    assert text_script("x東京") == "CJK"  # the script of most of the letters
    # of the tokens written in letters (not digits / punctuation), how many are not the prompt's script
    assert cross_lingual(["the", "東京", "42", "мир", ".", "Tom"], "LATIN") == (2, 4)


def _tiny_policy(seed: int = 0):
    tok = build_tokenizer()
    hm = HybridModel(build_model("qwen2", len(tok), seed=seed)).eval()
    with torch.no_grad():  # a gate whose a differs from token to token
        hm.gate.lam.uniform_(-2, 2)
        hm.gate.w_r.weight.normal_(0, 0.3)
        hm.gate.w_r.bias.uniform_(-1, 1)
    return hm, tok, MarkerMatcher(tok, "####", len(tok))


def test_replay_reproduces_the_engines_rollout():
    """Teacher-forcing the engine's greedy tokens gives back its latents and blend flags
    exactly, and the positions' mean gate is the rollout's gate_mean."""
    hm, tok, matcher = _tiny_policy()
    prompts = encode_prompts(tok, ["Tom has 12 apples and buys 7 more", "First 3 * 4"], 256, None)
    engine = make_engine(hm, matcher, eos_token_ids(hm.causal_lm, tok), tok.pad_token_id)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=10, greedy=True))
    rows = describe(hm, tok, matcher, out, k=3)
    for b, prompt in enumerate(prompts):
        ids = out.completion_ids[b][out.completion_mask[b]]
        replay = teacher_force(hm, prompt, ids.tolist(), matcher, 0.5, 50)
        assert torch.equal(replay.latents[0], out.latents[b, : len(ids)])
        assert torch.equal(replay.think_mask[0], out.think_mask[b, : len(ids)])
        gates = [p.gate for p in rows[b] if p.gate is not None]
        assert sum(gates) / len(gates) == pytest.approx(float(out.gate_mean[b]), rel=1e-6)
        assert [p.token for p in rows[b]] == [tok.decode([i]) for i in ids.tolist()]


@pytest.fixture(scope="module")
def checkpoint(model_dir, tmp_path_factory):
    """A checkpoint on the saved tiny qwen2 with a gate far from its init (a varies)."""
    model, _ = load_base_model(str(model_dir), torch.device("cpu"), torch.float32)
    hm = build_policy(model, config_for("arith", lora_rank=4, lora_alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        hm.gate.lam.uniform_(-2, 2)
        hm.gate.w_r.weight.normal_(0, 0.3)
        hm.gate.w_r.bias.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("inspect") / "checkpoint"
    save_checkpoint(hm, path, str(model_dir), {"task": "arith"})
    return path


def _samples(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_samples_replay_gate_formula_and_marker(checkpoint, model_dir, tmp_path, capsys):
    """--samples forces a completion holding the marker: thinking flips at the token that
    completes '####' (checked by decoding prefixes), and every thinking position's gate is
    the mean over channels of a = exp(-8 softplus(-Lambda) sigmoid(W_r e + b_r)) for the
    token's embedding e, from the saved gate's tensors."""
    completion = "First 3 * 4 = 12, then 12 - 5 = 7.#### 7"
    samples = _samples(
        tmp_path / "samples.jsonl",
        [
            {
                "prompt": "What is 3 * 4 - 5?",
                "completion": completion,
                "correct": 1.0,
                "gate_mean": 0.5,
                "task": "arith",
                "completion_tokens": 99,
                "golds": ["7"],
                "unknown": {"ignored": True},
            }
        ],
    )
    out = tmp_path / "out.json"
    assert (
        main(["--checkpoint", str(checkpoint), "--samples", str(samples), "--json", str(out), "--top-k-nearest", "3"])
        == 0
    )
    text = capsys.readouterr().out
    assert "recorded correct 1.0, recorded gate_mean 0.5, recorded completion_tokens 99" in text
    sample = json.loads(out.read_text())["samples"][0]
    tok = AutoTokenizer.from_pretrained(model_dir)  # the fixture's (BPE training may break ties otherwise)
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    thinking = ["####" not in tok.decode(ids[: i + 1]) for i in range(len(ids))]
    pos = sample["positions"]
    assert [p["token"] for p in pos] == [tok.decode([i]) for i in ids]
    assert [p["thinking"] for p in pos] == thinking and True in thinking and False in thinking
    gate = load_file(str(checkpoint / "gate.safetensors"))
    E = load_file(str(Path(model_dir) / "model.safetensors"))["model.embed_tokens.weight"]
    r = torch.sigmoid(E[ids] @ gate["w_r.weight"].T + gate["w_r.bias"])
    a = torch.exp(-C * torch.log1p(torch.exp(-gate["lam"])) * r).mean(-1)
    for p, want, think in zip(pos, a.tolist(), thinking):
        assert p["gate"] == (pytest.approx(want, rel=1e-5) if think else None)
        assert len(p["nearest"]) == 3
    assert max(a[: thinking.count(True)]) - min(a[: thinking.count(True)]) > 1e-3  # the gate varies: a real check
    assert sample["gate_mean"] == pytest.approx(float(a[torch.tensor(thinking)].mean()), rel=1e-5)


class Elements(HTMLParser):
    """The tags, attributes and text of a page, as a browser would parse them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags, self.attrs, self.text = set(), [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_everything_a_model_wrote():
    evil = "<script>alert(1)</script>"
    near = [("'><img src=x onerror=alert(1)>", 0.9), ("&amp;", 0.1)]
    traces = [
        Trace(
            f"<b>{evil}</b>",
            [Position(evil, True, 0.9, near), Position('"</span><script>', False, None, near)],
            {"correct": "<i>1</i>"},
        )
    ]
    page = Elements(html_page(traces, aggregates(traces), title=evil))
    assert "script" not in page.tags and "img" not in page.tags and "i" not in page.tags
    assert not any(name.startswith("on") for name, _ in page.attrs)
    text = "".join(page.text)
    assert f"<b>{evil}</b>" in text and "recorded correct <i>1</i>" in text  # shown as text
    assert evil in text and "&amp;" in "".join(v for _, v in page.attrs)  # an entity a model wrote stays text
    assert ("class", "t think") in page.attrs and ("class", "t ans") in page.attrs  # the two parts look different


def test_aggregates_worked_by_hand():
    def pos(token, think, gate, near):
        return Position(token, think, gate, [(t, 0.5) for t in near])

    traces = [
        Trace(
            "How many apples?",
            [
                pos("3", True, 0.9, ["3", "東京"]),
                pos(" +", True, 0.7, ["мир", "the"]),
                pos("####", False, None, ["他们", "们"]),
            ],
        ),
        Trace("12 + 7", [pos("19", True, 0.5, ["19", " ."])]),  # no letters in the prompt: not in the share
    ]
    agg = aggregates(traces)
    assert agg["gate"]["n"] == 3 and agg["gate"]["mean"] == pytest.approx(0.7)
    assert agg["gate_per_sample"]["mean"] == pytest.approx((0.8 + 0.5) / 2)
    assert agg["gate_by_position"][:2] == pytest.approx([0.7, 0.7]) and agg["gate_by_position"][2] is None
    assert agg["completion_tokens"]["mean"] == 2 and agg["thinking_tokens"]["max"] == 2
    assert agg["reached_marker"] == 0.5
    # thinking positions only: 3, 東京, мир, the, 19, " ."
    assert agg["nearest_tokens_counted"] == 6
    assert agg["nearest_scripts"] == pytest.approx(
        {"DIGIT": 2 / 6, "CJK": 1 / 6, "CYRILLIC": 1 / 6, "LATIN": 1 / 6, "PUNCTUATION": 1 / 6}
    )
    assert agg["cross_lingual_share"] == pytest.approx(2 / 3)  # 東京, мир of 東京, мир, the


def test_cli_end_to_end_on_the_embedded_model(tmp_path):
    """`python -m hrpo.inspect` on the embedded model: the table in the terminal, and the HTML,
    JSON and PNG files; a second run refuses to overwrite them without --overwrite."""
    files = {k: tmp_path / f"inspect.{k}" for k in ("html", "json", "png")}
    cmd = [
        sys.executable,
        "-m",
        "hrpo.inspect",
        "--prompt",
        "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
        "Anna has 5 coins. She loses 2. How many coins does Anna have now?",
        "--max-new-tokens",
        "30",
        "--max-rows",
        "5",
    ] + [a for k, p in files.items() for a in (f"--{k}", str(p))]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "sample 1: Anna␣has␣5␣coins." in run.stdout and "nearest to h_hat (cosine)" in run.stdout
    assert "more positions (all of them in --html and --json)" in run.stdout
    assert "aggregates over 2 samples" in run.stdout and "cross-lingual share" in run.stdout
    result = json.loads(files["json"].read_text())
    agg = result["aggregates"]
    assert agg["samples"] == 2 and agg["gate"]["n"] > 0 and 0 < agg["gate"]["mean"] < 1
    assert sum(agg["nearest_scripts"].values()) == pytest.approx(1.0)
    first = result["samples"][0]["positions"][0]
    assert first["thinking"] and first["gate"] is not None and len(first["nearest"]) == 5
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Sample 1" in page and "data:image/png;base64," in page
    assert not any(ref in page for ref in ("href=", "src='http", 'src="http', "<link", "@import"))  # self-contained
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing checkpoint", "is not an HRPO checkpoint"),
        ("samples file missing", "cannot read"),
        ("bad JSON line", "samples.jsonl:2: not valid JSON"),
        ("field missing", "samples.jsonl:1: field 'completion' missing"),
        ("field of the wrong type", "samples.jsonl:1: field 'gate_mean' must be"),
        ("unknown task in a sample", "samples.jsonl:2: unknown task 'nope'"),
        ("unknown --task", "unknown task 'nope'"),
        ("empty samples file", "no samples"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case, fragment):
    good = {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4. #### 4"}
    samples = tmp_path / "samples.jsonl"
    args = ["--samples", str(samples)]
    if case == "missing checkpoint":
        _samples(samples, [good])
        args += ["--checkpoint", str(tmp_path / "nowhere")]
    elif case == "samples file missing":
        args = ["--samples", str(tmp_path / "none.jsonl")]
    elif case == "bad JSON line":
        samples.write_text(json.dumps(good) + '\n{"prompt": "cut\n')
    elif case == "field missing":
        _samples(samples, [{"prompt": "x"}])
    elif case == "field of the wrong type":
        _samples(samples, [{**good, "gate_mean": "high"}])
    elif case == "unknown task in a sample":
        _samples(samples, [good, {**good, "task": "nope"}])
    elif case == "unknown --task":
        _samples(samples, [good])
        args += ["--task", "nope"]
    else:
        samples.write_text("\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
