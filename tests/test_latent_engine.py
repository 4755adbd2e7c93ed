"""The latent modes through the rollout engine and the reference loop: under one seed both draw
the same tokens and store the same latents (each mode's next input) for every mode, with the
engine's C++ step and its torch step, compaction on; and the thinking positions' inputs are
those latents."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from test_engine import F32, WIDE_EOS, both, grouped, policy
from test_rollout_engine import assert_same

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig, rollout, thinking_input
from hrpo.engine.rollout_engine import EngineOptions
from hrpo.inspect import replay
from hrpo.model.loading import load_base_model
from hrpo_kernels.latent_input import LatentParams, gaussian_noise

ROOT = Path(__file__).resolve().parents[1]
MODES = [
    LatentParams("soft"),
    LatentParams("moi", beta=0.5),
    LatentParams("soft-noise", noise_std=0.3),
    LatentParams("gumbel-soft", gumbel_tau=0.5),
    LatentParams("soft", temperature=0.05),
]


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


def test_replay_under_soft_feeds_the_mixture_and_shows_its_tokens(tokenizer):
    """The inspector's replay under soft: position 0's weights are softmax(logits / T) over the
    top-k of the prompt's last logits (computed here from HF's forward), its latent is their
    mixture of E, and position 1's weights come from the model fed that latent as an input."""
    hm = policy(build_model("qwen2", len(tokenizer))).eval()
    matcher = MarkerMatcher(tokenizer, "####", len(tokenizer))
    prompt, completion = tokenizer.encode("Tom has 12 apples"), tokenizer.encode(" so 19")
    batch, mixed = replay(
        hm, prompt, completion, matcher, 0.7, 6, latent=LatentParams("soft"), k=6, latent_dtype=torch.float32
    )
    E = hm.embed.weight
    lm = hm.causal_lm
    with torch.no_grad():
        logits0 = lm(input_ids=torch.tensor([prompt])).logits[0, -1].float()
        top = (logits0 / 0.7).topk(6)
        w0 = torch.softmax(top.values, -1)
        assert mixed[0][0] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(mixed[0][1]), w0)
        torch.testing.assert_close(batch.latents[0, 0], w0 @ E[top.indices].float(), atol=1e-6, rtol=1e-5)
        embeds = torch.cat([E[torch.tensor(prompt)], batch.latents[0, :1].to(E.dtype)])[None]
        logits1 = lm(inputs_embeds=embeds).logits[0, -1].float()
        top1 = (logits1 / 0.7).topk(6)
        assert mixed[1][0] == top1.indices.tolist()
        torch.testing.assert_close(torch.tensor(mixed[1][1]), torch.softmax(top1.values, -1), atol=1e-5, rtol=1e-4)


