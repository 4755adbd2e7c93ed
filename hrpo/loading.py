"""Loading base models and tokenizers, attaching LoRA, and building the hybrid policy."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .model import EMBEDDED_MODEL, HybridModel, ModelError


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: this process's GPU (cuda:LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from None


def load_base_model(name_or_path: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a local folder or hub name; None loads the embedded model."""
    source = str(name_or_path or EMBEDDED_MODEL)
    local = Path(source).exists()
    if not local and (source.startswith((".", "/")) or source.count("/") > 1):
        raise ModelError(f"model path {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise ModelError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def attach_lora(model, rank: int, alpha: int, targets: tuple[str, ...]):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ModelError(f"{type(model).__name__} has no modules named {missing} for LoRA (targets {list(targets)})")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def build_policy(model, cfg) -> HybridModel:
    """LoRA on the configured projections plus a fresh fp32 gate; base weights frozen."""
    peft_model = attach_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
    return HybridModel(peft_model, r_min=cfg.r_min, r_max=cfg.r_max)
