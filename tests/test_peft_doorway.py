"""hrpo/model/lora.py is the one place that touches peft: here every attribute and function it
relies on is checked on a real peft LoRA Linear, by name, and each of its readings against
peft's own computation of the same thing, so a peft release that moves or changes one fails
here, saying which."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch
from conftest import build_model

from hrpo.model import lora

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj")


def tiny_peft_model(seed=0):
    model = lora.attach(build_model("qwen2", 320, seed=seed), 4, 8, TARGETS)
    with torch.no_grad():  # B starts at zero: give the adapters an effect to see
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def lora_layer(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("name", lora.PEFT_FUNCTIONS)
def test_peft_has_the_functions_the_doorway_calls(name):
    assert hasattr(peft, name), f"peft {peft.__version__} has no {name} (hrpo/model/lora.py calls it)"


@pytest.mark.parametrize("attr", lora.LAYER_ATTRIBUTES)
def test_a_lora_linear_has_every_attribute_the_doorway_reads(attr):
    mod = lora_layer(tiny_peft_model())
    assert hasattr(mod, attr), (
        f"peft {peft.__version__}: {type(mod).__name__} has no {attr!r} (hrpo/model/lora.py reads it)"
    )


@pytest.mark.parametrize("attr", lora.MODEL_ATTRIBUTES)
def test_a_peft_model_has_every_attribute_the_doorway_reads(attr):
    model = tiny_peft_model()
    assert hasattr(model, attr), f"peft {peft.__version__}: {type(model).__name__} has no {attr!r}"


def test_the_doorway_lists_every_peft_name_it_touches():
    """Each attribute lora.py reads off a layer or model (`mod.X`, `m.X`, `model.X`, or by
    name in getattr/hasattr) is in its lists or read with a default."""
    source = (ROOT / "hrpo" / "model" / "lora.py").read_text()
    read = set(re.findall(r"\b(?:mod|m|model)\.(\w+)", source)) | set(
        re.findall(r"(?:has|get)attr\(\w+, \"(\w+)\"", source)
    )
    own = {"modules", "forward", "__dict__"}  # nn.Module's and Python's, not peft's
    # Read with a default: older peft lacks some variant fields; unexpected_keys is checked by
    # test_adapter_state_round_trip.
    with_default = {"lora_variant", "use_dora", "lora_bias", "unexpected_keys"}
    assert read - own - with_default <= set(lora.LAYER_ATTRIBUTES + lora.MODEL_ATTRIBUTES), read


def test_nothing_else_in_the_package_touches_peft():
    pattern = re.compile(
        r"\blora_[AB]\b|_disable_adapters|\bbase_layer\b|\bactive_adapters\b|\bpeft_config\b"
        r"|\bget_base_model\b|\bdisable_adapters\b|^\s*(?:from|import) peft\b",
        re.M,
    )
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
        for package in ("hrpo", "hrpo_kernels")
        for p in sorted((ROOT / package).rglob("*.py"))
        if p.name != "lora.py" or p.parent.name != "model"
        for m in pattern.finditer(p.read_text())
    ]
    assert not found, "peft reached around hrpo/model/lora.py:\n" + "\n".join(found)


def test_attach_and_what_a_checkpoint_records():
    model = tiny_peft_model()
    layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if lora.is_lora_layer(m)}
    assert layers == set(TARGETS)
    assert type(lora.inner_model(model)).__name__ == "Qwen2ForCausalLM"
    assert lora.config(model) == {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    mod = lora_layer(model)
    assert lora.layout(mod) == (("default", 4),) and lora.layout(lora.base_linear(mod)) == ()
    assert type(lora.base_linear(mod)) is torch.nn.Linear and lora.variant(mod) is None


def test_factors_are_pefts_delta():
    mod = lora_layer(tiny_peft_model())
    a, b, scale = lora.factors(mod, "default")
    assert scale == 8 / 4
    torch.testing.assert_close(scale * b @ a, mod.get_delta_weight("default"))


def test_adapters_disabled_is_the_base_model_and_keeps_requires_grad():
    model = tiny_peft_model()
    ids = torch.randint(0, 320, (2, 7))
    with model.disable_adapter():  # peft's own switch, the independent reference
        want = model(input_ids=ids).logits
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with lora.adapters_disabled(model):
        got = model(input_ids=ids).logits
        assert lora.applied(lora_layer(model)) == []
        assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    torch.testing.assert_close(got, want)
    assert lora.applied(lora_layer(model)) == ["default"]
    assert not torch.allclose(model(input_ids=ids).logits, want)  # the adapters are back


def test_fused_forward_equals_pefts_and_settings_see_changes():
    model = tiny_peft_model()
    mod = lora_layer(model)
    x = torch.randn(3, 5, mod.in_features)
    want = type(mod).forward(mod, x)
    lora.use_fused_forward(model)
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
    with lora.peft_forward(model):  # peft's own forward back inside, the fused one after
        assert "forward" not in mod.__dict__ and torch.equal(mod(x), want)
    assert mod.forward.func is lora._fused_forward
    before = lora.settings(mod)
    with lora.adapters_disabled(model):
        assert lora.settings(mod) != before
    mod.scaling["default"] = 1.0
    assert lora.settings(mod) != before


def test_adapter_state_round_trip(tmp_path):
    src, dst = tiny_peft_model(seed=0), tiny_peft_model(seed=0)
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if lora.is_adapter_parameter(name):
                p.zero_()
    state = lora.adapter_state(src)
    assert state and all(lora.is_adapter_parameter("." + k) for k in state)
    assert lora.load_adapter_state(dst, state) == []
    ids = torch.randint(0, 320, (1, 6))
    torch.testing.assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits)
    stray = {"base_model.model.model.layers.0.self_attn.nowhere.lora_A.weight": torch.zeros(4, 64)}
    assert lora.load_adapter_state(dst, stray) == list(stray)


def test_adapter_state_is_the_factors_alone_and_looks_no_base_config_up(tmp_path, recwarn):
    """A base model whose name_or_path holds no config.json (a GGUF's folder) saves without
    peft looking its config up (it warned "Could not find a config file"), and the state is
    the adapters' factors, nothing of the frozen embeddings."""
    base = build_model("qwen2", 320)
    base.name_or_path = base.config._name_or_path = str(tmp_path)  # a folder without config.json
    model = lora.attach(base, 4, 8, TARGETS)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path)
    state = lora.adapter_state(model)
    assert [str(w.message) for w in recwarn if "config file" in str(w.message)] == []
    layers = len(base.model.layers)
    assert sorted(state) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{t}.lora_{f}.weight"
        for i in range(layers)
        for t in TARGETS
        for f in "AB"
    )
