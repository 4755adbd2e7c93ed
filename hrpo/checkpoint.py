"""Checkpoints: LoRA adapters and the gate as safetensors, plus a JSON naming the base."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .model import HybridModel, ModelError

FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def base_fingerprint(hm: HybridModel) -> dict:
    cfg = hm.config
    return {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}


def save_checkpoint(hm: HybridModel, path: str | Path, base_model: str | None, extra: dict | None = None) -> Path:
    from peft import get_peft_model_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapters = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(hm.model).items()}
    save_file(adapters, str(path / "adapter.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in hm.gate.state_dict().items()}, str(path / "gate.safetensors"))
    lora = hm.model.peft_config["default"]
    meta = {
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(hm),
        "lora": {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)},
        **(extra or {}),
    }
    (path / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    return path


def read_checkpoint_meta(path: str | Path) -> dict:
    meta_file = Path(path) / "checkpoint.json"
    if not meta_file.is_file():
        raise ModelError(f"{path} is not an HRPO checkpoint (no checkpoint.json)")
    return json.loads(meta_file.read_text())


def load_checkpoint(hm: HybridModel, path: str | Path) -> HybridModel:
    """Load adapters and gate into a policy built on the same base model (checked)."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    meta = read_checkpoint_meta(path)
    have = base_fingerprint(hm)
    if meta["base_fingerprint"] != have:
        diff = {k: (meta["base_fingerprint"].get(k), have[k]) for k in have if meta["base_fingerprint"].get(k) != have[k]}
        raise ModelError(
            f"checkpoint {path} was trained on base {meta.get('base_model')!r}, which differs from this model in "
            + ", ".join(f"{k} (checkpoint {a}, model {b})" for k, (a, b) in diff.items())
        )
    device = hm.lm_weight.device
    result = set_peft_model_state_dict(hm.model, load_file(str(path / "adapter.safetensors"), device=str(device)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ModelError(f"checkpoint {path}: adapter tensors {missing[:3]} do not fit this model")
    hm.gate.load_state_dict(load_file(str(path / "gate.safetensors"), device=str(device)))
    return hm
