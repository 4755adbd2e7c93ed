"""The continuous-batching scheduler (hrpo.engine.scheduler) against the engine run on each request alone.

Requests arrive at random step boundaries into a busy batch, with mixed settings (greedy and
seeded sampling, hybrid under each latent mode and plain, n > 1, different lengths and top_k);
every choice must be token for token what RolloutEngine.generate gives for that request by itself."""

import random

import pytest
import torch
from conftest import build_model

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import RolloutEngine
from hrpo.engine.scheduler import QueueFull, Request, RequestError, Scheduler
from hrpo.model.hybrid import HybridModel
from hrpo_kernels.latent_input import MODES, LatentParams

# A slice of the vocabulary ends rows, so rows finish (and leave the batch) at scattered steps.
EOS = list(range(150, 175))


@pytest.fixture(scope="module")
def setup(tokenizer):
    hm = HybridModel(build_model("qwen2", len(tokenizer), seed=3))
    with torch.no_grad():
        hm.gate.lam.uniform_(2.0, 3.0)  # a ~ 0.73: the latent visibly changes the next input
    engine = RolloutEngine(hm.eval(), MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + EOS, tokenizer.pad_token_id)
    return engine, tokenizer


def alone(engine, req: Request) -> list[list[int]]:
    """Each choice's tokens when the engine generates the request by itself."""
    cfg = SamplingConfig(
        req.max_tokens, req.temperature, req.top_k, req.top_p, greedy=req.greedy, hybrid=req.hybrid, latent=req.latent
    )
    out = engine.generate([req.prompt] * req.n, cfg, seed=req.seed)
    return [ids[m].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]


def random_requests(tokenizer, rng: random.Random, count: int) -> list[Request]:
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "seven", "plus", "minus", "the"]
    reqs = []
    for _ in range(count):
        prompt = tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))
        reqs.append(
            Request(
                prompt,
                max_tokens=rng.randint(1, 24),
                n=rng.choice([1, 1, 2, 3]),
                temperature=rng.choice([0.5, 0.8]),
                top_k=rng.choice([0, 20]),
                greedy=rng.random() < 0.4,
                seed=rng.randint(0, 2**40),
                hybrid=rng.random() < 0.75,
                # soft-noise's sigma large enough that its noise moves the tokens
                latent=LatentParams(rng.choice(MODES), noise_std=0.5, gumbel_tau=0.5),
            )
        )
    return reqs


def test_random_arrivals_into_a_busy_batch_equal_each_request_alone(setup):
    engine, tok = setup
    rng = random.Random(5)
    reqs = random_requests(tok, rng, 20)
    sched = Scheduler(engine, max_batch=8, max_model_len=64, max_queue=64)
    arrivals = sorted(rng.randint(0, 30) for _ in reqs)
    step, pending, peak, mixed, waited = 0, list(zip(arrivals, reqs)), 0, False, False
    while pending or sched.busy():
        while pending and pending[0][0] <= step:
            sched.submit(pending.pop(0)[1])
        waited |= sched.queued > 0
        sched.step()
        peak = max(peak, sched.running)
        kinds = {(r.request.greedy, r.request.hybrid) for r in sched.rows}
        modes = {r.request.latent.mode for r in sched.rows if r.request.hybrid}
        mixed |= len(kinds) > 1 and len(modes) >= 3
        step += 1
    assert peak >= 7 and waited and mixed, (
        "the batch was never busy, or never mixed settings: the test would prove little"
    )
    for req in reqs:
        assert req.finished and req.error is None
        expected = alone(engine, req)
        assert [c.tokens for c in req.choices] == expected, f"request {req.id} differs from the engine alone"
        for c, want in zip(req.choices, expected):
            ended_by_eos = want[-1] in EOS + [tok.eos_token_id]
            assert c.finish == ("stop" if ended_by_eos else "length")
    assert sched.running == 0 and sched.queued == 0
    assert sched.stats["prefills"] < len(reqs)  # some requests joined together, prefilled as one padded batch
    # the hybrid requests blended something, the plain ones nothing; only hrpo rows have a gate
    assert any(c.thinking_tokens for r in reqs if r.hybrid for c in r.choices)
    assert all(
        (c.gate_mean is not None) == (r.hybrid and r.latent.mode == "hrpo" and c.thinking_tokens > 0)
        for r in reqs
        for c in r.choices
    )
    assert all(c.thinking_tokens == 0 and c.gate_mean is None for r in reqs if not r.hybrid for c in r.choices)


def test_stop_cancel_queue_and_bad_requests(setup):
    _, tok = setup
    engine = RolloutEngine(_.hm, MarkerMatcher(tok), [tok.eos_token_id], tok.pad_token_id)  # rows run long
    prompt = tok.encode("one two three")
    sched = Scheduler(engine, max_batch=2, max_model_len=32, max_queue=1)
    stopped = sched.submit(Request(prompt, max_tokens=20, stop=lambda j, toks: len(toks) == 5))
    sched.step()
    cancelled = sched.submit(Request(prompt, max_tokens=20, greedy=False, seed=1))
    sched.step()
    queued = sched.submit(Request(prompt, max_tokens=2))
    with pytest.raises(QueueFull, match="--max-queue 1"):
        sched.submit(Request(prompt, max_tokens=2))
    sched.step()
    assert sched.running == 2 and sched.queued == 1  # two rows are all the batch holds
    sched.cancel(cancelled)
    sched.step()
    assert cancelled.finished and cancelled.error == "cancelled"
    while sched.busy():
        sched.step()
    assert stopped.choices[0].finish == "stop" and len(stopped.choices[0].tokens) == 5
    assert queued.choices[0].finish in ("stop", "length") and queued.error is None
    assert sched.stats["cancelled"] == 1 and sched.running == 0
    for field_name, req in [
        ("max_tokens", Request(prompt, max_tokens=0)),
        ("max_tokens", Request(prompt, max_tokens=32 - len(prompt) + 1)),
        ("messages", Request(list(range(1, 33)), max_tokens=1)),
        ("n", Request(prompt, max_tokens=1, n=3)),
        ("top_k", Request(prompt, max_tokens=1, top_k=-1)),
        ("top_p", Request(prompt, max_tokens=1, top_p=0.0)),
        ("prompt", Request([len(tok) + 5], max_tokens=1)),
    ]:
        with pytest.raises(RequestError) as err:
            sched.submit(req)
        assert err.value.field == field_name


def test_non_finite_logits_fail_that_request_only(setup):
    engine, tok = setup
    sched = Scheduler(engine, max_batch=4, max_model_len=32)
    good = sched.submit(Request(tok.encode("one two"), max_tokens=6))
    bad = sched.submit(Request(tok.encode("three"), max_tokens=6, n=2))
    sched.step()
    poisoned = [i for i, r in enumerate(sched.rows) if r.request is bad]
    sched.hidden[poisoned[0]] = float("nan")  # one of its rows' state turns non-finite
    while sched.busy():
        sched.step()
    assert bad.error == "the model produced non-finite logits" and sched.stats["failed"] == 1
    assert good.error is None and [c.tokens for c in good.choices] == alone(engine, good)
