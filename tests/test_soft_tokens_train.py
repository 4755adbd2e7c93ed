"""--method soft-tokens: one backward of the update on a seeded soft-token rollout gives exactly
the gradients of an independent computation written out here (HF's forward on inputs_embeds,
the Gaussian log-density by its formula):

    loss = mean_b mean_{t in completion b} [ -exp(lp - sg(lp)) A_b + beta * k3(ref - lp) ]

with lp the answer tokens' log-probs at the sampling temperature and, at thinking positions,
log N(stored input; p @ E, sigma^2 I), p the top-k softmax of the position's logits; the
thinking inputs are the stored noisy inputs themselves. Also the option's checks."""

import json
import math

import pytest
import torch
from conftest import build_model, small_config, stored_input_logits
from test_engine import WIDE_EOS, grouped, policy

from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.eval import latent_params, recorded_settings
from hrpo.eval import parser as eval_parser
from hrpo.train import train
from hrpo.training.checkpoint import read_checkpoint_meta
from hrpo.training.config import config_for, latent_for, validate_config
from hrpo.training.update import UpdateSettings, micro_batches, policy_backward, reference_logprobs
from hrpo_kernels.latent_input import LatentParams

T_SAMPLE, BETA, SIGMA, TOP_K = 0.8, 0.5, 0.05, 20


def independent_logp(hm, out):
    """lp (B, T) of the docstring, by HF's forward and the formulas."""
    E = hm.embed.weight
    logits = stored_input_logits(hm, out)
    lp_tok = torch.log_softmax(logits / T_SAMPLE, -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    top = (logits / T_SAMPLE).topk(TOP_K, dim=-1)
    p = torch.softmax(top.values, -1)
    mu = (p[..., None] * E[top.indices].float()).sum(-2)
    d = E.shape[1]
    dens = -((out.latents.float() - mu) ** 2).sum(-1) / (2 * SIGMA**2) - d / 2 * math.log(2 * math.pi * SIGMA**2)
    return torch.where(out.think_mask & out.completion_mask, dens, lp_tok)


def test_update_gradients_equal_the_independent_soft_token_loss(tokenizer):
    hm = policy(build_model("qwen2", len(tokenizer)))
    params = LatentParams("soft-noise", noise_std=SIGMA)
    prompts = grouped(tokenizer)[:8]
    matcher = MarkerMatcher(tokenizer, "e", len(tokenizer))  # written early: answer positions too
    cfg = SamplingConfig(max_new_tokens=10, temperature=T_SAMPLE, top_k=TOP_K, latent=params)
    out = rollout(hm, prompts, cfg, matcher, [tokenizer.eos_token_id] + WIDE_EOS, tokenizer.pad_token_id, seed=3)
    m, think = out.completion_mask, out.think_mask & out.completion_mask
    assert think.sum() > 10 and (m & ~think).sum() > 5
    B = m.shape[0]
    adv = torch.linspace(-1.0, 1.0, B)
    ref = torch.randn(out.completion_ids.shape, generator=torch.Generator().manual_seed(0)) - 2.0
    s = UpdateSettings(
        T_SAMPLE,
        True,
        BETA,
        0.2,
        "grpo",
        out.completion_ids.shape[1],
        10**6,
        share_prefix=False,
        latent=params,
        top_k=TOP_K,
    )
    hm.zero_grad()
    loss, _, finite = policy_backward(hm, out, micro_batches(out, 10**6), adv, ref, None, s)
    got = {n: p.grad.clone() for n, p in hm.named_parameters() if p.grad is not None}
    hm.zero_grad()
    lp = independent_logp(hm, out)
    delta = ref - lp
    per_token = -torch.exp(lp - lp.detach()) * adv[:, None] + BETA * (torch.exp(delta) - delta - 1)
    want_loss = ((per_token * m).sum(-1) / m.sum(-1)).mean()
    want_loss.backward()
    assert finite and loss == pytest.approx(float(want_loss), rel=1e-4, abs=1e-4)
    checked = 0
    for n, p in hm.named_parameters():
        if p.grad is None or n not in got:
            continue
        torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)
        checked += 1
    assert checked > 5 and any(g.abs().sum() > 0 for g in got.values())
    # the reference pass (no adapters here: the policy itself) sees the same inputs and densities
    with torch.no_grad():
        torch.testing.assert_close(
            reference_logprobs(hm, out, micro_batches(out, 10**6), s)[m], lp.detach()[m], atol=1e-4, rtol=1e-4
        )


def test_method_option():
    cfg = config_for("arith", method="soft-tokens", noise_std=0.2)
    validate_config(cfg)
    assert latent_for(cfg) == LatentParams("soft-noise", noise_std=0.2)
    assert latent_for(config_for("arith")) == LatentParams()
    with pytest.raises(ConfigError, match="needs --hybrid"):
        validate_config(config_for("arith", method="soft-tokens", hybrid=False))
    with pytest.raises(ConfigError, match="--tis"):
        validate_config(config_for("arith", method="soft-tokens", tis=2.0))
    with pytest.raises(ConfigError, match="noise"):
        validate_config(config_for("arith", method="soft-tokens", noise_std=0.0))


def test_soft_tokens_run_end_to_end(model_dir, tmp_path):
    """Two optimizer steps of --method soft-tokens on the embedded model: finite losses, the
    checkpoint records the method, no gate ran (gate_a is not a number)."""
    out = tmp_path / "run"
    train(small_config(model_dir, out, method="soft-tokens", noise_std=0.05), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(r["gate_a"] is None or math.isnan(r["gate_a"]) for r in records)
    meta = read_checkpoint_meta(out / "checkpoint")
    assert meta["method"] == "soft-tokens"
    # evaluation and the inspector decode it as trained unless told otherwise
    args = eval_parser().parse_args(["--checkpoint", str(out / "checkpoint")])
    recorded_settings(args, meta)
    assert latent_params(args) == LatentParams("soft-noise", noise_std=0.05)
    args = eval_parser().parse_args(["--checkpoint", str(out / "checkpoint"), "--latent-mode", "soft"])
    recorded_settings(args, meta)
    assert latent_params(args).mode == "soft"
