"""Random-weight models at the shapes of the paper's models (speed does not depend on the weights).

The shapes are Hugging Face config fields, one entry per model, in the JSON file named by
$HRPO_MODEL_SHAPES (default ../shared/model_shapes.json beside the repository; on a lent GPU
machine, where ../shared does not travel, benchmarks/gpu_check.sh points it at the carried copy
in .shapes/, see scripts/device_carry.sh).

A model folder for servers (hrpo.serve, `transformers serve`), with safetensors weights, config
and a tokenizer:

    python -m benchmarks.model_shapes /tmp/qwen-1.5b-random --shape Qwen2.5-1.5B-Instruct

The tokenizer is the embedded model's (its chat template, its special tokens as bos / eos /
pad) with filler tokens " w<id>" up to the shape's vocabulary, so that every id the random model
samples decodes to text; the config's bos / eos / pad ids are the tokenizer's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hrpo.model.hybrid import EMBEDDED_MODEL
from hrpo.model.loading import resolve_device

SHAPES_ENV = "HRPO_MODEL_SHAPES"
DEFAULT_SHAPES = Path(__file__).resolve().parents[2] / "shared" / "model_shapes.json"
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja")  # copied as they are; tokenizer.json is padded


def shapes_file() -> Path:
    return Path(os.environ.get(SHAPES_ENV) or DEFAULT_SHAPES)


def model_shape(name: str) -> dict:
    """The config fields of model `name` (e.g. Qwen2.5-1.5B-Instruct) from shapes_file()."""
    path = shapes_file()
    if not path.is_file():
        raise FileNotFoundError(f"model shapes: {path} does not exist (set ${SHAPES_ENV} to a copy of it)")
    shapes = json.loads(path.read_text())
    if name not in shapes or name.startswith("_"):
        known = ", ".join(k for k in shapes if not k.startswith("_"))
        raise ValueError(f"model shapes: {path} has no model {name!r} (it has {known})")
    return shapes[name]


def random_causal_lm(shape: dict, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A causal LM with `shape`'s config and transformers' random initialisation, built on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape), dtype=dtype).eval()


def padded_tokenizer_json(vocab_size: int) -> dict:
    """The embedded tokenizer.json with filler tokens " w<id>" (byte-level: "Ġw<id>") for the
    ids from its own vocabulary's end up to vocab_size. No merge produces them: encoding is
    unchanged, and each filler decodes to itself."""
    spec = json.loads((EMBEDDED_MODEL / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    size = max(vocab.values()) + 1
    if vocab_size < size:
        raise ValueError(f"vocab_size {vocab_size} is below the embedded tokenizer's {size} tokens")
    vocab.update({f"Ġw{i}": i for i in range(size, vocab_size)})
    return spec


def write_model_folder(
    folder: Path, shape: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A loadable model folder: random weights at `shape` (safetensors), config and tokenizer."""
    spec = padded_tokenizer_json(shape["vocab_size"])  # first: a vocabulary too small fails before any write
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model = random_causal_lm({**shape, **ids}, device, dtype)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        shutil.copyfile(EMBEDDED_MODEL / name, folder / name)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_shapes", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="where the model folder is written")
    p.add_argument("--shape", default="Qwen2.5-1.5B-Instruct", help=f"a model of the shapes file (${SHAPES_ENV})")
    p.add_argument("--override", default="{}", help="config fields replacing the shape's, as a JSON object")
    p.add_argument("--device", default="auto", help="where the weights are drawn (auto: the GPU if there is one)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    try:
        override = json.loads(args.override)
        if not isinstance(override, dict):
            raise ValueError("not a JSON object")
        shape = {**model_shape(args.shape), **override}
        write_model_folder(args.folder, shape, resolve_device(args.device), getattr(torch, args.dtype))
    except (OSError, ValueError) as err:
        sys.exit(f"benchmarks.model_shapes: {err}")
    print(f"wrote {args.folder}: {args.shape} shapes {json.dumps(override) if override else ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
