"""Loading a base model: the dtype asked for is the dtype of every weight (transformers
before 4.56 has no from_pretrained(dtype=)), for a saved folder and for
the embedded model (whose tokenizer files transformers 4.x cannot read)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hrpo
from hrpo.model.loading import load_base_model

EMBEDDED = Path(hrpo.__file__).parent / "assets" / "tiny"


@pytest.mark.parametrize("embedded", [False, True], ids=["folder", "embedded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_base_model_gives_the_dtype_asked_for(model_dir, dtype, embedded):
    folder = EMBEDDED if embedded else model_dir
    saved = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # so bf16 has to come from the load
    model, tokenizer = load_base_model(None if embedded else str(model_dir), torch.device("cpu"), dtype)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert tokenizer.pad_token_id is not None
    for name, tensor in saved.items():  # the saved weights, rounded to the dtype independently
        assert torch.equal(params[name].detach(), tensor.to(dtype)), name
