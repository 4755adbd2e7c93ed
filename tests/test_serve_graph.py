"""The serving scheduler's decode step replayed as a graph per batch-size bucket, on the GPU path
on the CPU (HRPO_GPU_PATH=cpu: the step "captured" into a StandInGraph, which raises on any host
sync inside it): token for token what the same scheduler gives uncaptured, with requests joining
and leaving across bucket boundaries, greedy and seeded, several settings in one batch."""

import pytest
import torch
from conftest import build_model

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import RolloutEngine
from hrpo.engine.scheduler import GRAPH_GROUPS, Request, Scheduler
from hrpo.model.hybrid import HybridModel
from hrpo_kernels._common import StandInGraph, gpu_path_mode
from hrpo_kernels.latent_input import LatentParams

EOS = list(range(150, 160))  # a slice of the vocabulary ends rows, so they leave at scattered steps


@pytest.fixture(scope="module")
def engine(tokenizer):
    hm = HybridModel(build_model("qwen2", len(tokenizer), seed=3, hidden=32))
    with torch.no_grad():
        hm.gate.lam.uniform_(2.0, 3.0)  # a ~ 0.73: the latent visibly changes the next input
    with gpu_path_mode():
        eng = RolloutEngine(hm.eval(), MarkerMatcher(tokenizer), [tokenizer.eos_token_id] + EOS, tokenizer.pad_token_id)
    assert eng.graphs and eng.dec.ext is None, "the GPU path did not come up: the test would prove nothing"
    return eng


def script(tok) -> list[tuple[int, Request]]:
    """(arrival step, request): the batch grows 1 -> 2 -> 4 -> 8 rows and shrinks as rows end."""
    p = [tok.encode(w) for w in ("one two", "seven plus", "the gamma delta", "alpha")]
    hrpo, soft = LatentParams("hrpo"), LatentParams("soft")
    return [
        (0, Request(p[0], max_tokens=16, seed=1, latent=hrpo)),
        (2, Request(p[1], max_tokens=5, greedy=False, seed=7, top_k=20, temperature=0.8, latent=hrpo)),
        (3, Request(p[2], max_tokens=8, n=2, greedy=False, seed=7, top_k=20, temperature=0.8, latent=hrpo)),
        (4, Request(p[3], max_tokens=6, n=3, seed=2, latent=soft)),
        (4, Request(p[0], max_tokens=4, hybrid=False)),
        (6, Request(p[2], max_tokens=3, greedy=False, seed=9, top_k=20, temperature=0.8, hybrid=False)),
    ]


def test_captured_step_equals_the_uncaptured_one_across_buckets(engine, tokenizer, monkeypatch):
    replays = []
    inner = StandInGraph.replay
    monkeypatch.setattr(StandInGraph, "replay", lambda self: replays.append(1) or inner(self))
    results = {}
    for graphs in (False, True):
        with gpu_path_mode():
            sched = Scheduler(engine, max_batch=8, max_model_len=24, cuda_graphs=graphs)
            pending, step = script(tokenizer), 0
            reqs = [r for _, r in pending]
            while pending or sched.busy():
                while pending and pending[0][0] <= step:
                    sched.submit(pending.pop(0)[1])
                sched.step()
                step += 1
        assert all(r.error is None and r.finished for r in reqs)
        results[graphs] = ([[c.tokens for c in r.choices] for r in reqs], sched)
    eager, graphed = results[False], results[True]
    assert graphed[0] == eager[0], "the replayed step drew other tokens than the eager one"
    sched = graphed[1]
    assert not results[False][1].graphs and sched.stats["captures"] >= 3
    buckets = {k[0] for k in sched.graphs}
    assert {1, 2, 8} <= buckets, f"the batch never crossed the bucket boundaries: {buckets}"
    # every step but a capture's (an eager step first) is a replay: the captured step really ran
    assert len(replays) == sched.stats["steps"] - sched.stats["captures"] >= 5
    assert sched.running == 0 and sched.stats["generated_tokens"] == sum(len(t) for c in graphed[0] for t in c)


