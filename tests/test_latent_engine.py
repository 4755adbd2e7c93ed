"""The latent modes through the rollout engine and the reference loop: under one seed both draw
the same tokens and store the same latents (each mode's next input) for every mode, with the
engine's C++ step and its torch step, compaction on; and the thinking positions' inputs are
those latents."""
import pytest
import torch
from conftest import build_model
from test_engine import F32, WIDE_EOS, both, grouped, policy
from test_rollout_engine import assert_same

from hrpo.engine.rollout import thinking_input
from hrpo.engine.rollout_engine import EngineOptions
from hrpo_kernels.latent_input import LatentParams

MODES = [LatentParams("soft"), LatentParams("moi", beta=0.5), LatentParams("soft-noise", noise_std=0.3),
         LatentParams("gumbel-soft", gumbel_tau=0.5), LatentParams("soft", temperature=0.05)]


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("params", MODES, ids=lambda p: f"{p.mode}-T{p.temperature}")
def test_engine_equals_reference_per_mode(tokenizer, params, cpu_kernels):
    hm = policy(build_model("qwen2", len(tokenizer)))
    opts = EngineOptions(compact_below=0.6, cpu_kernels=cpu_kernels, **F32)
    ref, out = both(hm, tokenizer, grouped(tokenizer), opts, eos=WIDE_EOS, latent=params, max_new_tokens=24)
    assert out.stats["cpu_ext"] == cpu_kernels
    assert out.think_mask.any() and ref.lengths.min() < ref.lengths.max()
    assert_same(ref, out)
    assert out.gate_mean.isnan().all()  # no gate ran


def test_modes_change_the_rollout_and_hrpo_is_unchanged(tokenizer):
    hm = policy(build_model("qwen2", len(tokenizer)))
    opts = EngineOptions(**F32)
    base, _ = both(hm, tokenizer, grouped(tokenizer), opts, eos=WIDE_EOS)
    hrpo, _ = both(hm, tokenizer, grouped(tokenizer), opts, eos=WIDE_EOS, latent=LatentParams("hrpo"))
    assert_same(base, hrpo)
    soft, _ = both(hm, tokenizer, grouped(tokenizer), opts, eos=WIDE_EOS, latent=LatentParams("soft"))
    assert not torch.equal(soft.completion_ids, base.completion_ids)


def test_thinking_input_is_the_latent_at_thinking_positions_only(tokenizer):
    hm = policy(build_model("qwen2", len(tokenizer)))
    e, lat = torch.randn(3, hm.embed.weight.shape[1]), torch.randn(3, hm.embed.weight.shape[1])
    think = torch.tensor([True, False, True])
    x, a = thinking_input(hm, e, lat, think, LatentParams("moi"))
    assert a is None
    assert torch.equal(x[0], lat[0]) and torch.equal(x[1], e[1]) and torch.equal(x[2], lat[2])
    x, a = thinking_input(hm, e, lat, think, LatentParams("hrpo"))
    assert a is not None and torch.equal(x[1], e[1]) and not torch.allclose(x[0], lat[0])
