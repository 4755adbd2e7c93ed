"""The training step follows the method: checked against an independent computation written
out here (HF's own forward and lm-head, the gate's formula with c = 8 as literals), never
against the constants of the modules under test.

One device step on a fixed rollout must produce exactly the gradients of
    loss = mean_b  mean_{t in completion b}  [ -exp(lp - sg(lp)) A_b + beta * k3(ref - lp) ]
with lp the policy's log-probs at the sampling temperature on the gate's blend of the stored
latents (thinking positions), ref the base model's (adapters off) on plain token embeddings,
A the group-normalised rewards, k3(x) = exp(x) - x - 1.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from transformers import AutoModelForCausalLM

from hrpo.engine.rollout import Rollout, left_pad
from hrpo.model.gate import HybridGate
from hrpo.train import Trainer

T_SAMPLE, BETA, G = 0.7, 0.5, 4
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def fixed_rollout(prompts, vocab, d, pad_id, seed=0):
    """A rollout as the engine returns it: 5 completion tokens (rows 2 and 5 end early), the
    first three positions of every row thinking, latents rounded to bf16 as stored."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(prompts, pad_id)
    B, T = len(prompts), 5
    comp = torch.randint(3, vocab, (B, T), generator=g)
    cmask = torch.ones(B, T, dtype=torch.bool)
    cmask[2, 3:] = False
    cmask[5, 4:] = False
    comp[~cmask] = pad_id
    think = torch.zeros(B, T, dtype=torch.bool)
    think[:, :3] = True
    latents = (torch.randn(B, T, d, generator=g) * 2).to(torch.bfloat16).float() * think[..., None]
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        completion_ids=comp,
        completion_mask=cmask,
        latents=latents,
        think_mask=think & cmask,
        logprobs=torch.zeros(B, T),
        gate_mean=torch.full((B,), 0.5),
        stats={"tokens_per_s": 1.0},
    )