def test_the_captured_step_draws_what_the_engine_draws_alone(engine, tokenizer):
    """Two requests in one captured batch (a seeded and a greedy one, two settings groups),
    each equal to the engine's rollout of it alone on the same GPU path."""
    prompt = tokenizer.encode("one two")
    reqs = [
        Request(prompt, max_tokens=6, n=2, greedy=False, seed=5, top_k=20, temperature=0.8),
        Request(tokenizer.encode("seven plus"), max_tokens=6, seed=3),
    ]
    with gpu_path_mode():
        sched = Scheduler(engine, max_batch=4, max_model_len=24)
        for r in reqs:
            sched.submit(r)
        while sched.busy():
            sched.step()
        assert sched.stats["captures"] >= 1 and GRAPH_GROUPS >= 2
        for r in reqs:
            cfg = SamplingConfig(r.max_tokens, r.temperature, r.top_k, greedy=r.greedy, hybrid=r.hybrid)
            out = engine.generate([r.prompt] * r.n, cfg, seed=r.seed)
            alone = [ids[m].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]
            assert [c.tokens for c in r.choices] == alone


def test_idle_rows_of_a_bucket_stay_inside_the_cache(engine, tokenizer):
    """A row that left a bucket keeps being decoded by its replays (3 live rows in a bucket of 4):
    parked at slot 0 it never runs past the cache. Unparked, the row that left at length P + 3
    would go on writing one slot further each step, up to slot P + M - S - 1 >= M."""
    M = 14
    short, long_prompt = tokenizer.encode("one"), tokenizer.encode("one two")
    S, P = len(short), len(long_prompt)
    assert P >= S + 2 and M - S > 3
    reqs = [Request(short, max_tokens=M - S, hybrid=False, ignore_eos=True) for _ in range(3)]
    leaver = Request(long_prompt, max_tokens=3, hybrid=False, ignore_eos=True)
    with gpu_path_mode():
        sched = Scheduler(engine, max_batch=4, max_model_len=M)
        for r in reqs + [leaver]:
            sched.submit(r)
        while sched.busy():
            sched.step()
    assert [r.error for r in reqs + [leaver]] == [None] * 4
    assert all(len(r.choices[0].tokens) == r.max_tokens for r in reqs + [leaver])
    assert {k[0] for k in sched.graphs} == {4}  # the last steps ran 3 rows in the bucket of 4


def test_requests_that_differ_only_by_seed_share_one_captured_draw(engine, tokenizer):
    """Eight sampled requests with the same settings and eight seeds (what eight chat clients
    that send no seed get: a seed drawn each): one sampling group, each row keyed by its own
    request's seed on the device, so the step is captured (more than GRAPH_GROUPS groups would
    run eagerly, each re-reading the lm-head), and every request is what the engine gives it alone."""
    prompts = [tokenizer.encode(w) for w in ("one two", "seven plus", "the gamma delta", "alpha")]
    reqs = [
        Request(prompts[i % 4], max_tokens=6, greedy=False, seed=100 + 37 * i, top_k=20, temperature=0.8)
        for i in range(8)
    ]
    assert len(reqs) > GRAPH_GROUPS
    with gpu_path_mode():
        sched = Scheduler(engine, max_batch=8, max_model_len=24)
        for r in reqs:
            sched.submit(r)
        sched.step()
        assert len(sched.plan.groups) == 1 and sched.plan.capture
        while sched.busy():
            sched.step()
        assert sched.stats["captures"] >= 1
        for r in reqs:
            cfg = SamplingConfig(r.max_tokens, r.temperature, r.top_k, greedy=r.greedy, hybrid=r.hybrid)
            out = engine.generate([r.prompt] * r.n, cfg, seed=r.seed)
            alone = [ids[m].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]
            assert [c.tokens for c in r.choices] == alone
    assert len({tuple(r.choices[0].tokens) for r in reqs[::4]}) > 1  # same prompt, other seed: other tokens
