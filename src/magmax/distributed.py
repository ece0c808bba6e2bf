"""Data-parallel runs: rank and world, the share of a batch each rank trains on, and collectives that
are no-ops in one process.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins a process group (NCCL on
CUDA, gloo on CPU); every rank holds the whole model and trains on its contiguous share of each global
batch (:func:`share`), the gradients are SUMMED across ranks (each rank's loss is already weighted by its
rows' share of the global batch), and rank 0 alone writes the run directory. Objects cross ranks as JSON
and tensors, never pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from magmax.errors import ConfigError, MagmaxError

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Inside a multi-process launch (torchrun sets WORLD_SIZE for every worker)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (no-op outside one, or if joined)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run in one process (without torchrun / --nproc)")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA in a multi-process run, else ``device``."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- the share of a batch ---------------------------------------------------------------------------


def share(rows: int, batch_size: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The rows of a global batch of ``rows`` (≤ ``batch_size``) that rank ``rank_`` trains on.

    Each rank is handed ceil(batch_size / world) consecutive rows, whatever the batch's length: a
    short batch (the end of an epoch) leaves the last ranks fewer rows, or none. Cutting by the NOMINAL
    batch size keeps each rank's rows on the grid of the single-process micro-batches (grad_accum)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    size = -(-batch_size // world)
    return slice(min(rank_ * size, rows), min((rank_ + 1) * size, rows))


def micro_batch(batch_size: int, grad_accum: int, world: int | None = None) -> int:
    """Rows per forward pass: a rank's share split into ``grad_accum`` micro-batches."""
    world = world_size() if world is None else world
    per_rank = -(-batch_size // world)
    return max(1, -(-per_rank // grad_accum))


# -- collectives -------------------------------------------------------------------------------------


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's ``.grad`` across ranks, in place, in one flat buffer per dtype.

    A rank without a gradient for a parameter (no rows in this batch) adds zeros; a parameter that no
    rank has a gradient for keeps ``grad = None``, as in one process (AdamW then skips it)."""
    if not active():
        return
    device = _comm_device()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if int(present[i]):
            by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        flat = torch.cat([
            (params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1).to(device)
            for i in indices
        ])
        dist.all_reduce(flat)
        offset = 0
        for i in indices:
            p = params[i]
            value = flat[offset : offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over ranks (float64)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast_json(obj: Any) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank."""
    if not active():
        return obj
    device = _comm_device()
    data = json.dumps(obj).encode() if is_main() else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, 0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if is_main():
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return json.loads(bytes(buffer.cpu().tolist()).decode()) if not is_main() else obj


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its JSON-able result on every rank. An error raised there is raised on every
    rank (rank 0: the error itself; the others: a ConfigError with its message for a user error, else a
    RuntimeError), so no rank waits for a dead one."""
    if not active():
        return fn()
    payload: dict[str, Any] = {}
    error: Exception | None = None
    if is_main():
        try:
            payload = {"ok": fn()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            payload = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                       "user": isinstance(exc, MagmaxError)}
    payload = broadcast_json(payload)
    if error is not None:
        raise error
    if "error" in payload:
        if payload["user"]:
            raise ConfigError(payload["error"])
        raise RuntimeError(f"rank 0 failed: {payload['error']}")
    return payload["ok"]


def broadcast_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank (CPU); the other ranks pass ``{}`` or anything: they get rank 0's."""
    if not active():
        return tensors
    meta = broadcast_json({k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()} if is_main() else None)
    device = _comm_device()
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape) in meta.items():
        t = tensors[key].to(device).contiguous() if is_main() else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, 0)
        out[key] = t.cpu() if not is_main() else tensors[key]
    return out


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 only, then handed to every rank: nested dicts/lists of tensors and
    JSON scalars (flattened as :mod:`magmax.state_io` stores run state)."""
    if not active():
        return fn()
    from magmax.state_io import flatten, unflatten

    tensors: dict[str, torch.Tensor] = {}
    skeleton = run_on_main(lambda: flatten(fn(), tensors))
    return unflatten(skeleton, broadcast_tensors(tensors))


def broadcast_module_(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank (keeps ranks identical)."""
    if not active():
        return
    device = _comm_device()
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.data.to(device)
            dist.broadcast(buf, 0)
            if buf is not t.data:
                t.data.copy_(buf)


def gather_rows(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's ``local`` rows (rank ``r`` holding ``counts[r]``, trailing shape equal), concatenated
    in rank order on every rank (CPU)."""
    if not active():
        return local
    device = _comm_device()
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])


def max_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
