"""Soft Thinking's cold stop (hrpo/engine/rollout.py ColdStop): the entropy every sampling path
writes from its pass over the vocabulary, the counter rule on hand-made entropy sequences, and
the rule through the engine (C++ step, torch step, the GPU path's captured step) and the
reference loop, against entropies worked out by hand."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model
from test_engine import F32, WIDE_EOS, grouped, policy
from test_rollout_engine import assert_same

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import ColdStop, SamplingConfig, cold_stop_step, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.engine.scheduler import Request, RequestError, Scheduler
from hrpo.eval import main as eval_main
from hrpo.inspect.cli import main as inspect_main
from hrpo.serve.app import ApiError, Parsed, _cold_stop
from hrpo.serve.llm import LLM
from hrpo_kernels import sample_and_mix
from hrpo_kernels._common import StandInGraph, gpu_path_mode
from hrpo_kernels._ext import load_extension
from hrpo_kernels.latent_input import LatentParams
from hrpo_kernels.sample_and_mix import sample_and_mix_reference, sample_and_mix_triton

NEG = -1e4  # a logit whose probability is exp(-1e4): 0 in fp32
LN2 = math.log(2.0)


def _rows():
    """Logits rows over V = 8 (the hidden states, with lm_weight = I) and, per temperature 2
    and top_k 0 / 4, the entropy of p by hand:
    row 0 [0, 0, 0, 0, -inf..]: uniform over 4, ln 4 (top-4: the same 4 tokens);
    row 1 [2 ln 2, 0, 0, -inf..] at T = 2: p = (2, 1, 1) / 4, H = 1.5 ln 2;
    row 2 [0, 0, -1e4 + 1, -1e4 + 1, ...]: uniform over 2, ln 2 (-1e4 + 1 keeps them in a top-4
    set with probability 0)."""
    h = torch.full((3, 8), NEG)
    h[0, :4] = 0.0
    h[1, :3] = torch.tensor([2 * LN2, 0.0, 0.0])
    h[2, :2] = 0.0
    h[2, 2:] = NEG + 1
    return h, torch.tensor([2 * LN2, 1.5 * LN2, LN2])


def _sample_on(path: str, h, eye, top_k: int, **kw) -> None:
    """One sample_and_mix of _rows at temperature 2 on `path` (lm_weight = embedding = eye)."""
    if path == "reference":
        sample_and_mix_reference(h, eye, eye, 2.0, top_k, **kw)
    elif path == "triton":
        sample_and_mix_triton(h, eye, eye, 2.0, top_k, **kw)
    else:
        sample_and_mix(h, eye, eye, 2.0, top_k, impl="ext", **kw)


# the C++ twin samples top-k only: no (cpp, 0)
PATHS = [("reference", 0), ("reference", 4), ("triton", 0), ("triton", 4), ("cpp", 4)]


@pytest.mark.parametrize(("path", "top_k"), PATHS)
def test_every_path_writes_the_entropy_of_p(path, top_k):
    if path == "cpp" and load_extension() is None:
        pytest.skip("the C++ extension did not build")
    h, want = _rows()
    eye = torch.eye(8)
    seed, offset = torch.tensor([3]), torch.tensor([0])
    ent = torch.full((3,), -1.0)
    kw = dict(seed=seed, offset=offset, latent=LatentParams("soft"), entropy=ent)
    _sample_on(path, h, eye, top_k, **kw)
    torch.testing.assert_close(ent, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nucleus", ["sampler", "mixture"])
@pytest.mark.parametrize(("path", "top_k"), PATHS)
def test_the_entropy_is_of_p_after_its_nucleus(path, top_k, nucleus):
    """_rows' distributions cut to a nucleus of 0.6 (the sampler's, or the mixture's own), by
    hand: row 0's four tokens of 1/4 keep three (the mass above the fourth is 3/4), ln 3; row 1's
    (1/2, 1/4, 1/4) keeps (2/3, 1/3), ln 3 - (2/3) ln 2; row 2's (1/2, 1/2) keeps both, ln 2."""
    if path == "cpp" and load_extension() is None:
        pytest.skip("the C++ extension did not build")
    h, _ = _rows()
    want = torch.tensor([math.log(3.0), math.log(3.0) - 2 / 3 * LN2, LN2])
    eye = torch.eye(8)
    ent = torch.full((3,), -1.0)
    top_p, latent = (0.6, LatentParams("soft")) if nucleus == "sampler" else (1.0, LatentParams("soft", top_p=0.6))
    kw = dict(seed=torch.tensor([3]), offset=torch.tensor([0]), latent=latent, entropy=ent, top_p=top_p)
    _sample_on(path, h, eye, top_k, **kw)
    torch.testing.assert_close(ent, want, atol=1e-5, rtol=0)


