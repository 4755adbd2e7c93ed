"""Data parallelism over torch.distributed (`torchrun --nproc-per-node N -m hrpo.train ...`).

Every rank holds the same data order and RNG streams; at each step it rolls out its share of
the global batch (whole GRPO groups) with the noise those rows have in the whole batch, so the
tokens are the ones a single process would draw. Losses are normalised by the global batch,
gradients summed across ranks, and every decision (skip an update, stop on a signal, a failed
reward call) is agreed on by all ranks before it is acted on. Objects cross ranks as JSON in
uint8 tensors, never pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Group:
    """This process's place in the run (world 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (floats in fp64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(bool(flag))])[0] > 0 if self.active else bool(flag)

    def max(self, value: int) -> int:
        """The largest of every rank's `value`."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's JSON-able `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=self.comm_device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.comm_device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([data.numel()], device=self.comm_device))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8, device=self.comm_device)
        padded[: data.numel()] = data
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [json.loads(bytes(p[: int(n.item())].tolist())) for p, n in zip(parts, sizes)]

    def gather_tensors(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's dict of tensors (same keys and shapes on every rank), on every rank."""
        if not self.active:
            return [tensors]
        out = [{} for _ in range(self.world)]
        for name, t in tensors.items():
            parts = [torch.empty_like(t, device=self.comm_device) for _ in range(self.world)]
            dist.all_gather(parts, t.to(self.comm_device))
            for r, p in enumerate(parts):
                out[r][name] = p.to(t.device)
        return out

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks. Plain tensors are all-reduced, flattened
        into one buffer per dtype; FSDP's sharded ones were already reduce-scattered as a
        mean (gloo has no pre-scaled sum), so they are scaled back to the sum."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None and _is_sharded(p.grad):
                p.grad.mul_(self.world)
        plain = [p for p in params if p.grad is not None and not _is_sharded(p.grad)]
        for dtype in {p.grad.dtype for p in plain}:
            grads = [p.grad for p in plain if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the rank's GPU under NCCL, else the CPU (gloo)."""
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


TIMEOUT_ENV = "HRPO_COLLECTIVE_TIMEOUT_S"


def init_group(device: str = "auto") -> Group:
    """Join the process group torchrun set up (env:// rendezvous), or a group of one. NCCL
    when this rank has a GPU, gloo otherwise. HRPO_COLLECTIVE_TIMEOUT_S (seconds) bounds each
    collective, so that ranks out of step fail instead of hanging (torch's default otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
    return Group(rank=rank, world=world, local_rank=local)


def collective_timeout() -> timedelta | None:
    """How long a collective may wait for the other ranks (HRPO_COLLECTIVE_TIMEOUT_S), None:
    torch's default."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return timedelta(seconds=seconds)


def forward_group(module: torch.nn.Module) -> Group | None:
    """The group over which every forward of `module` is a collective (its parameters are
    FSDP-sharded: each layer's forward all-gathers them), else None."""
    if not (dist.is_available() and dist.is_initialized()) or not any(_is_sharded(p) for p in module.parameters()):
        return None
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shard(items: list, group: Group) -> list:
    """This rank's contiguous share of `items` (the first ranks take one more when it does not split evenly)."""
    n, w, r = len(items), group.world, group.rank
    lo = r * (n // w) + min(r, n % w)
    return items[lo : lo + n // w + (r < n % w)]


def finish_group(ok: bool = True) -> None:
    """Leave the process group (a no-op without one). After a success every rank first waits
    for the others, so none tears the group down under a rank still finishing its last
    exchange; after a failure there is nobody to wait for (torchrun stops the others)."""
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def shard_layers(hm, group: Group) -> None:
    """FSDP2 (fully_shard) on each decoder layer: its frozen base weights and its adapters are
    split across the ranks and gathered layer by layer in the forward and backward. The
    embeddings, the final norm, the lm-head and the gate stay whole on every rank (the
    rollout and the loss read them directly; the gate's gradients are all-reduced).
    Each layer is its own FSDP root (nothing above it is wrapped), and a root keeps its
    parameters gathered after its forward unless told otherwise: reshard_after_forward=True
    frees them after every forward, so every forward of a layer is an all-gather."""
    from torch.distributed.fsdp import fully_shard

    for layer in hm.body.layers:
        fully_shard(layer, reshard_after_forward=True)


def _is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, group: Group) -> float:
    """torch's clip_grad_norm_ (the same numbers), also over FSDP-sharded gradients: their
    squared norms are summed across ranks, the whole ones counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() for g in grads if _is_sharded(g)]
    sharded_sq = group.sum([float(sum(g.double().pow(2).sum() for g in local))])[0]
    whole_sq = float(sum(g.double().pow(2).sum() for g in grads if not _is_sharded(g)))
    total = (sharded_sq + whole_sq) ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1 and total == total:
        for g in grads:
            (g.to_local() if _is_sharded(g) else g).mul_(coef)
    return total
