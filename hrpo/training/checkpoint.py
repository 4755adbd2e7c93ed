"""Checkpoints, as safetensors plus JSON (never pickle).

A policy checkpoint (what `hrpo.eval --checkpoint` reads) is a folder with the LoRA adapters,
the gate and `checkpoint.json` naming the base model. A training checkpoint adds everything an
exact resume needs: optimizer and scheduler state, every RNG state, the trainer's counters and
position in the data order, any gradients accumulated since the last optimizer step, and the
metrics so far. Folders are written atomically: into a temporary sibling, each file synced,
then renamed into place, so a folder with the final name is always complete and a failed
save (a full disk) leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from hrpo.core.errors import error_line
from hrpo.model import lora
from hrpo.model.hybrid import HybridModel, ModelError
from hrpo.training.runs import fsync_dir, write_durably

FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
STEP_PREFIX = "step-"
TMP_PREFIX = ".hrpo-tmp-"  # a save's temporary folders: the only dot-entries pruning removes


class CheckpointError(ModelError):
    """A checkpoint that cannot be written or read, named with its file, in one line."""


def base_fingerprint(hm: HybridModel) -> dict:
    cfg = hm.config
    return {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on this process: a DTensor (FSDP shards) is gathered (every rank must
    call this at the same point)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param`: sharded the same way when param is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: _full(v.detach()).contiguous().cpu() for k, v in state.items()}


def policy_tensors(hm: HybridModel) -> tuple[dict, dict]:
    return _tensors(lora.adapter_state(hm.model)), _tensors(hm.gate.state_dict())


def _write_policy(
    hm: HybridModel, folder: Path, base_model: str | None, extra: dict | None, tensors: tuple[dict, dict] | None = None
) -> None:
    adapters, gate = tensors or policy_tensors(hm)
    write_durably(folder / "adapter.safetensors", safetensors_bytes(adapters))
    write_durably(folder / "gate.safetensors", safetensors_bytes(gate))
    meta = {
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(hm),
        "lora": lora.config(hm.model),
        **(extra or {}),
    }
    write_durably(folder / "checkpoint.json", json.dumps(meta, indent=2).encode())


def _atomic_folder(path: Path, write) -> Path:
    """Call write(tmp) on a fresh temporary sibling of `path`, then rename it to `path` (an
    existing `path` is replaced). Any failure removes the temporary folder and is re-raised
    as one line naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}new-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {path} failed: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(
    hm: HybridModel,
    path: str | Path,
    base_model: str | None,
    extra: dict | None = None,
    tensors: tuple[dict, dict] | None = None,
) -> Path:
    """The policy (adapters, gate, checkpoint.json) into the folder `path`, atomically
    (tensors: policy_tensors(hm), gathered beforehand when FSDP shards them)."""
    return _atomic_folder(Path(path), lambda tmp: _write_policy(hm, tmp, base_model, extra, tensors))


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {error_line(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _read_tensors(file: Path, device="cpu") -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error_line(err)})") from None


def _require_finite(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{file}: tensor {name!r} holds non-finite values (NaN or inf); refusing this checkpoint"
            )


def read_checkpoint_meta(path: str | Path) -> dict:
    meta_file = Path(path) / "checkpoint.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not an HRPO checkpoint (no checkpoint.json)")
    meta = _read_json(meta_file)
    for key, kind in (("base_model", (str, type(None))), ("base_fingerprint", dict), ("lora", dict)):
        if key not in meta or not isinstance(meta[key], kind):
            raise CheckpointError(f"{meta_file}: field {key!r} missing or of the wrong type")
    recorded = meta["lora"]
    if not (
        isinstance(recorded.get("rank"), int)
        and isinstance(recorded.get("alpha"), (int, float))
        and isinstance(recorded.get("targets"), list)
    ):
        raise CheckpointError(f"{meta_file}: field 'lora' needs rank, alpha and targets")
    return meta