def by_hand_gradients(trainer, base, out, t_logprob=T_SAMPLE):
    """The loss above, computed with HF's full forward (logits from its own lm-head) with
    log-probs at t_logprob, and its gradients with respect to every trainable parameter."""
    hm = trainer.hm
    P = out.prompt_ids.shape[1]
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    E = hm.causal_lm.get_input_embeddings().weight
    gate = hm.gate

    e = E[ids]
    ec = e[:, P:]
    r = torch.sigmoid(ec @ gate.w_r.weight.T + gate.w_r.bias)
    i = torch.sigmoid(ec @ gate.w_i.weight.T + gate.w_i.bias)
    a = torch.exp(-8.0 * F.softplus(-gate.lam) * r)
    blend = a * ec + torch.sqrt(1 - a * a + 1e-8) * (i * out.latents)
    ec = torch.where(out.think_mask[..., None], blend, ec)
    hybrid = torch.cat([e[:, :P], ec], 1)

    def logp(model, embeds):
        logits = model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos).logits
        lp = torch.log_softmax(logits[:, P - 1 : -1].float() / t_logprob, -1)
        return lp.gather(-1, out.completion_ids[..., None])[..., 0]

    lp = logp(hm.model, hybrid)
    with torch.no_grad():
        ref = logp(base, base.get_input_embeddings().weight[ids])
    rw = torch.tensor(REWARDS).view(-1, G)
    adv = ((rw - rw.mean(1, keepdim=True)) / (rw.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    x = ref - lp
    per_token = -torch.exp(lp - lp.detach()) * adv + BETA * (torch.exp(x) - x - 1)
    m = out.completion_mask.float()
    loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    params = {n: p for n, p in hm.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def make_trainer(model_dir, tmp_path, **kw):
    cfg = small_config(
        model_dir,
        tmp_path / "run",
        temperature=T_SAMPLE,
        beta=BETA,
        group_size=G,
        batch_size=8,
        grad_accum=1,
        num_iterations=1,
        loss_norm="grpo",
        max_grad_norm=1e9,
        **kw,
    )
    t = Trainer(cfg, lambda completions, answers: list(REWARDS), progress=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in t.hm.named_parameters():
            if "lora_B" in n:  # adapters that change the model, so "adapters off" is visible
                p.normal_(0, 0.3)
        t.hm.gate.lam.uniform_(-1.0, 1.0)  # an open gate, so the blend is visible
        t.hm.gate.w_r.bias.uniform_(-1.0, 1.0)
    return t


@pytest.fixture
def trainer(model_dir, tmp_path):
    return make_trainer(model_dir, tmp_path)


def step_gradients(trainer, monkeypatch):
    """(gradients one device step accumulates on a fixed rollout, that rollout); the weights
    are put back as they were before the step."""
    hm = trainer.hm
    captured, out_holder = {}, {}

    def generate(prompts, sampling, generator=None, seed=None, row_span=None):
        assert sampling.temperature == T_SAMPLE and sampling.hybrid and not sampling.greedy
        out_holder["out"] = fixed_rollout(
            prompts, hm.embed.weight.shape[0], hm.embed.weight.shape[1], trainer.tokenizer.pad_token_id
        )
        return out_holder["out"]

    real_step = trainer.optimizer_step

    def capturing_step():
        captured.update(
            {n: None if p.grad is None else p.grad.clone() for n, p in hm.named_parameters() if p.requires_grad}
        )
        return real_step()

    monkeypatch.setattr(trainer.engine, "generate", generate)
    monkeypatch.setattr(trainer, "optimizer_step", capturing_step)
    before = {n: p.detach().clone() for n, p in hm.named_parameters() if p.requires_grad}
    trainer.device_step(0)
    with torch.no_grad():  # the step moved the weights; put them back to recompute its gradient
        for n, p in hm.named_parameters():
            if n in before:
                p.copy_(before[n])
    return captured, out_holder["out"]


def test_one_step_has_the_gradients_of_the_method(trainer, model_dir, monkeypatch):
    captured, out = step_gradients(trainer, monkeypatch)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = by_hand_gradients(trainer, base, out)

    groups = {"lora_A": [], "lora_B": [], "gate.w_r": [], "gate.w_i": [], "gate.lam": []}
    for name, g in want.items():
        got = captured[name]
        assert got is not None, f"no gradient reached {name}"
        torch.testing.assert_close(got, g, rtol=2e-4, atol=1e-7, msg=f"gradient of {name}")
        for key in groups:
            if key in name:
                groups[key].append(float(g.abs().sum()))
    # Every part of the method gets a gradient: both LoRA factors, both gate linears, Lambda.
    assert all(groups[k] and all(v > 0 for v in groups[k]) for k in groups), groups


def test_logprob_temperature_1_scores_raw_logits_as_the_original(model_dir, tmp_path, monkeypatch):
    """--logprob-temperature 1: the same step's gradients are the method's with log-probs of
    the raw logits (the original's grpo_compute_loss, unsloth rl_replacements.py:237-246),
    while sampling stays at T_SAMPLE; and they differ from the default's."""
    trainer = make_trainer(model_dir, tmp_path, logprob_temperature=1.0)
    captured, out = step_gradients(trainer, monkeypatch)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = by_hand_gradients(trainer, base, out, t_logprob=1.0)
    default = by_hand_gradients(trainer, base, out)
    for name, g in want.items():
        torch.testing.assert_close(captured[name], g, rtol=2e-4, atol=1e-7, msg=f"gradient of {name}")
    lam = want["gate.lam"]
    assert (lam - default["gate.lam"]).abs().sum() > 1e-2 * lam.abs().sum()


def test_the_kl_term_and_its_reference_matter(trainer, model_dir):
    """Sanity of the test above: the by-hand gradient changes if the reference ran with
    adapters on, on hybrid inputs, or not at all, so the comparison pins each choice."""
    out = fixed_rollout(
        [[5, 6, 7]] * 4 + [[8, 9]] * 4,
        trainer.hm.embed.weight.shape[0],
        trainer.hm.embed.weight.shape[1],
        trainer.tokenizer.pad_token_id,
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = by_hand_gradients(trainer, base, out)
    lam = want["gate.lam"].abs().sum()
    adapted = by_hand_gradients(trainer, trainer.hm.model, out)  # "reference" with the adapters on
    assert (adapted["gate.lam"] - want["gate.lam"]).abs().sum() > 1e-3 * lam


def test_each_parameter_group_steps_with_its_rate_and_decay(model_dir, tmp_path):
    """One AdamW step from fresh state with gradient g: p <- p (1 - lr wd) - lr g / (|g| + 1e-8)
    (bias-corrected moments are g and g^2 at step 1); warm-up 0 gives the full rate."""
    cfg = small_config(
        model_dir,
        tmp_path / "run",
        lr_lora=0.01,
        lr_gate=0.02,
        lr_lambda=0.03,
        weight_decay=0.1,
        warmup_ratio=0.0,
        max_grad_norm=1e9,
        adam_beta1=0.9,
        adam_beta2=0.99,
    )
    t = Trainer(cfg, None, progress=False)
    rates = {
        "lora_": (0.01, 0.1),
        "gate.w_r.weight": (0.02, 0.1),
        "gate.w_i.weight": (0.02, 0.1),
        "gate.w_r.bias": (0.02, 0.1),
        "gate.w_i.bias": (0.02, 0.1),
        "gate.lam": (0.03, 0.1),
    }
    before = {}
    for n, p in t.hm.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5) * torch.where(torch.arange(p.numel()).view_as(p) % 2 == 0, 1.0, -1.0)
            before[n] = (p.detach().clone(), p.grad.clone())
    t.optimizer_step()
    seen = set()
    for n, p in t.hm.named_parameters():
        if n not in before:
            continue
        key = next(k for k in rates if k in n)
        seen.add(key)
        lr, wd = rates[key]
        p0, g = before[n]
        expect = p0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-6, msg=n)
    assert seen == set(rates)


def test_gate_formula_by_hand_with_c_8():
    """d = 2, every number written out: a = exp(-8 softplus(-Lambda) r)."""
    gate = HybridGate(2)
    with torch.no_grad():
        gate.w_r.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -0.25]]))
        gate.w_r.bias.copy_(torch.tensor([0.0, 0.5]))
        gate.w_i.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        gate.w_i.bias.copy_(torch.tensor([-1.0, 0.0]))
        gate.lam.copy_(torch.tensor([0.0, 2.0]))
    e, h = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    out, a = gate(e, h, torch.tensor([True]))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    r = [sig(0.5 * 1.0 + 0.0), sig(-0.25 * -2.0 + 0.5)]  # sigmoid(0.5), sigmoid(1.0)
    i = [sig(1.0 * -2.0 - 1.0), sig(1.0 * 1.0 + 0.0)]  # sigmoid(-3), sigmoid(1)
    softplus = [math.log(2.0), math.log(1 + math.exp(-2.0))]
    want_a = [math.exp(-8 * softplus[j] * r[j]) for j in range(2)]
    want = [want_a[j] * e[0, j].item() + math.sqrt(1 - want_a[j] ** 2 + 1e-8) * i[j] * h[0, j].item() for j in range(2)]
    assert a[0].tolist() == pytest.approx(want_a, rel=1e-6)
    assert out[0].tolist() == pytest.approx(want, rel=1e-6)
    # Numerically: a = (exp(-8 ln2 sigmoid(0.5)), exp(-8 ln(1 + e^-2) sigmoid(1))) = (0.031693, 0.476001).
    assert want_a[0] == pytest.approx(0.031693, abs=1e-6) and want_a[1] == pytest.approx(0.476001, abs=1e-6)


def test_lambda_starts_in_the_papers_range():
    """sigmoid(Lambda)^8 uniform in [0.99, 0.999], i.e. Lambda in [6.67896, 8.98663]:
    logit(0.99^(1/8)) and logit(0.999^(1/8))."""
    torch.manual_seed(0)
    lam = HybridGate(4096).lam.detach().double()
    assert lam.min() >= 6.67896 - 1e-4 and lam.max() <= 8.98663 + 1e-4
    u = torch.sigmoid(lam) ** 8
    assert u.min() < 0.9905 and u.max() > 0.9985  # the whole range is used
    assert abs(u.mean().item() - 0.9945) < 0.001  # uniform in u, not in Lambda
