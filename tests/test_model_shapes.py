"""benchmarks/model_shapes.py: the shapes lookup the GPU benchmarks build their models from, and
the random-weight model folder the GPU serving benchmark serves."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.model_shapes import SHAPES_ENV, main, model_shape, random_causal_lm
from hrpo.model.hybrid import EMBEDDED_MODEL
from hrpo.model.loading import eos_token_ids, load_base_model

TINY = {
    "model_type": "qwen2",
    "vocab_size": 600,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


@pytest.fixture
def shapes(tmp_path, monkeypatch):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"_about": "test shapes", "Tiny-Qwen": TINY}))
    monkeypatch.setenv(SHAPES_ENV, str(path))
    return path


def test_shapes_come_from_the_file_the_environment_names(shapes):
    assert model_shape("Tiny-Qwen") == TINY
    model = random_causal_lm(model_shape("Tiny-Qwen"), "meta", torch.bfloat16)
    # Counted by hand: tied embedding 600 x 32; per layer q 32x32+32, k and v 32x16+16 (2 KV
    # heads of 8), o 32x32, gate/up/down 3 x 32x48, two norms of 32; the final norm.
    layer = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 48 + 2 * 32
    assert sum(p.numel() for p in model.parameters()) == 600 * 32 + 2 * layer + 32
    assert next(model.parameters()).dtype == torch.bfloat16


def test_weights_are_seeded(shapes):
    """The same seed draws the same weights whatever ran before (every benchmark method gets one model)."""
    a, b = (random_causal_lm(TINY, "cpu", torch.float32, seed=0) for _ in range(2))
    c = random_causal_lm(TINY, "cpu", torch.float32, seed=1)
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[1].mlp.up_proj.weight, c.model.layers[1].mlp.up_proj.weight)


def test_missing_file_and_unknown_model_name_what_is_wrong(shapes, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"has no model 'Qwen9' \(it has Tiny-Qwen\)"):
        model_shape("Qwen9")
    monkeypatch.setenv(SHAPES_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match=f"absent.json does not exist \\(set \\${SHAPES_ENV}"):
        model_shape("Tiny-Qwen")


def test_model_folder_loads_with_the_shape_and_a_tokenizer_for_every_id(shapes, tmp_path, capsys):
    folder = tmp_path / "model"
    assert (
        main([str(folder), "--shape", "Tiny-Qwen", "--override", '{"num_hidden_layers": 3}', "--dtype", "float32"]) == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size")} == {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_key_value_heads": 2,
        "vocab_size": 600,
    }
    assert config["num_hidden_layers"] == 3  # the override replaced the shape's 2
    model, tok = load_base_model(str(folder), torch.device("cpu"), torch.float32)
    assert model.get_input_embeddings().weight.shape == (600, 32) and len(model.model.layers) == 3
    embedded = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    assert len(tok) == 600 and len(embedded) == 477
    # The embedded tokenizer's ids and special tokens; the ids past its vocabulary decode to fillers.
    text = embedded.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False)
    assert tok(text)["input_ids"] == embedded(text)["input_ids"]
    assert eos_token_ids(model, tok) == [embedded.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode([477, 599]) == " w477 w599"
    assert "Tiny-Qwen shapes" in capsys.readouterr().out


def test_bad_arguments_exit_with_one_line(shapes, tmp_path):
    with pytest.raises(SystemExit, match="vocab_size 100 is below the embedded tokenizer's 477 tokens"):
        main([str(tmp_path / "m"), "--shape", "Tiny-Qwen", "--override", '{"vocab_size": 100}'])
    with pytest.raises(SystemExit, match="not a JSON object"):
        main([str(tmp_path / "m"), "--shape", "Tiny-Qwen", "--override", "[1]"])
