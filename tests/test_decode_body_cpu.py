"""The extension's C++ decoder body (hrpo_kernels/csrc/decode_body_cpu.cpp) against FastDecoder's torch
ops, on shapes the tiny test models do not have: head dims that are not a multiple of the
body's 16-lane dot, three query heads per kv head, Qwen3's q/k norms, attention bias, rows
at scattered lengths, cache slots past each row poisoned with NaN, and a batch of fewer
rows than the cache holds."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hrpo.engine.fast_decoder import FastDecoder

SHAPES = {
    "qwen2-dh12-g3": dict(model_type="qwen2", hidden_size=72, num_attention_heads=6, num_key_value_heads=2),
    "qwen3-dh40-mqa": dict(
        model_type="qwen3", hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=40
    ),
    "llama-dh18-bias": dict(
        model_type="llama", hidden_size=72, num_attention_heads=4, num_key_value_heads=4, attention_bias=True
    ),
}


def model_of(shape: str, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        vocab_size=50, intermediate_size=100, num_hidden_layers=3, max_position_embeddings=256, **SHAPES[shape]
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights, so a skipped or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpp_body_equals_torch_body(shape):
    model = model_of(shape, seed=len(shape))
    cpp, ref = FastDecoder(model, cpu_body=True), FastDecoder(model, cpu_body=False)
    assert cpp.ext is not None and ref.ext is None
    batch, slots, d = 7, 48, model.config.hidden_size
    caches = cpp.new_cache(batch, slots), ref.new_cache(batch, slots)
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([9, 1, 17, 4, 30, 12, 6])
    x = torch.randn(batch, int(lens.max()), d, generator=g)
    for dec, cache in zip((cpp, ref), caches):
        dec.prefill(x, lens, cache)
        for c in (cache.k, cache.v):  # every slot past a row's prompt: NaN (a read of one would show)
            c[:, torch.arange(slots)[None, :].expand(batch, -1) >= lens[:, None]] = float("nan")
    for step, n in enumerate([7, 7, 5, 5, 2, 7]):  # fewer rows: a compacted batch
        e = torch.randn(n, d, generator=g)
        before = caches[0].k[:, n:].clone()
        got, want = cpp.decode(e, caches[0]), ref.decode(e, caches[1], max_len=int(caches[1].seqlens.max()) + 1)
        assert torch.isfinite(got).all(), f"step {step}: a NaN slot leaked into the C++ body's attention"
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert torch.equal(caches[0].seqlens, caches[1].seqlens)
        torch.testing.assert_close(caches[0].k[:, n:], before, rtol=0, atol=0, equal_nan=True)  # rows past n untouched
    valid = torch.arange(slots)[None, :] < caches[1].seqlens[:, None].long()
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(a[:, valid], b[:, valid], atol=2e-5, rtol=1e-4)


def test_cpp_body_rejects_bad_input():
    model = model_of("qwen2-dh12-g3", seed=0)
    dec = FastDecoder(model)
    cache = dec.new_cache(4, 8)
    d = model.config.hidden_size
    with pytest.raises(RuntimeError, match="x must be fp32 or bf16, got Double"):
        dec.decode(torch.randn(4, d, dtype=torch.float64), cache)
    with pytest.raises(RuntimeError, match=r"x must be \(n <= 4"):
        dec.decode(torch.randn(5, d), cache)
    cache.seqlens[2] = 8
    with pytest.raises(RuntimeError, match="row 2 is at slot 8, past the cache"):
        dec.decode(torch.randn(4, d), cache)