def test_counter_fires_at_the_kth_consecutive_low_step_and_forces_the_marker():
    """tau 0.5, k 3. Row 0: entropies 0.4 0.6 0.1 0.2 0.3: counts 1 0 1 2 3, so it fires at
    step 4 (not 3) with marker token 7, then writes 9 at step 5. Row 1 is below 0.5 twice in a
    row at most (never fires). Row 2 sits at 0.5 exactly: not below (never fires)."""
    cs = ColdStop(entropy=0.5, steps=3)
    H = torch.tensor(
        [
            [0.4, 0.6, 0.1, 0.2, 0.3, 5.0, 5.0],
            [0.1, 0.2, 0.9, 0.1, 0.2, 0.7, 0.4],
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        ]
    )
    marker = torch.tensor([7, 9])
    count = torch.zeros(3, dtype=torch.int64)
    drawn = torch.tensor([1, 2, 3])
    seen, counts = [], []
    for t in range(H.shape[1]):
        thinking = torch.tensor([t < 6, True, True])  # row 0's marker is complete after step 5
        tok, lp, forced = cold_stop_step(
            cs.entropy, cs.steps, count, H[:, t], thinking, drawn, torch.full((3,), -1.5), marker
        )
        seen.append(tok.tolist())
        counts.append(count.tolist())
        assert lp.tolist() == [0.0 if f else -1.5 for f in forced.tolist()]
    assert [c[0] for c in counts] == [1, 0, 1, 2, 3, 4, 4]
    assert [c[1] for c in counts] == [1, 2, 0, 1, 2, 0, 1]
    assert [c[2] for c in counts] == [0] * 7
    assert [s[0] for s in seen] == [1, 1, 1, 1, 7, 9, 1]
    assert [s[1] for s in seen] == [2] * 7 and [s[2] for s in seen] == [3] * 7


def test_settings_are_checked():
    with pytest.raises(ValueError, match="entropy threshold must be > 0"):
        ColdStop(entropy=0.0, steps=3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ColdStop(entropy=0.1, steps=0)
    with pytest.raises(ValueError, match="plain decoding"):
        SamplingConfig(hybrid=False, cold_stop=ColdStop(0.1, 2))
    with pytest.raises(ValueError, match="gumbel-soft"):
        SamplingConfig(latent=LatentParams("gumbel-soft"), cold_stop=ColdStop(0.1, 2))


TEMP = 1000.0  # p is uniform over the top-k to within 1e-5 nats: H = ln k by hand


def _runs(tokenizer, opts, cold_stop, top_k=20, max_new=8, **kw):
    """(base: no cold stop, reference loop with cold stop, engine with cold stop) on 4 rows."""
    hm = policy(build_model("qwen2", len(tokenizer)))
    prompts = [tokenizer.encode(p) for p in ("Tom has 12 apples", "x", "What is 3 + 4?", "Sam")]
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id]
    base_cfg = SamplingConfig(max_new_tokens=max_new, temperature=TEMP, top_k=top_k, latent=LatentParams("soft"))
    cfg = SamplingConfig(**{**base_cfg.__dict__, "cold_stop": cold_stop})
    args = (matcher, eos, tokenizer.pad_token_id)
    base = rollout(hm, prompts, base_cfg, *args, seed=5, latent_dtype=torch.float32)
    ref = rollout(hm, prompts, cfg, *args, seed=5, latent_dtype=torch.float32)
    engine = RolloutEngine(hm, *args, opts)
    return base, ref, engine.generate(prompts, cfg, seed=5), matcher.marker_ids


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp", "torch"])
def test_engine_and_reference_fire_at_step_k_and_then_decode_plain(tokenizer, cpu_kernels):
    """H = ln 20 at every step; tau just above it: every row's counter reaches k = 3 at step 2,
    so steps 0-1 are the uncut rollout's, steps 2-3 the marker's two tokens (log-prob 0, not
    thinking), and the rows go on in plain tokens."""
    opts = EngineOptions(cpu_kernels=cpu_kernels, **F32)
    base, ref, out, marker = _runs(tokenizer, opts, ColdStop(entropy=math.log(20) + 1e-3, steps=3))
    assert_same(ref, out)
    assert base.think_mask[:, :4].all(), "the uncut rollout must still be thinking at step 3"
    assert torch.equal(out.completion_ids[:, :2], base.completion_ids[:, :2])
    assert torch.equal(ref.latents[:, :2], base.latents[:, :2])
    assert (out.completion_ids[:, 2:4] == torch.tensor(marker)).all()
    assert (out.logprobs[:, 2:4] == 0).all() and (out.logprobs[:, :2] < 0).all()
    assert out.think_mask[:, :2].all() and not out.think_mask[:, 2:].any()
    assert out.completion_mask[:, 4:].any(), "the rows must decode past the marker"


