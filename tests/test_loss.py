import math

import pytest
import torch

from hrpo.core.errors import ConfigError
from hrpo.train import main
from hrpo.training.config import config_for, validate_config
from hrpo.training.loss import group_advantages, grpo_loss, tis_weights


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expect = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1
    assert adv[0].item() == pytest.approx(expect[0], rel=1e-6)
    assert adv[1].item() == pytest.approx(expect[1], rel=1e-6)
    # A zero-variance group carries no signal: advantages exactly 0, no NaN.
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)


def hand_loss(logp, ref, adv, mask, beta):
    total = 0.0
    for b in range(len(adv)):
        terms = []
        for t in range(len(mask[b])):
            if mask[b][t]:
                d = ref[b][t] - logp[b][t]
                kl = math.exp(d) - d - 1
                terms.append(-(adv[b] - beta * kl))
        total += sum(terms) / len(terms)
    return total / len(adv)


def test_grpo_loss_value_and_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5, -0.1], [-0.3, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.1])
    loss, metrics = grpo_loss(logp, adv, mask, ref, beta=0.005)
    expect = hand_loss(logp.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.005)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # d/dlogp of -(A - beta*(exp(ref-logp) - (ref-logp) - 1)) = -A + beta*(1 - exp(ref-logp)), / n_b / B
    g = -adv[0].item() + 0.005 * (1 - math.exp(ref[0, 0].item() - logp[0, 0].item()))
    assert logp.grad[0, 0].item() == pytest.approx(g / 3 / 2, rel=1e-5)
    assert logp.grad[1, 2].item() == 0.0
    # The logged KL: each row's mean k3 over its tokens, then the mean over rows.
    k3 = [[math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(*rows)] for rows in zip(logp.tolist(), ref.tolist())]
    assert metrics["kl"] == pytest.approx((sum(k3[0]) / 3 + sum(k3[1][:2]) / 2) / 2, rel=1e-5)
    assert metrics["clip_frac"] == 0.0


def test_clipped_ratio_and_token_norms():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    old = torch.tensor([[-1.5, -2.0], [-0.5, -0.2]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logp, adv, mask, old_logp=old, beta=0.0, epsilon=0.2)
    ratio = torch.exp(logp - old)
    obj = torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    expect = -(obj[0].mean() + obj[1, 0]) / 2
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    dapo, _ = grpo_loss(logp, adv, mask, old_logp=old, beta=0.0, norm="dapo")
    assert dapo.item() == pytest.approx(-(obj[0].sum() + obj[1, 0]).item() / 3, rel=1e-6)
    dr, _ = grpo_loss(logp, adv, mask, old_logp=old, beta=0.0, norm="dr_grpo", max_completion_length=4)
    assert dr.item() == pytest.approx(-(obj[0].sum() + obj[1, 0]).item() / (2 * 4), rel=1e-6)
    with pytest.raises(ValueError, match="norm"):
        grpo_loss(logp, adv, mask, norm="mean")


def test_tis_weights_by_hand():
    train = torch.tensor([[-1.0, -2.0, -0.2]])
    rollout = torch.tensor([[-1.5, -1.0, -1.5]])
    # exp(0.5) = 1.6487, exp(-1) = 0.3679, exp(1.3) = 3.669 > 2: capped
    assert tis_weights(train, rollout, 2.0)[0].tolist() == pytest.approx([1.6487213, 0.3678794, 2.0], rel=1e-6)
    assert tis_weights(train, rollout, 1.0)[0].tolist() == pytest.approx([1.0, 0.3678794, 1.0], rel=1e-6)


def test_tis_weights_the_policy_term_and_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.3]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5], [-0.4, -0.3]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.1])
    w = torch.tensor([[1.5, 0.4], [2.0, 7.0]])
    loss, _ = grpo_loss(logp, adv, mask, ref, beta=0.1, tis=w)

    def kl(b, t):
        d = ref[b, t].item() - logp[b, t].item()
        return math.exp(d) - d - 1

    # per token: -A w + beta kl; each row averaged over its tokens, then the two rows
    row0 = (-(0.8 * 1.5) + 0.1 * kl(0, 0) - 0.8 * 0.4 + 0.1 * kl(0, 1)) / 2
    row1 = -(-1.1 * 2.0) + 0.1 * kl(1, 0)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp: (-A w + beta (1 - exp(ref - logp))) / n_b / B
    assert logp.grad[0, 1].item() == pytest.approx((-0.8 * 0.4 + 0.1 * (1 - math.exp(0.5))) / 2 / 2, rel=1e-5)
    assert logp.grad[1, 0].item() == pytest.approx((1.1 * 2.0 + 0.1 * (1 - math.exp(0.1))) / 1 / 2, rel=1e-5)
    assert logp.grad[1, 1].item() == 0.0
    # With the clipped ratio: -min(r A, clip(r) A) w. Row 0, token 0: r = exp(0.5) > 1.2 and
    # A > 0, so the clipped 1.2 A, weighted: -1.2 * 0.8 * 1.5.
    old = torch.tensor([[-1.5, -2.0], [-0.5, -0.3]])
    clipped, m = grpo_loss(logp.detach(), adv, mask, old_logp=old, beta=0.0, tis=w)
    assert clipped.item() == pytest.approx(((-1.2 * 0.8 * 1.5 - 0.8 * 0.4) / 2 + 1.1 * 2.0) / 2, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_tis_cap_must_be_positive(bad, capsys):
    with pytest.raises(ConfigError, match=r"^--tis must be a number in \(0, inf\), got"):
        validate_config(config_for("arith", tis=bad))
    validate_config(config_for("arith", tis=2.0))
    validate_config(config_for("arith"))  # off by default
    assert main(["--tis", str(bad), "--output-dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tis must be")


def test_tis_needs_logprobs_at_the_sampling_temperature():
    """The ratio is the training forward's probability over the sampler's: at another
    temperature it would weight tokens by the temperature change, not by numerical drift."""
    with pytest.raises(
        ConfigError, match=r"^--tis compares .* --logprob-temperature 1.0 differs from --temperature 0.5"
    ):
        validate_config(config_for("gsm8k", tis=2.0, logprob_temperature=1.0))
    validate_config(config_for("gsm8k", tis=2.0, logprob_temperature=0.5))
    validate_config(config_for("gsm8k", logprob_temperature=1.0))
