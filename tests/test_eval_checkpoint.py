"""`hrpo.eval --checkpoint` evaluates exactly the policy that was trained: the adapters and
the gate it loads are bit-identical to the in-memory ones, and its engine decodes what the
in-memory policy's engine decodes, in bf16 (adapters applied unmerged) and fp32 (merged)."""

import pytest
import torch

from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import make_engine
from hrpo.model.loading import build_policy, eos_token_ids, load_base_model
from hrpo.training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from hrpo.training.config import config_for


def loaded_as_eval_does(path, dtype):
    """hrpo.eval's run(): the base named by the checkpoint, a policy of its LoRA shape, the
    checkpoint loaded into it."""
    meta = read_checkpoint_meta(path)
    model, tok = load_base_model(meta["base_model"], torch.device("cpu"), dtype)
    cfg = config_for(
        "arith",
        lora_rank=meta["lora"]["rank"],
        lora_alpha=meta["lora"]["alpha"],
        lora_targets=tuple(meta["lora"]["targets"]),
    )
    return load_checkpoint(build_policy(model, cfg), path), tok, model


def greedy(hm, tok, model):
    """Greedy completions as hrpo.eval decodes (its matcher, eos ids and engine)."""
    engine = make_engine(
        hm.eval(), MarkerMatcher(tok, "####", model.config.vocab_size), eos_token_ids(model, tok), tok.pad_token_id
    )
    prompts = [tok.encode(t) for t in ["Tom has 12 apples and buys 7 more.", "What is 3 * 4 - 5?", "x"]]
    return engine.generate(prompts, SamplingConfig(max_new_tokens=16, greedy=True, temperature=0.5, top_k=50))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eval_loads_exactly_the_trained_policy(tmp_path, dtype):
    model, tok = load_base_model(None, torch.device("cpu"), dtype)
    hm = build_policy(model, config_for("arith", lora_rank=8, lora_alpha=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters and gate as training leaves them: nothing at its initial value
        for name, p in hm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (2e-5 if "lora_B" in name else 0.3))
    trained = {n: p.detach().clone() for n, p in hm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("gate" in n for n in trained)
    save_checkpoint(hm, tmp_path / "ckpt", base_model=None)

    loaded, tok2, model2 = loaded_as_eval_does(tmp_path / "ckpt", dtype)
    got = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    assert got.keys() == trained.keys()
    for n, t in trained.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n

    mine, theirs = greedy(hm, tok, model), greedy(loaded, tok2, model2)
    assert torch.equal(mine.completion_ids, theirs.completion_ids)
    assert torch.equal(mine.logprobs, theirs.logprobs) and torch.equal(mine.think_mask, theirs.think_mask)
    assert mine.lengths.min() > 1