def test_a_threshold_never_reached_leaves_the_rollout_unchanged(tokenizer):
    """tau just below ln 20: no step is below it, so the rollout is the uncut one."""
    opts = EngineOptions(**F32)
    base, ref, out, _ = _runs(tokenizer, opts, ColdStop(entropy=math.log(20) - 1e-3, steps=1))
    assert_same(base, ref)
    assert_same(base, out)


def test_captured_step_fires_with_no_host_sync(tokenizer, monkeypatch):
    """The GPU path on the CPU (full-vocabulary Triton pass, graphs through the StandInGraph,
    which raises on a host sync): H = ln 320 (uniform over V); k = 4 fires at step 3 on every
    row, as in the reference loop."""
    replays = []
    real = StandInGraph.replay
    monkeypatch.setattr(StandInGraph, "replay", lambda self: replays.append(1) or real(self))
    with gpu_path_mode():
        opts = EngineOptions(check_every=3, **F32)
        cs = ColdStop(entropy=math.log(320) + 1e-3, steps=4)
        base, ref, out, marker = _runs(tokenizer, opts, cs, top_k=0, max_new=7)
    assert replays, "the step must have been captured and replayed"
    assert out.stats["graph_captures"] >= 1
    for name in ("completion_ids", "completion_mask", "think_mask"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert torch.equal(out.completion_ids[:, :3], base.completion_ids[:, :3])
    assert (out.completion_ids[:, 3:5] == torch.tensor(marker)).all()
    assert out.think_mask[:, :3].all() and not out.think_mask[:, 3:].any()


def test_scheduler_applies_each_requests_cold_stop_as_the_engine_alone(tokenizer):
    """A served batch mixing a request with a cold stop (fires at step 2, as above) and one
    without: each request's tokens are the engine's for that request alone."""
    hm = policy(build_model("qwen2", len(tokenizer))).eval()
    engine = RolloutEngine(hm, MarkerMatcher(tokenizer), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    cs = ColdStop(entropy=math.log(20) + 1e-3, steps=3)
    prompt = tokenizer.encode("Tom has 12 apples")
    common = dict(max_tokens=6, n=2, temperature=TEMP, top_k=20, greedy=False, seed=9, latent=LatentParams("soft"))
    with_cs, without = Request(prompt, cold_stop=cs, **common), Request(prompt, **common)
    gumbel = Request(prompt, **{**common, "latent": LatentParams("gumbel-soft", gumbel_tau=0.5)})
    sched = Scheduler(engine, max_batch=6, max_model_len=64)
    for req in (with_cs, without, gumbel):  # a gumbel-soft request beside them has no entropy to give
        sched.submit(req)
    while sched.busy():
        sched.step()
    for req in (with_cs, without, gumbel):
        cfg = SamplingConfig(6, TEMP, 20, latent=req.latent, cold_stop=req.cold_stop)
        out = engine.generate([prompt] * 2, cfg, seed=9)
        assert [c.tokens for c in req.choices] == [
            ids[m].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)
        ]
    marker = list(MarkerMatcher(tokenizer).marker_ids)
    assert all(c.tokens[2:4] == marker and c.thinking_tokens == 2 for c in with_cs.choices)
    assert all(c.tokens[2:4] != marker and c.thinking_tokens == 6 for c in without.choices)
    alone = sched.submit(Request(prompt, cold_stop=cs, **common))  # one group: its entropy written in place
    while sched.busy():
        sched.step()
    assert [c.tokens for c in alone.choices] == [c.tokens for c in with_cs.choices]
    with pytest.raises(RequestError, match="cold stop needs hybrid"):
        sched.submit(Request(prompt, cold_stop=cs, **{**common, "latent": LatentParams("gumbel-soft")}))


@pytest.mark.parametrize(
    ("spec", "hybrid", "message"),
    [
        ({"entropy": 0.1}, None, "must be an object"),
        ({"entropy": "low", "steps": 2}, None, "cold_stop.entropy must be a number"),
        ({"entropy": 0.1, "steps": 0}, None, "steps must be an int >= 1"),
        ({"entropy": 0.1, "steps": 2}, False, "hybrid is false"),
    ],
)
def test_server_field_is_checked(spec, hybrid, message):
    with pytest.raises(ApiError, match=message) as err:
        _cold_stop({"cold_stop": spec}, hybrid)
    assert err.value.param == "cold_stop"
    assert _cold_stop({"cold_stop": {"entropy": 0.01, "steps": 256}}, True) == ColdStop(0.01, 256)
    assert _cold_stop({}, True) is None


def _eval(out, *extra):
    args = ["--task", "arith", "--limit", "2", "--max-new-tokens", "4", "--output-dir", str(out), "--quiet"]
    return eval_main([*args, "--latent-mode", "soft", *extra])


def test_eval_cli_cold_stop(tmp_path, capsys):
    """hrpo.eval on the embedded model with tau = 100 nats, above ln V (no distribution over V
    tokens has more entropy), and k = 1: the first step fires, so every completion starts with
    the marker; without the flags none does. Bad combinations are one-line errors."""
    assert _eval(tmp_path / "plain") == 0
    assert _eval(tmp_path / "cold", "--cold-stop-entropy", "100", "--cold-stop-steps", "1") == 0
    plain = [json.loads(x)["completion"] for x in (tmp_path / "plain" / "samples.jsonl").read_text().splitlines()]
    cold = [json.loads(x)["completion"] for x in (tmp_path / "cold" / "samples.jsonl").read_text().splitlines()]
    assert len(cold) == 2 and all(c.startswith("####") for c in cold)
    assert not any(c.startswith("####") for c in plain)
    capsys.readouterr()
    for bad, why in (
        (["--cold-stop-entropy", "0.1"], "go together"),
        (["--cold-stop-entropy", "0.1", "--cold-stop-steps", "2", "--no-hybrid"], "--no-hybrid"),
        (["--cold-stop-entropy", "0.1", "--cold-stop-steps", "0"], "steps must be an int >= 1"),
    ):
        assert _eval(tmp_path / "bad", *bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and why in err, err


def test_server_request_carries_the_cold_stop_to_the_scheduler():
    """A completion body's cold_stop reaches the scheduler Request (Parsed, then LLM.request)."""
    llm = SimpleNamespace(
        name="m", text_prompt=lambda text: [1, 2], scheduler=SimpleNamespace(max_batch=4), latent=LatentParams()
    )
    llm.hybrid, llm.max_model_len, llm.temperature, llm.top_k, llm.top_p = True, 64, 0.5, 50, 1.0
    body = {"prompt": "hi", "latent_mode": "soft", "cold_stop": {"entropy": 0.25, "steps": 4}}
    parsed = Parsed(body, False, llm)
    req = LLM.request(llm, parsed.prompt, **parsed.settings)
    assert req.cold_stop == ColdStop(0.25, 4) and req.hybrid and req.latent.mode == "soft"
    assert LLM.request(llm, [1], **Parsed({"prompt": "hi"}, False, llm).settings).cold_stop is None


def test_inspect_cli_cold_stop(tmp_path, capsys):
    """hrpo.inspect --prompt under the same flags as the eval test (tau above ln V, k = 1): the
    completion's first tokens are the marker's; with --samples the flags are refused."""
    out = tmp_path / "inspect.json"
    args = ["--prompt", "Tom has 3 apples and buys 4 more.", "--max-new-tokens", "4", "--latent-mode", "soft"]
    cold = ["--cold-stop-entropy", "100", "--cold-stop-steps", "1"]
    assert inspect_main([*args, *cold, "--json", str(out)]) == 0
    positions = json.loads(out.read_text())["samples"][0]["positions"]
    assert "".join(p["token"] for p in positions).startswith("####")  # one token in this vocabulary
    assert not any(p["thinking"] for p in positions)
    capsys.readouterr()
    assert inspect_main(["--samples", str(out), *cold]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not to replayed --samples" in err


def test_counters_follow_their_rows_through_compaction(tokenizer):
    """Rows ending at scattered steps (a wide eos set), compaction on in both loops: the
    counters move with their rows, so the engine still equals the reference loop and every row
    that lived to step 2 wrote the marker there."""
    hm = policy(build_model("qwen2", len(tokenizer)))
    prompts = grouped(tokenizer)
    matcher, eos = MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + WIDE_EOS
    cs = ColdStop(entropy=math.log(20) + 1e-3, steps=3)
    cfg = SamplingConfig(max_new_tokens=10, temperature=TEMP, top_k=20, latent=LatentParams("soft"), cold_stop=cs)
    args = (matcher, eos, tokenizer.pad_token_id)
    ref = rollout(hm, prompts, cfg, *args, seed=3, latent_dtype=torch.float32, compact_below=0.6)
    out = RolloutEngine(hm, *args, EngineOptions(compact_below=0.6, **F32)).generate(prompts, cfg, seed=3)
    assert out.stats["compactions"] >= 1 and ref.lengths.min() < ref.lengths.max()
    assert_same(ref, out)
    alive = out.completion_mask[:, 2]
    assert alive.any() and (out.completion_ids[alive, 2] == matcher.marker_ids[0]).all()
