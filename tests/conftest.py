"""Tiny random models and a byte-level BPE tokenizer, built in-process (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in the interpreter; it must be chosen
# before triton is first imported, so here rather than in each kernel test file.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

# The real datasets beside the checkout (../shared/data); tests that read them skip, naming
# the path, in a clone that has none beside it.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Tom has 12 apples and buys 7 more, so 12 + 7 = 19. #### 19",
    "First 3 * 4 = 12, then 12 - 5 = 7.#### 7",
    "The answer follows ####42 and ## is not a marker; #### 1,000",
    "Café naïve déjà vu — ünïcödé 東京 text #### é",
] * 20


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A Qwen-style byte-level BPE whose merges include '#'-runs glued to other characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHS = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=16),
    "llama": dict(model_type="llama", tie_word_embeddings=False),
}


def build_model(arch: str, vocab_size: int, seed: int = 0, hidden: int = 64):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        **ARCHS[arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init is near-uniform; a larger head makes distributions peaked like a real LM's.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.5)
        if not cfg.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, 0.5)
        else:  # tied: the residual stream would make each token predict itself; damp it
            model.model.norm.weight.fill_(0.15)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny qwen2 model and tokenizer, for runs of the trainer and the CLIs."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = build_tokenizer()
    build_model("qwen2", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def small_config(model_dir, out, **kw):
    """The embedded arithmetic task's recipe shrunk to seconds: 2 optimizer steps of 8
    completions of 8 tokens on the tiny model, 8 held-out problems."""
    from hrpo.training.config import config_for

    values = dict(
        model=str(model_dir),
        output_dir=str(out),
        max_steps=2,
        batch_size=8,
        group_size=4,
        max_completion_length=8,
        max_prompt_length=256,
        train_limit=16,
        eval_limit=8,
        lora_rank=4,
        lora_alpha=8,
    )
    values.update(kw)
    return config_for("arith", **values)


def stored_input_logits(hm, out) -> torch.Tensor:
    """fp32 logits (B, T, V) of HF's forward over a rollout's stored inputs: the prompt's token
    embeddings, then at each completion position its stored latent where it thought and its
    token's embedding elsewhere (what the training forward must reproduce)."""
    E, lm = hm.embed.weight, hm.causal_lm
    P = out.prompt_ids.shape[1]
    comp = torch.where(out.think_mask[:, :-1, None], out.latents[:, :-1].to(E.dtype), E[out.completion_ids[:, :-1]])
    embeds = torch.cat([E[out.prompt_ids], comp], dim=1)
    mask = torch.cat([out.prompt_mask, out.completion_mask[:, :-1]], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return lm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos).logits[:, P - 1 :].float()
