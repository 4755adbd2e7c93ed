"""The one doorway to peft: every use of peft's functions and of a LoRA layer's internals goes
through here, so a peft release that moves one breaks this module alone, and
tests/test_peft_doorway.py names the attribute (it checks each one below on a real LoRA Linear).

A "LoRA layer" is peft's LoRA Linear: a `base_layer` (the frozen nn.Linear) plus, per adapter
name, factors `lora_A[name]` (in -> r) and `lora_B[name]` (r -> out) and a float
`scaling[name]`; its output is base(x) + scaling * B(A(dropout(x))) for each active adapter.
peft is imported when it is first needed (attaching, saving, loading adapters): a model without
adapters never pays for it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from hrpo_kernels import lora_linear

# What a LoRA layer must have for the code below. `_disable_adapters` is peft's private switch
# (see adapters_disabled); the variant fields (use_dora, lora_bias, lora_variant) are read with
# a default, as older peft releases lack some of them.
LAYER_ATTRIBUTES = (
    "base_layer",
    "lora_A",
    "lora_B",
    "scaling",
    "lora_dropout",
    "active_adapters",
    "disable_adapters",
    "_disable_adapters",
    "merged",
)
# What a peft model (get_peft_model's result) must have.
MODEL_ATTRIBUTES = ("get_base_model", "peft_config")
# peft's functions this module calls.
PEFT_FUNCTIONS = ("LoraConfig", "get_peft_model", "get_peft_model_state_dict", "set_peft_model_state_dict")


def attach(model: nn.Module, rank: int, alpha: int, targets: tuple[str, ...]) -> nn.Module:
    """`model` wrapped by peft with one LoRA adapter ("default", no dropout, no bias) on every
    module named in `targets`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside an optional peft wrapper."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def config(model: nn.Module) -> dict:
    """The adapter's settings as a checkpoint records them: rank, alpha, sorted targets."""
    lora = model.peft_config["default"]
    return {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by peft's checkpoint names, without the embedding layers: they
    stay frozen and unresized, and a checkpoint is loaded onto the base model it was trained on
    (its fingerprint is checked). peft's default ("auto") would look the base model's config.json
    up by name_or_path to see whether the vocabulary was resized: on the hub for a name, and
    for a folder that holds none (a GGUF's) it warns "Could not find a config file"."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load adapter tensors saved by adapter_state; returns the adapter names among them that
    the model has no place for."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    return [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a LoRA adapter."""
    return ".lora_" in name


def is_lora_layer(mod: nn.Module) -> bool:
    return hasattr(mod, "lora_A")


def base_linear(mod: nn.Module) -> nn.Module:
    """The module a projection applies without adapters: a LoRA layer's base_layer, else itself."""
    return getattr(mod, "base_layer", mod)


def variant(mod: nn.Module) -> str | None:
    """The LoRA variant of a layer that is more than plain factors (DoRA, lora_bias, ...), or None."""
    if getattr(mod, "lora_variant", None) or any(getattr(mod, "use_dora", {}).values()):
        return "a LoRA variant (DoRA, ...)"
    if any(getattr(mod, "lora_bias", {}).values()):
        return "lora_bias"
    return None


def applied(mod: nn.Module) -> list[str]:
    """The adapters a projection applies on top of its base weight now (none for a plain
    module, adapters switched off, or adapters peft merged into the base weight)."""
    if not is_lora_layer(mod) or mod.disable_adapters or mod.merged:
        return []
    return [a for a in mod.active_adapters if a in mod.lora_A]


def layout(mod: nn.Module) -> tuple[tuple[str, int], ...]:
    """Every adapter a layer holds, active or not, with its rank (none for a plain module)."""
    return tuple((a, mod.lora_A[a].out_features) for a in getattr(mod, "lora_A", {}))


def factors(mod: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A weight (r, in), B weight (out, r), scaling) of one adapter: its delta is s * B @ A."""
    return mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, mod.scaling[adapter]


def settings(mod: nn.Module) -> tuple:
    """A LoRA layer's adapter settings (active, off, merged, scalings): when they change, what
    was computed from the layer's adapters is stale."""
    return (
        tuple(mod.active_adapters),
        bool(mod.disable_adapters),
        bool(mod.merged),
        tuple(sorted(mod.scaling.items())),
    )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within: every LoRA layer of `model` applies its base layer alone. It flips each layer's
    switch only: peft's own disable_adapter() also toggles the adapters' requires_grad, which
    under FSDP leaves the sharded parameters frozen."""
    layers = [m for m in model.modules() if hasattr(m, "_disable_adapters")]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def use_fused_forward(model: nn.Module) -> None:
    """Route the forward of every LoRA layer over a Linear through hrpo_kernels.lora_linear
    (replacing the instance's `forward`: peft builds the layers, so there is no class of ours
    to put it on)."""
    for mod in model.modules():
        if is_lora_layer(mod) and isinstance(getattr(mod, "base_layer", None), nn.Linear):
            mod.forward = functools.partial(_fused_forward, mod)


@contextlib.contextmanager
def peft_forward(model: nn.Module):
    """Within: every LoRA layer runs peft's own forward again (what use_fused_forward replaced;
    the benchmarks' baseline, the layers the common trainers run)."""
    saved = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, fn in saved.items():
            m.forward = fn


def _fused_forward(mod, x, *args, **kwargs):
    """A LoRA layer's forward through lora_linear (fewer passes over the activations);
    anything but one plain active adapter without dropout on a frozen base (adapters off,
    merged, DoRA, mixed batches, ...) takes peft's own forward."""
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    plain = (
        not (args or kwargs or mod.disable_adapters or mod.merged)
        and len(active) == 1
        and active[0] not in getattr(mod, "lora_variant", {})
        and isinstance(mod.lora_dropout[active[0]], nn.Identity)
        and not mod.base_layer.weight.requires_grad
    )
    if not plain:
        return type(mod).forward(mod, x, *args, **kwargs)
    a, b, scale = factors(mod, active[0])
    return lora_linear(x, mod.base_layer.weight, mod.base_layer.bias, a, b, scale)
