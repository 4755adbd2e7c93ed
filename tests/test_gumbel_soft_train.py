"""--method gumbel-soft (SofT-GRPO): the thinking positions' Gumbel log-density on numbers worked
out by hand, the recorded g' against the rollout's own inputs, the training forward's inputs
against the rollout's bit for bit, one backward of the update against an independent
computation written out here (HF's forward on inputs_embeds, the Gumbel density by its formula,
the noise from the Philox counters of the rollout's convention):

    loss = mean_b mean_{t in completion b} [ -exp(lp - sg(lp)) A_b + beta * k3(ref - lp) ]

with lp the answer tokens' log-probs at the sampling temperature and, at thinking positions,
mean_{v: log q_v > -3} [-e_v - exp(-e_v)], e_v = clamp(g'_v - log q_v, -1.5, 3), q the top-k
softmax of the position's logits and g'_v = sg(log q_v) + g_v its Gumbel-perturbed log-probs.
Then the option's checks and a two-step run of `train`."""

import json
import math

import pytest
import torch
from conftest import build_model, small_config, stored_input_logits
from test_engine import F32, WIDE_EOS, grouped, policy

from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout
from hrpo.engine.rollout_engine import EngineOptions, RolloutEngine
from hrpo.eval import latent_params, recorded_settings
from hrpo.eval import parser as eval_parser
from hrpo.model import lora
from hrpo.train import train
from hrpo.training.checkpoint import read_checkpoint_meta
from hrpo.training.config import config_for, latent_for, validate_config
from hrpo.training.update import (
    UpdateSettings,
    micro_batches,
    policy_backward,
    record_gumbel_targets,
    reference_logprobs,
    trim,
)
from hrpo_kernels.latent_input import LatentParams, gumbel_logdensity, gumbel_targets, latent_input_reference
from hrpo_kernels.philox import philox_uniform

T_SAMPLE, BETA, TAU, TOP_K, SEED = 0.8, 0.5, 0.5, 5, 3
PARAMS = LatentParams("gumbel-soft", gumbel_tau=TAU)


def test_gumbel_logdensity_by_hand():
    """q = (0.9, 0.08, 0.02), g' = (0.1, 2.0, 0.0): e_0 = 0.1 - ln 0.9 = 0.2053605, exp(-e_0) =
    0.9 exp(-0.1) = 0.8143537, term -1.0197142; e_1 = 2 - ln 0.08 = 4.53 clamps to 3, term
    -3 - exp(-3) = -3.0497871; ln 0.02 = -3.91 < -3 is left out: mean -2.0347506. Gradient in
    the logits: only candidate 0 (candidate 1 is clamped), (1 - exp(-e_0)) / 2 * (onehot_0 - q)
    = 0.0928232 * (0.1, -0.08, -0.02)."""
    logits = torch.log(torch.tensor([[0.9, 0.08, 0.02]])).requires_grad_(True)
    ids, g = torch.tensor([[0, 1, 2]]), torch.tensor([[0.1, 2.0, 0.0]])
    got = gumbel_logdensity(logits, ids, g, PARAMS, 1.0)
    assert got.item() == pytest.approx(-2.0347506, abs=1e-6)
    got.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.00928232, -0.00742585, -0.00185646]]), atol=1e-7, rtol=0)
    # the mixture's temperature divides the logits: twice the logits at T = 2 is the same q
    doubled = gumbel_logdensity(2 * logits.detach(), ids, g, PARAMS, 2.0)
    assert doubled.item() == pytest.approx(-2.0347506, abs=1e-6)
    # candidates outside the stored ids do not enter q (renormalised over the stored ones)
    wider = torch.log(torch.tensor([[0.45, 0.04, 0.01, 0.5]]))
    assert gumbel_logdensity(wider, ids, g, PARAMS, 1.0).item() == pytest.approx(-2.0347506, abs=1e-6)


def test_no_candidate_above_the_cut_averages_all():
    """25 equal candidates (q = 0.04 < e^-3) at g' = ln 0.04: e = 0, each term -0 - e^0 = -1."""
    logits = torch.zeros(1, 25)
    ids = torch.arange(25)[None]
    g = torch.full((1, 25), math.log(0.04))
    assert gumbel_logdensity(logits, ids, g, PARAMS, 1.0).item() == pytest.approx(-1.0, abs=1e-6)