def load_checkpoint(hm: HybridModel, path: str | Path) -> HybridModel:
    """Load adapters and gate into a policy built on the same base model (checked); a file
    that is corrupt, truncated or holds non-finite weights is refused in one line."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    have = base_fingerprint(hm)
    if meta["base_fingerprint"] != have:
        diff = {
            k: (meta["base_fingerprint"].get(k), have[k]) for k in have if meta["base_fingerprint"].get(k) != have[k]
        }
        raise CheckpointError(
            f"checkpoint {path} was trained on base {meta.get('base_model')!r}, which differs from this model in "
            + ", ".join(f"{k} (checkpoint {a}, model {b})" for k, (a, b) in diff.items())
        )
    device = hm.lm_weight.device
    adapters = _read_tensors(path / "adapter.safetensors", device)
    gate = _read_tensors(path / "gate.safetensors", device)
    _require_finite(path / "adapter.safetensors", adapters)
    _require_finite(path / "gate.safetensors", gate)
    unexpected = lora.load_adapter_state(hm.model, adapters)
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: adapter tensors {unexpected[:3]} do not fit this model")
    try:
        hm.gate.load_state_dict(gate)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path / 'gate.safetensors'}: does not fit this model's gate ({str(err).splitlines()[-1].strip()})"
        ) from None
    return hm


# ---------------------------------------------------------------- training checkpoints


def capture_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a training step may draw from: the rollout generator, torch's CPU and CUDA
    generators, Python's `random` (this process's)."""
    tensors = {"rollout": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def all_ranks_rng(per_rank: list[tuple[dict[str, torch.Tensor], dict]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's RNG states (capture_rng of each, in rank order) as one checkpoint entry."""
    tensors = {f"rank{r}.{k}": v for r, (t, _) in enumerate(per_rank) for k, v in t.items()}
    return tensors, {"ranks": [m for _, m in per_rank]}


def restore_rng(
    generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict, rank: int = 0, world: int = 1
) -> None:
    """This rank's RNG states from an all_ranks_rng entry of a run with the same world size."""
    if len(meta["ranks"]) != world:
        raise ValueError(
            f"the checkpoint holds {len(meta['ranks'])} ranks' RNG states; this run has {world} "
            "(resume with the same number of processes)"
        )
    mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{rank}.")}
    generator.set_state(mine["rollout"])
    torch.set_rng_state(mine["torch_cpu"])
    cuda = [mine[k] for k in sorted(k for k in mine if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["ranks"][rank]["python"]
    random.setstate((version, tuple(internal), gauss))


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if not torch.is_tensor(v)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    opt.load_state_dict({"state": state, "param_groups": groups})


def step_folder(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def save_training_checkpoint(
    path: Path,
    hm: HybridModel,
    base_model: str | None,
    extra: dict,
    opt: torch.optim.Optimizer,
    sched,
    rng: tuple[dict, dict],
    trainer: dict,
    records: list[dict],
    write: bool = True,
) -> Path:
    """A resumable checkpoint in the folder `path` (atomic; the policy files included, so
    hrpo.eval reads it too). trainer: the trainer's counters (JSON). Under FSDP every rank
    calls this (sharded tensors are gathered) and only the one with write=True writes."""
    policy = policy_tensors(hm)
    opt_tensors, opt_meta = _optimizer_parts(opt)
    opt_tensors = _tensors(opt_tensors)
    grads = _tensors({n: p.grad for n, p in hm.named_parameters() if p.requires_grad and p.grad is not None})
    if not write:
        return path

    def files(tmp: Path) -> None:
        _write_policy(hm, tmp, base_model, extra, policy)
        write_durably(tmp / "optimizer.safetensors", safetensors_bytes(opt_tensors))
        write_durably(tmp / "rng.safetensors", safetensors_bytes(_tensors(rng[0])))
        write_durably(tmp / "grads.safetensors", safetensors_bytes(grads))
        state = {"trainer": trainer, "optimizer": opt_meta, "scheduler": sched.state_dict(), "rng": rng[1]}
        write_durably(tmp / "trainer_state.json", json.dumps(state).encode())
        write_durably(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())

    return _atomic_folder(path, files)


def _check_groups(path: Path, state: dict, opt: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer groups must be this run's, by name: the moments of one
    group's parameters cannot be read as another's. A checkpoint from before the gate's
    biases joined the gate's group (lora, gate, gate_bias, lambda) trained them without weight
    decay, so no mapping resumes it as the run it was."""
    saved = [g.get("name") for g in state.get("optimizer", {}).get("param_groups", [])]
    ours = [g["name"] for g in opt.param_groups]
    if saved != ours:
        raise CheckpointError(
            f"{path}: cannot resume its optimizer: its groups are {', '.join(map(str, saved))}, this "
            f"version's {', '.join(ours)} (gate_bias: saved before the gate's biases joined its group); "
            f"evaluate its policy (python -m hrpo.eval --checkpoint {path}) or start a new run"
        )


def load_training_state(
    path: Path,
    hm: HybridModel,
    opt: torch.optim.Optimizer,
    sched,
    generator: torch.Generator,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict, list[dict]]:
    """Optimizer (its state laid out like the parameters, sharded under FSDP), scheduler,
    gradients and this rank's RNGs from `path` (the policy is load_checkpoint's); returns the
    trainer's counters and the metrics so far."""
    state = _read_json(path / "trainer_state.json")
    _check_groups(path, state, opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        tensors = _read_tensors(path / "optimizer.safetensors")
        tensors = {k: like(v, params[int(k.split(".", 1)[0])]) if v.dim() else v for k, v in tensors.items()}
        _load_optimizer(opt, tensors, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        restore_rng(generator, _read_tensors(path / "rng.safetensors"), state["rng"], rank, world)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{path}: training state does not fit this run ({type(err).__name__}: {err})") from None
    named = dict(hm.named_parameters())
    for name, g in _read_tensors(path / "grads.safetensors").items():
        named[name].grad = like(g, named[name])
    try:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'metrics.jsonl'}: unreadable ({err})") from None
    return state["trainer"], records


def complete_checkpoints(root: Path) -> list[Path]:
    """The training checkpoints under `root`, oldest first (a folder with the final name is
    complete: it was renamed into place only after every file was synced)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep`; also clear the temporary folders a killed save left behind (one
    trainer writes here, and it has just finished a save). Nothing else is touched."""
    leftovers = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir() and not p.is_symlink()]
    for old in complete_checkpoints(root)[:-keep] + leftovers:
        shutil.rmtree(old, ignore_errors=True)
