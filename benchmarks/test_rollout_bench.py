"""Rollout throughput: `pytest benchmarks/ --benchmark-only`.

CPU: the embedded model, 64 new tokens with no early stop: the project's rollout
(hrpo.rollout, the reference loop until the engine lands) against the eager reference in
the original code's style. Names say method, device, model, batch;
each entry's extra_info carries tokens/s.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.eager_reference import eager_rollout
from hrpo.loading import load_base_model
from hrpo.marker import MarkerMatcher
from hrpo.model import HybridModel
from hrpo.prompts import format_prompt
from hrpo.rollout import SamplingConfig, rollout
from hrpo.synthetic import synthetic_split

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_base_model(None, torch.device("cpu"), torch.float32)
    hm = HybridModel(model).eval()
    return hm, tok, MarkerMatcher(tok, "####", model.config.vocab_size)


def prompts_for(tok, batch):
    return [tok(format_prompt(tok, ex.question, None))["input_ids"] for ex in synthetic_split("test", batch)]


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("method", ["eager_reference", "rollout_hybrid", "rollout_plain"])
def test_rollout_cpu(benchmark, tiny, method, batch):
    hm, tok, matcher = tiny
    prompts = prompts_for(tok, batch)
    g = torch.Generator().manual_seed(0)
    if method == "eager_reference":
        fn = lambda: eager_rollout(hm, tok, prompts, NEW_TOKENS, 0.5, 50, generator=g)  # noqa: E731
    else:
        cfg = SamplingConfig(NEW_TOKENS, 0.5, 50, hybrid=method == "rollout_hybrid")
        fn = lambda: rollout(hm, prompts, cfg, matcher, [], tok.pad_token_id, g)  # noqa: E731
    benchmark.name = f"{method}-cpu-tiny-b{batch}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = batch * NEW_TOKENS / benchmark.stats.stats.median
    benchmark.extra_info.update(method=method, device="cpu", model="tiny", batch=batch)