def test_gumbel_targets_by_hand_and_against_the_op():
    """V = 4, q = (0.5, 0.3, 0.15, 0.05), top-2: ids (0, 1), p = (0.625, 0.375); step 1 of row
    2 in a batch of 5 is Philox row 1 * 5 + 2 = 7, counters 28, 29. Its weights softmax(g' / tau)
    mix the input that the op (the rollout's) makes at offset 1 * 5 * 4 with row id 2."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    ids, g_prime = gumbel_targets(logits, PARAMS, 1.0, 2, 11, torch.tensor([7]))
    assert ids.tolist() == [[0, 1]]
    u = philox_uniform(11, torch.tensor([28, 29]))
    want = torch.log(torch.tensor([0.625, 0.375])) - torch.log(-torch.log(u))
    torch.testing.assert_close(g_prime[0], want, atol=1e-6, rtol=0)
    E = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    x = latent_input_reference(
        logits, E, torch.tensor([0]), PARAMS, 1.0, 2, seed=11, offset=20, row_ids=torch.tensor([2])
    )
    torch.testing.assert_close(torch.softmax(g_prime / TAU, -1) @ E[ids[0]], x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="top_k"):
        gumbel_targets(logits, PARAMS, 1.0, 0, 11, torch.tensor([7]))


def seeded_rollout(hm, tokenizer, record=None):
    """8 rows, 10 tokens, the marker "e" written early so that answer positions come too."""
    matcher = MarkerMatcher(tokenizer, "e", len(tokenizer))
    cfg = SamplingConfig(max_new_tokens=10, temperature=T_SAMPLE, top_k=TOP_K, latent=PARAMS)
    eos = [tokenizer.eos_token_id] + WIDE_EOS
    return rollout(hm, grouped(tokenizer)[:8], cfg, matcher, eos, tokenizer.pad_token_id, seed=SEED)


def settings(out, share_prefix=False):
    width = out.completion_ids.shape[1]
    return UpdateSettings(
        T_SAMPLE, True, BETA, 0.2, "grpo", width, 10**6, share_prefix=share_prefix, latent=PARAMS, top_k=TOP_K
    )


def test_training_forward_replays_the_rollout_inputs(tokenizer):
    """Every input the rollout fed the decoder is the training forward's, bit for bit (fp32), and
    the recorded g' rebuild the stored thinking inputs: softmax(g' / tau) @ E[ids]."""
    hm = policy(build_model("qwen2", len(tokenizer)))
    fed, decoder = [], hm.decoder
    hm.decoder = lambda x, *a, **k: fed.append(x) or decoder(x, *a, **k)
    out = seeded_rollout(hm, tokenizer)
    rolled = torch.cat(fed[1:], dim=1)  # the prefill, then one input per step
    fed.clear()
    s = settings(out)
    plan = micro_batches(out, 10**6)
    record_gumbel_targets(hm, out, plan, s)
    hm.completion_hidden(trim(out, plan[0]), True, False, PARAMS)
    B, T = out.completion_ids.shape
    P = out.prompt_ids.shape[1]
    m, think = out.completion_mask[:, : T - 1], (out.think_mask & out.completion_mask)
    assert think.sum() > 10 and (out.completion_mask & ~think).sum() > 5
    trained = fed[-1][:, P:]  # inputs of completion tokens 0 .. T-2
    assert torch.equal(trained[m], rolled[:, : T - 1][m])
    E = hm.embed.weight
    rebuilt = (torch.softmax(out.gumbel_values / TAU, -1)[..., None] * E[out.gumbel_ids]).sum(-2)
    torch.testing.assert_close(rebuilt[think], out.latents[think].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp", "torch"])
def test_engine_rollout_records_its_noise(tokenizer, cpu_kernels):
    """The fast engine's rollout of rows 8.. of a 16-row batch records that seed and those rows,
    and the g' they give rebuild its thinking inputs (fp32 latents)."""
    hm = policy(build_model("qwen2", len(tokenizer)))
    engine = RolloutEngine(
        hm,
        MarkerMatcher(tokenizer, "e", len(tokenizer)),
        [tokenizer.eos_token_id] + WIDE_EOS,
        tokenizer.pad_token_id,
        EngineOptions(compact_below=0.6, cpu_kernels=cpu_kernels, **F32),
    )
    cfg = SamplingConfig(max_new_tokens=10, temperature=T_SAMPLE, top_k=TOP_K, latent=PARAMS)
    out = engine.generate(grouped(tokenizer)[:8], cfg, seed=SEED, row_span=(8, 16))
    assert (out.noise_seed, out.noise_rows.tolist(), out.noise_total) == (SEED, list(range(8, 16)), 16)
    record_gumbel_targets(hm, out, micro_batches(out, 10**6), settings(out, share_prefix=True))
    think = out.think_mask & out.completion_mask
    assert think.sum() > 10
    E = hm.embed.weight
    rebuilt = (torch.softmax(out.gumbel_values / TAU, -1)[..., None] * E[out.gumbel_ids]).sum(-2)
    torch.testing.assert_close(rebuilt[think], out.latents[think].float(), atol=1e-5, rtol=1e-5)