def test_inspect_cli_shows_what_each_input_mixed(tmp_path):
    """`python -m hrpo.inspect --latent-mode moi` on the embedded model: no gate anywhere, and
    every thinking position lists the tokens its input mixed, weights summing to at most 1."""
    out = tmp_path / "inspect.json"
    cmd = [
        sys.executable,
        "-m",
        "hrpo.inspect",
        "--prompt",
        "Tom has 3 apples and buys 4 more.",
        "--max-new-tokens",
        "8",
        "--latent-mode",
        "moi",
        "--moi-beta",
        "0.5",
        "--json",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "input mixed (weight)" in run.stdout
    positions = json.loads(out.read_text())["samples"][0]["positions"]
    thinking = [p for p in positions if p["thinking"]]
    assert thinking and all(p["gate"] is None for p in positions)
    assert all(len(p["mixed"]) == 5 and 0 < sum(w for _, w in p["mixed"]) <= 1 + 1e-6 for p in thinking)
    bad = subprocess.run(cmd[:-2] + ["--gumbel-tau", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "gumbel_tau" in bad.stderr


def test_training_forward_replays_the_soft_token_rollout(tokenizer):
    """Soft tokens: the training forward fed the stored noisy inputs reproduces the rollout's
    answer-token log-probs, and at thinking positions its mean mixture is the rollout's: the
    stored input minus the policy's mean is exactly sigma times the Philox normals the rollout
    drew (recomputed here from the seed), so the log-density is -|z|^2 / 2 - d/2 log(2 pi sigma^2)."""
    hm = policy(build_model("qwen2", len(tokenizer))).eval()
    params = LatentParams("soft-noise", noise_std=0.05)
    prompts = grouped(tokenizer)[:6]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, latent=params)
    eos = [tokenizer.eos_token_id] + WIDE_EOS
    matcher = MarkerMatcher(tokenizer, "e", len(tokenizer))  # a marker the random model writes early: answers too
    out = rollout(hm, prompts, cfg, matcher, eos, tokenizer.pad_token_id, seed=5)
    with torch.no_grad():
        lp = hm.sequence_logprobs(out, 0.8, hybrid=True, latent=params, top_k=20)
    think, m = out.think_mask & out.completion_mask, out.completion_mask
    answer = m & ~think
    assert think.sum() > 10 and answer.sum() > 0
    torch.testing.assert_close(lp[answer], out.logprobs[answer], atol=1e-4, rtol=0)
    B, V, d = len(prompts), hm.lm_weight.shape[0], hm.embed.weight.shape[1]
    z = torch.stack([gaussian_noise(5, t * B * V, torch.arange(B), d, V) for t in range(out.latents.shape[1])], 1)
    want = -0.5 * (z**2).sum(-1) - 0.5 * d * math.log(2 * math.pi * 0.05**2)
    torch.testing.assert_close(lp[think], want[think], atol=2e-3, rtol=1e-5)


def test_comparison_script_pass_at_k_by_hand():
    spec = importlib.util.spec_from_file_location("compare_latent_modes", ROOT / "scripts" / "compare_latent_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert mod.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3, 2) / C(4, 2)
    assert mod.pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # 1 - C(6, 4) / C(8, 4)
    assert mod.pass_at_k(4, 0, 4) == 0.0 and mod.pass_at_k(4, 3, 2) == 1.0
    assert mod.ks(8) == [1, 2, 4, 8] and mod.ks(5) == [1, 2, 4]


def test_comparison_script_merges_runs_by_hand(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_latent_modes", ROOT / "scripts" / "compare_latent_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(policy, how, seed, **metrics):
        return {"policy": policy, "decoding": "soft", "how": how, "seed": seed, "metrics": metrics}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [run("hrpo", "greedy", 0, **{"pass@1": 0.5})]}))
    b.write_text(
        json.dumps(
            {"rows": [run("grpo", "sampled", 0, **{"pass@1": 0.2}), run("grpo", "sampled", 1, **{"pass@1": 0.4})]}
        )
    )
    assert mod.main(["--merge", str(a), str(b), "--output-dir", str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "latent_modes.md").read_text().splitlines()
    # greedy: one run, no spread; sampled: mean 0.3, sample stdev sqrt(0.02) = 0.1414
    assert "| hrpo | soft | greedy | 0.500 |" in lines
    assert "| grpo | soft | sampled | 0.300 ± 0.141 |" in lines
    assert (tmp_path / "out" / "latent_modes.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="policy 'hrpo' is also in"):
        mod.main(["--merge", str(a), str(a), "--output-dir", str(tmp_path / "out2")])


def test_comparison_script_pools_training_seeds_by_hand(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_latent_modes", ROOT / "scripts" / "compare_latent_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(policy, seed, p1, tokens):
        metrics = {"pass@1": p1}
        return {"policy": policy, "decoding": "moi", "how": "sampled", "seed": seed, "metrics": metrics} | {
            "lengths": {"tokens": tokens, "thinking": tokens - 2}
        }

    # training seed 0: sampling seeds give 0.2 and 0.4 (mean 0.3); seed 1: 0.7; "base" has no seed suffix
    files = {
        "s0": [run("hrpo-s0", 0, 0.2, 10), run("hrpo-s0", 1, 0.4, 20)],
        "s1": [run("hrpo-s1", 0, 0.7, 30)],
        "base": [run("base", 0, 0.1, 40)],
    }
    paths = []
    for name, rows in files.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    out = tmp_path / "out"
    assert mod.main(["--merge", *map(str, paths), "--by-method", "--output-dir", str(out)]) == 0
    lines = (out / "latent_modes.md").read_text().splitlines()
    assert lines[0] == "| policy | decoding | | pass@1 | tokens | thinking |"
    # over training seeds: mean(0.3, 0.7) = 0.5, stdev sqrt(0.08) = 0.283; tokens mean(15, 30) = 22.5
    assert "| hrpo | moi | sampled | 0.500 ± 0.283 | 22 | 20 |" in lines
    assert "| base | moi | sampled | 0.100 | 40 | 38 |" in lines
    # without --by-method each training seed keeps its row, spread over its sampling seeds
    assert mod.main(["--merge", *map(str, paths), "--output-dir", str(tmp_path / "rows")]) == 0
    assert (
        "| hrpo-s0 | moi | sampled | 0.300 ± 0.141 | 15 | 13 |" in (tmp_path / "rows" / "latent_modes.md").read_text()
    )


def test_comparison_script_thinking_length_by_hand():
    spec = importlib.util.spec_from_file_location("compare_latent_modes", ROOT / "scripts" / "compare_latent_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, tokenizer = load_base_model(None, torch.device("cpu"), torch.float32)
    # the embedded tokenizer: Tom | Ġhas | Ġ | 3 | Ġapples, then Ġ#### (the marker and its space)
    assert mod.thinking_tokens(tokenizer, "Tom has 3 apples #### 7 #### 8") == 5
    assert mod.thinking_tokens(tokenizer, "3 + 4 = 7") == 7  # no marker: 3 | Ġ+ | Ġ | 4 | Ġ= | Ġ | 7
