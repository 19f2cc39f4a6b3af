"""Running under `torchrun`: which rank this process is, its process group, and how work is shared out.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a command is one process (world 1) and nothing here
touches torch.distributed. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


@dataclass(frozen=True)
class DistContext:
    """This process's place in a run: its ranks (one rank without torchrun) and its device. Whatever trains under
    torchrun takes one of these rather than the rank, the world and the collectives as loose arguments."""

    ranks: Ranks = Ranks()
    device: torch.device = torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world

    @property
    def main(self) -> bool:
        return self.ranks.main

    @property
    def many(self) -> bool:
        return self.ranks.many

    def gather(self, value: Any) -> list:
        """Every rank's `value` (JSON), in rank order, on every rank; `[value]` for one rank."""
        return gather(self.ranks, value)

    def barrier(self) -> None:
        barrier(self.ranks)


def dist_context(device: torch.device) -> DistContext:
    """This process's context: its ranks from torchrun's environment, each rank of a node on its own GPU."""
    ranks = ranks_from_env()
    return DistContext(ranks, rank_device(ranks, device))


def ranks_from_env() -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank of a node on its own GPU (cuda:LOCAL_RANK) unless the device names an index."""
    if ranks.many and device.type == "cuda" and device.index is None:
        if ranks.local_rank >= torch.cuda.device_count():  # more processes on this node than GPUs
            from .errors import PkdCacheError

            raise PkdCacheError(f"{ranks} (LOCAL_RANK {ranks.local_rank}) would run on cuda:{ranks.local_rank}, but "
                                f"this machine has {torch.cuda.device_count()} CUDA device(s); start at most that "
                                f"many processes per node (torchrun --nproc-per-node)")
        return torch.device("cuda", ranks.local_rank)
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device):
    """The default process group for the duration (a no-op for one process)."""
    import torch.distributed as dist

    if not ranks.many or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.many:
        import torch.distributed as dist

        dist.barrier()


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` (anything JSON can hold) on every rank."""
    if not ranks.many:
        return value
    import torch.distributed as dist

    data = _encode(value if ranks.main else None)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
    dist.broadcast(size, src=0)
    if not ranks.main:
        data = torch.empty(int(size), dtype=torch.uint8, device=data.device)
    dist.broadcast(data, src=0)
    return _decode(data)


def gather(ranks: Ranks, value: Any) -> list:
    """Every rank's `value` (anything JSON can hold), in rank order, on every rank."""
    if not ranks.many:
        return [value]
    import torch.distributed as dist

    data = _encode(value)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
    sizes = [torch.zeros_like(size) for _ in range(ranks.world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=data.device)
    padded[:data.numel()] = data
    out = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(out, padded)
    return [_decode(t[:int(n)]) for t, n in zip(out, sizes)]


def _encode(value: Any) -> torch.Tensor:
    """JSON bytes as a uint8 tensor on the backend's device: ranks exchange data, never pickles."""
    import json

    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    raw = bytearray(json.dumps(value).encode())
    return torch.frombuffer(raw, dtype=torch.uint8).to(device) if raw else torch.empty(0, dtype=torch.uint8)


def _decode(data: torch.Tensor) -> Any:
    import json

    return json.loads(bytes(data.cpu().numpy().tobytes()).decode())


def balanced_shares(costs: list[float], world: int) -> list[list[int]]:
    """Indices of `costs` split into `world` shares of about equal total cost: largest first, each to the share
    with the least so far (ties to the lowest rank), each share then in index order. Deterministic."""
    shares: list[list[int]] = [[] for _ in range(world)]
    totals = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (totals[r], r))
        shares[r].append(i)
        totals[r] += costs[i]
    return [sorted(s) for s in shares]
