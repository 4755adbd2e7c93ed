"""The update half of a step: prefix sharing, token-sized micro-batches and trimming change
how the work is laid out, never the gradient."""

import pytest
import torch
from conftest import ARCHS, build_model

from hrpo.engine.rollout import left_pad
from hrpo.model.hybrid import SequenceBatch, distinct_prompts
from hrpo.model.loading import build_policy
from hrpo.training.config import config_for
from hrpo.training.loss import grpo_loss, per_token_terms, token_weights
from hrpo.training.update import (
    UpdateSettings,
    micro_batches,
    policy_backward,
    policy_logprobs,
    reference_logprobs,
    trim,
)

PROMPTS = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3 + [[11, 12, 13]] * 2  # three groups, ragged prompts


def policy(arch, seed=0):
    torch.manual_seed(seed)
    hm = build_policy(build_model(arch, 320), config_for("gsm8k", lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        hm.gate.lam.uniform_(-1, 1)
    return hm.train()


def rollout_batch(d=64, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(PROMPTS, 0)
    B = len(PROMPTS)
    comp = torch.randint(3, 320, (B, T), generator=g)
    cmask = torch.ones(B, T, dtype=torch.bool)
    cmask[1, 4:] = False
    cmask[6, 2:] = False
    cmask[7, 5:] = False
    think = torch.zeros(B, T, dtype=torch.bool)
    think[:, :3] = True
    return SequenceBatch(
        ids, mask, comp.masked_fill(~cmask, 0), cmask, torch.randn(B, T, d, generator=g), think & cmask
    )


def grads(hm):
    out = {n: p.grad.clone() for n, p in hm.named_parameters() if p.grad is not None}
    hm.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shared_prefix_gives_the_same_logprobs_and_gradients(arch):
    hm, batch = policy(arch), rollout_batch()
    full = hm.sequence_logprobs(batch, 0.7, hybrid=True, share_prefix=False)
    (full * batch.completion_mask).sum().backward()
    g_full = grads(hm)
    shared = hm.sequence_logprobs(batch, 0.7, hybrid=True, share_prefix=True)
    (shared * batch.completion_mask).sum().backward()
    g_shared = grads(hm)
    m = batch.completion_mask
    torch.testing.assert_close(shared[m], full[m], rtol=1e-5, atol=1e-5)
    assert (
        g_full.keys() == g_shared.keys() and len(g_full) == 2 * 7 * 2 + 5
    )  # LoRA A/B of 7 projections x 2 layers, gate
    for n in g_full:  # fp32 sums in another order: within a millionth of each tensor's scale
        torch.testing.assert_close(g_shared[n], g_full[n], rtol=1e-4, atol=2e-6 * float(g_full[n].abs().max()), msg=n)


def test_micro_batches_hold_whole_groups_within_the_token_budget():
    batch = rollout_batch()
    # Groups (prompt length, longest completion): rows 0-2 (4, 6), 3-5 (2, 6), 6-7 (3, 5),
    # taken longest first: 10, 8, 8 (ties in order). Padded cost of a set: distinct prompts x
    # widest prompt + rows x widest completion.
    assert [r.tolist() for r in micro_batches(batch, 10**6)] == [[0, 1, 2, 3, 4, 5, 6, 7]]
    # Budget 36: group 0 costs 1*4 + 3*6 = 22, with group 1 2*4 + 6*6 = 44 > 36, so it goes
    # alone; groups 1 and 2 together cost 2*3 + 5*6 = 36.
    assert [r.tolist() for r in micro_batches(batch, 36)] == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert [r.tolist() for r in micro_batches(batch, 35)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [r.tolist() for r in micro_batches(batch, 1)] == [[0, 1, 2], [3, 4, 5], [6, 7]]  # a group never splits


def test_trim_drops_padding_columns():
    batch = rollout_batch()
    sub = trim(batch, torch.tensor([6, 7]))
    assert sub.prompt_ids.tolist() == [[11, 12, 13]] * 2  # the 4-wide prompt padding dropped
    assert sub.completion_ids.shape == (2, 5) and sub.completion_mask.sum().item() == 2 + 5


def test_distinct_prompts_by_hand():
    # Left-padded with pad id 0, [7] and [0, 7] have the same ids: only the mask tells them apart.
    # First appearance ([9], [0, 7], [7]) is not unique()'s sorted order.
    prompts = [[9], [0, 7], [9], [7], [0, 7]]
    first, inverse = distinct_prompts(*left_pad(prompts, 0))
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    ids = torch.tensor([[9, 0], [0, 7], [9, 0], [7, 0], [0, 7]])  # the same prompts right-padded
    mask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    first, inverse = distinct_prompts(ids, mask)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    def w(*a, **k):
        return token_weights(mask, *a, **k).double()

    torch.testing.assert_close(w("grpo"), torch.tensor([[1 / 4, 1 / 4, 0], [1 / 6, 1 / 6, 1 / 6]], dtype=torch.float64))
    torch.testing.assert_close(w("dapo"), torch.tensor([[1 / 5, 1 / 5, 0], [1 / 5] * 3], dtype=torch.float64))
    torch.testing.assert_close(
        w("dr_grpo", max_completion_length=4), torch.tensor([[1 / 8, 1 / 8, 0], [1 / 8] * 3], dtype=torch.float64)
    )
    # A share of a larger batch (one rank's rows): its totals come from outside.
    torch.testing.assert_close(
        w("grpo", n_rows=4), torch.tensor([[1 / 8, 1 / 8, 0], [1 / 12] * 3], dtype=torch.float64)
    )
    torch.testing.assert_close(w("dapo", n_tokens=10)[1], torch.tensor([0.1] * 3, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("clipped", [False, True])
def test_micro_batched_update_equals_the_whole_batch(norm, clipped):
    hm, batch = policy("qwen2"), rollout_batch()
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.3, -0.6, 1.0, -1.0])
    s = UpdateSettings(
        0.7, True, beta=0.5, epsilon=0.2, loss_norm=norm, max_completion_length=6, micro_batch_tokens=10**6
    )
    old = None
    if clipped:
        with torch.no_grad():
            old = hm.sequence_logprobs(batch, 0.7) + 0.3 * torch.randn(batch.completion_ids.shape)
    whole = [torch.arange(8)]
    ref = reference_logprobs(hm, batch, whole, s)
    # The whole batch through the plain loss on the full-width forward.
    logp = hm.sequence_logprobs(batch, 0.7, hybrid=True)
    want_loss, want_info = grpo_loss(logp, adv, batch.completion_mask, ref, old, 0.5, 0.2, norm, 6)
    want_loss.backward()
    want = grads(hm)
    for micro_batch_tokens in (10**6, 1):  # one micro-batch; one group per micro-batch
        plan = micro_batches(batch, micro_batch_tokens)
        ref_mb = reference_logprobs(hm, batch, plan, s)
        m = batch.completion_mask  # positions past a completion's end are never read
        torch.testing.assert_close(ref_mb[m], ref[m], rtol=1e-5, atol=1e-6)
        loss, info, finite = policy_backward(hm, batch, plan, adv, ref_mb, old, s)
        got = grads(hm)
        assert finite and loss == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-7)
        assert info["kl"] == pytest.approx(want_info["kl"], rel=1e-4)
        assert info["clip_frac"] == pytest.approx(want_info["clip_frac"])
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_reference_pass_uses_the_base_model_on_plain_tokens():
    """Adapters off and no blend: the reference equals the policy's plain log-probs only
    once the adapters are zeroed."""
    hm, batch = policy("llama"), rollout_batch()
    s = UpdateSettings(0.7, True, 0.5, 0.2, "grpo", 6, 10**6)
    ref = reference_logprobs(hm, batch, [torch.arange(8)], s)
    with torch.no_grad():
        adapted = hm.sequence_logprobs(batch, 0.7, hybrid=False)
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.zero_()
        plain = hm.sequence_logprobs(batch, 0.7, hybrid=False)
    m = batch.completion_mask
    assert (adapted - ref)[m].abs().max() > 1e-3
    torch.testing.assert_close(ref[m], plain[m], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(model_dir, tmp_path):
    from conftest import small_config

    from hrpo.train import Trainer

    got = {}
    for gc in (False, True):
        t = Trainer(small_config(model_dir, tmp_path / f"run{gc}", gradient_checkpointing=gc), None, progress=False)
        captured = {}
        real = t.optimizer_step

        def capture(real=real, captured=captured, t=t):
            captured.update({n: p.grad.clone() for n, p in t.hm.named_parameters() if p.grad is not None})
            return real()

        t.optimizer_step = capture
        t.device_step(0)
        got[gc] = captured
    assert got[True].keys() == got[False].keys() and got[True]
    for n in got[False]:
        torch.testing.assert_close(got[True][n], got[False][n], rtol=1e-4, atol=1e-7, msg=n)


def counting(hm):
    """hm.sequence_logprobs, counted: one call per micro-batch forward."""
    calls = []
    real = hm.sequence_logprobs

    def forward(*args, **kwargs):
        calls.append(args[0].completion_ids.shape[0])
        return real(*args, **kwargs)

    hm.sequence_logprobs = forward
    return calls


def test_padding_micro_batches_run_forwards_and_leave_the_gradient_alone():
    """A rank whose plan is shorter than the agreed length runs one-row micro-batches that
    make the forward and backward (FSDP's collectives) but add nothing."""
    hm, batch = policy("qwen2"), rollout_batch()
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.3, -0.6, 1.0, -1.0])
    s = UpdateSettings(
        0.7, True, beta=0.5, epsilon=0.2, loss_norm="grpo", max_completion_length=6, micro_batch_tokens=10**6
    )
    plan = micro_batches(batch, 36)  # two micro-batches
    calls = counting(hm)
    ref = reference_logprobs(hm, batch, plan, s)
    loss, info, _ = policy_backward(hm, batch, plan, adv, ref, None, s)
    want = grads(hm)
    assert calls == [3, 5, 3, 5]
    calls.clear()
    ref_padded = reference_logprobs(hm, batch, plan, s, length=4)
    loss_padded, info_padded, finite = policy_backward(hm, batch, plan, adv, ref_padded, None, s, length=4)
    got = grads(hm)
    assert calls == [3, 5, 1, 1, 3, 5, 1, 1]
    assert torch.equal(ref_padded, ref) and finite and loss_padded == loss and info_padded == info
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_a_non_finite_micro_batch_still_runs_the_others():
    """Its loss is reported non-finite, and the later micro-batches still run (on several
    ranks their collectives are awaited); the caller drops the update."""
    hm, batch = policy("qwen2"), rollout_batch()
    adv = torch.tensor([float("nan"), -0.5, -0.5, 0.3, 0.3, -0.6, 1.0, -1.0])
    s = UpdateSettings(
        0.7, True, beta=0.0, epsilon=0.2, loss_norm="grpo", max_completion_length=6, micro_batch_tokens=10**6
    )
    plan = micro_batches(batch, 1)  # rows 0-2 (the NaN) first, then 3-5 and 6-7
    calls = counting(hm)
    loss, info, finite = policy_backward(hm, batch, plan, adv, None, None, s, length=4)
    assert calls == [3, 3, 2, 1] and not finite
    assert loss != loss and info["kl"] != info["kl"]


def test_policy_logprobs_are_the_training_forward_without_gradient():
    hm, batch = policy("llama"), rollout_batch()
    s = UpdateSettings(0.7, True, 0.5, 0.2, "grpo", 6, 10**6)
    got = policy_logprobs(hm, batch, micro_batches(batch, 1), s)
    assert not got.requires_grad
    with torch.no_grad():
        want = hm.sequence_logprobs(batch, 0.7, hybrid=True)
        plain = hm.sequence_logprobs(batch, 0.7, hybrid=False)
    m = batch.completion_mask
    torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-6)
    assert (plain - got)[m].abs().max() > 1e-3  # the blend is in: hybrid as in the update


def text_reward(completions, answers):
    return [float(sum(map(ord, c)) % 2) for c in completions]  # mixed rewards: live advantages


def first_step(model_dir, out, monkeypatch, shift=0.0, **kw):
    """Step 0 of a Trainer on the tiny model, watched: its rollout and advantages, the
    gradients at the first optimizer step, what each policy pass returned, logp - old in each
    clipped ratio, and the calls of policy_logprobs. `shift` is added to the engine's
    log-probs of even rows and taken from odd ones (a sampler that disagrees with training)."""
    from conftest import small_config

    import hrpo.training.step
    import hrpo.training.update
    from hrpo.train import Trainer

    t = Trainer(small_config(model_dir, out, **kw), text_reward, progress=False)
    seen = {"passes": [], "logp_minus_old": [], "policy_logprobs": 0}
    generate, optimizer_step, group_advantages = (
        t.engine.generate,
        t.optimizer_step,
        hrpo.training.step.group_advantages,
    )

    def shifted(*args, **kwargs):
        out = generate(*args, **kwargs)
        sign = 1 - 2 * (torch.arange(out.logprobs.shape[0]) % 2)
        out.logprobs = out.logprobs + shift * sign[:, None]
        seen["rollout"] = out
        return out

    def capture():
        if "grads" not in seen:
            seen["grads"] = {n: p.grad.clone() for n, p in t.hm.named_parameters() if p.grad is not None}
        return optimizer_step()

    def advantages(*args):
        seen["adv"] = group_advantages(*args)
        return seen["adv"]

    def terms(logp, adv, ref, old, *args):
        if old is not None:
            seen["logp_minus_old"].append(logp.detach() - old)
        return per_token_terms(logp, adv, ref, old, *args)

    def backward(*args, **kwargs):
        seen["passes"].append(policy_backward(*args, **kwargs))
        return seen["passes"][-1]

    def old_logprobs(*args, **kwargs):
        seen["policy_logprobs"] += 1
        return policy_logprobs(*args, **kwargs)

    monkeypatch.setattr(hrpo.training.step, "group_advantages", advantages)
    monkeypatch.setattr(hrpo.training.step, "policy_backward", backward)
    monkeypatch.setattr(hrpo.training.step, "policy_logprobs", old_logprobs)
    monkeypatch.setattr(hrpo.training.update, "per_token_terms", terms)
    t.engine.generate, t.optimizer_step = shifted, capture
    t.device_step(0)
    return t, seen


def test_more_iterations_start_from_the_training_forwards_log_probs(model_dir, tmp_path, monkeypatch):
    """--num-iterations 2: the old log-probs are the training forward's (computed once per
    rollout), so the first pass's ratio is exactly 1, nothing is clipped, and its gradient is
    the one-iteration gradient; one iteration computes no old log-probs at all."""
    _, one = first_step(model_dir, tmp_path / "one", monkeypatch, beta=0.0)
    _, two = first_step(model_dir, tmp_path / "two", monkeypatch, beta=0.0, num_iterations=2)
    assert one["policy_logprobs"] == 0 and one["logp_minus_old"] == []
    assert two["policy_logprobs"] == 1 and len(two["passes"]) == 2
    half = len(two["logp_minus_old"]) // 2
    first, second = two["logp_minus_old"][:half], two["logp_minus_old"][half:]
    assert first and all(torch.equal(d, torch.zeros_like(d)) for d in first)
    assert two["passes"][0][1]["clip_frac"] == 0.0
    assert max(float(d.abs().max()) for d in second) > 0  # the second pass: after an update, the same old
    assert torch.equal(two["rollout"].completion_ids, one["rollout"].completion_ids)
    assert two["adv"].abs().max() > 0 and one["grads"].keys() == two["grads"].keys()
    for n in one["grads"]:
        torch.testing.assert_close(two["grads"][n], one["grads"][n], rtol=1e-5, atol=1e-8, msg=n)


def test_tis_weights_each_token_by_the_capped_ratio_to_the_sampler(model_dir, tmp_path, monkeypatch):
    """--tis 1.3 with a sampler whose log-probs are 0.5 above the training forward's on even
    rows and 0.5 below on odd ones: the gradient is the policy gradient with each token
    weighted min(exp(train - sampler), 1.3), i.e. about exp(-0.5) on even rows and 1.3 on odd."""
    t, seen = first_step(model_dir, tmp_path / "tis", monkeypatch, shift=0.5, beta=0.0, tis=1.3, grad_accum=2)
    assert "grads" not in seen  # grad_accum 2: no optimizer step yet, the weights are the rollout's
    out, adv, hm = seen["rollout"], seen["adv"], t.hm
    params = {n: p for n, p in hm.named_parameters() if p.grad is not None}
    logp = hm.sequence_logprobs(out, t.cfg.temperature, hybrid=True)
    w = torch.clamp(torch.exp(logp.detach() - out.logprobs), max=1.3)
    m = out.completion_mask.float()
    assert (w[m.bool()] == 1.3).any() and (w[m.bool()] < 0.7).any() and adv.abs().max() > 0
    # grpo: each completion's tokens averaged, then the batch; grad_accum 2 halves the step's share
    loss = -((w * adv[:, None] * logp * m).sum(-1) / m.sum(-1)).mean() / 2
    hand = torch.autograd.grad(loss, list(params.values()))
    for (n, p), g in zip(params.items(), hand):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7, msg=n)