def independent_logp(hm, out, anchor=None):
    """(lp (B, T) of the module docstring, by HF's forward and the formulas; its candidates and
    sg(log q)). anchor: those of g' when not this forward's (the reference scores the policy's g'
    on the policy's candidates)."""
    B, T = out.completion_ids.shape
    logits = stored_input_logits(hm, out)
    lp_tok = torch.log_softmax(logits / T_SAMPLE, -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    ids = (logits / T_SAMPLE).topk(TOP_K, dim=-1).indices if anchor is None else anchor[0]
    logq = torch.log_softmax((logits / T_SAMPLE).gather(-1, ids), -1)
    V = logits.shape[-1]
    # step t of row r drew philox_uniform(seed, t * B * V + r * V + v) (hrpo/engine/rollout.py)
    ctr = (torch.arange(T)[None, :, None] * B + torch.arange(B)[:, None, None]) * V + ids
    g_prime = (logq.detach() if anchor is None else anchor[1]) - torch.log(-torch.log(philox_uniform(SEED, ctr)))
    e = (g_prime - logq).clamp(-1.5, 3.0)
    keep = (logq.detach() > -3).float()
    dens = ((-e - torch.exp(-e)) * keep).sum(-1) / keep.sum(-1)
    return torch.where(out.think_mask & out.completion_mask, dens, lp_tok), (ids, logq.detach())


def test_update_gradients_equal_the_independent_gumbel_loss(tokenizer):
    model = lora.attach(build_model("qwen2", len(tokenizer)), 4, 8, ("q_proj", "v_proj"))
    hm = policy(model)
    with torch.no_grad():  # LoRA's B starts at 0: give the adapters a value so that A gets gradients too
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = seeded_rollout(hm, tokenizer)
    m, think = out.completion_mask, out.think_mask & out.completion_mask
    assert think.sum() > 10 and (m & ~think).sum() > 5
    B = m.shape[0]
    adv = torch.linspace(-1.0, 1.0, B)
    ref = torch.randn(out.completion_ids.shape, generator=torch.Generator().manual_seed(0)) - 2.0
    s = settings(out, share_prefix=True)
    plan = micro_batches(out, 10**6)
    record_gumbel_targets(hm, out, plan, s)
    hm.zero_grad()
    loss, _, finite = policy_backward(hm, out, plan, adv, ref, None, s)
    got = {n: p.grad.clone() for n, p in hm.named_parameters() if p.grad is not None}
    hm.zero_grad()
    lp, anchor = independent_logp(hm, out)
    delta = ref - lp
    per_token = -torch.exp(lp - lp.detach()) * adv[:, None] + BETA * (torch.exp(delta) - delta - 1)
    want_loss = ((per_token * m).sum(-1) / m.sum(-1)).mean()
    want_loss.backward()
    assert finite and loss == pytest.approx(float(want_loss), rel=1e-4, abs=1e-4)
    lora_grads = [n for n in got if "lora_" in n]
    assert len(lora_grads) >= 4 and all(got[n].abs().sum() > 0 for n in lora_grads)
    for n, p in hm.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)
    # the reference pass (adapters off) scores the same g' under the base model
    with torch.no_grad(), hm.adapters_disabled():
        base, _ = independent_logp(hm, out, anchor=anchor)
    torch.testing.assert_close(reference_logprobs(hm, out, plan, s)[m], base[m], atol=1e-4, rtol=1e-4)


def test_method_option():
    cfg = config_for("arith", method="gumbel-soft", gumbel_tau=0.2, top_k=5)
    validate_config(cfg)
    assert latent_for(cfg) == LatentParams("gumbel-soft", gumbel_tau=0.2)
    with pytest.raises(ConfigError, match="needs --hybrid"):
        validate_config(config_for("arith", method="gumbel-soft", hybrid=False))
    with pytest.raises(ConfigError, match="--top-k >= 1"):
        validate_config(config_for("arith", method="gumbel-soft", top_k=0))
    with pytest.raises(ConfigError, match="--tis"):
        validate_config(config_for("arith", method="gumbel-soft", tis=2.0))
    with pytest.raises(ConfigError, match="--gumbel-tau"):
        validate_config(config_for("arith", method="gumbel-soft", gumbel_tau=0.0))
    with pytest.raises(ConfigError, match="--logprob-temperature"):
        validate_config(config_for("arith", method="gumbel-soft", temperature=1.0, logprob_temperature=0.5))


def test_gumbel_soft_run_end_to_end(model_dir, tmp_path):
    """Two optimizer steps of --method gumbel-soft on the embedded model: finite losses, the
    checkpoint records the method and its tau, no gate ran (gate_a is not a number)."""
    out = tmp_path / "run"
    train(small_config(model_dir, out, method="gumbel-soft", gumbel_tau=0.3, top_k=5), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(r["gate_a"] is None or math.isnan(r["gate_a"]) for r in records)
    meta = read_checkpoint_meta(out / "checkpoint")
    assert (meta["method"], meta["latent_mode"], meta["gumbel_tau"]) == ("gumbel-soft", "gumbel-soft", 0.3)
    # evaluation decodes it with the tau it was trained with unless told otherwise
    args = eval_parser().parse_args(["--checkpoint", str(out / "checkpoint")])
    recorded_settings(args, meta)
    assert latent_params(args) == LatentParams("gumbel-soft", gumbel_tau=0.3)
    args = eval_parser().parse_args(["--checkpoint", str(out / "checkpoint"), "--gumbel-tau", "0.5"])
    recorded_settings(args, meta)
    assert latent_params(args).gumbel_tau == 0.5
