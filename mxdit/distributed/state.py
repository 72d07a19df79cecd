"""The process groups of the active :class:`ParallelConfig`, and rank helpers that work without a group."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from .config import ParallelConfig, ParallelConfigError


@dataclass
class ParallelState:
    """The groups this rank belongs to under ``config`` (None where the degree is 1)."""

    config: ParallelConfig
    rank: int
    sp_group: Any = None
    sp_rank: int = 0
    cfg_group: Any = None
    cfg_rank: int = 0

    @property
    def sp_degree(self) -> int:
        return self.config.sp_degree

    @property
    def cfg_degree(self) -> int:
        return self.config.cfg_degree


_STATE: Optional[ParallelState] = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """This rank's index on its host (torchrun's ``LOCAL_RANK``; the rank for spawned ranks)."""
    return int(os.environ.get("LOCAL_RANK", get_rank())) if is_initialized() else 0


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` from rank ``src`` on every rank of ``group`` (default: all; pickled; the identity without a group)."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def init_parallel_state(config: ParallelConfig) -> ParallelState:
    """Build the SP and CFG groups of ``config`` on the initialized default group and make them active.

    Collective: every rank calls it with the same ``config``.  Can be called again with another
    layout on the same process group (the tests do).  Without a process group only the
    one-device config is accepted.
    """
    global _STATE
    world = get_world_size()
    if config.num_gpus != world:
        raise ParallelConfigError(
            f"--num-gpus {config.num_gpus} does not match the {world} process(es) running "
            "(torchrun --nproc-per-node must equal --num-gpus)"
        )
    config.check_product()
    rank = get_rank()
    state = ParallelState(config=config, rank=rank)
    sp, cfg = config.sp_degree, config.cfg_degree
    if world > 1:
        # rank = cfg_rank * sp + sp_rank; every rank creates every group, in the same order
        for c in range(world // sp):
            ranks = list(range(c * sp, (c + 1) * sp))
            group = dist.new_group(ranks) if sp > 1 else None
            if rank in ranks:
                state.sp_group, state.sp_rank = group, ranks.index(rank)
        for s in range(sp):
            ranks = list(range(s, world, sp))
            group = dist.new_group(ranks) if cfg > 1 else None
            if rank in ranks:
                state.cfg_group, state.cfg_rank = group, ranks.index(rank)
    _STATE = state
    return state


def get_parallel_state() -> Optional[ParallelState]:
    """The active layout, or None (one device)."""
    return _STATE


def clear_parallel_state() -> None:
    global _STATE
    _STATE = None


@contextlib.contextmanager
def no_parallel() -> Iterator[None]:
    """Run the block as one device would, even inside a process group (e.g. a reference run on rank 0)."""
    global _STATE
    saved = _STATE
    _STATE = None
    try:
        yield
    finally:
        _STATE = saved


def sp_degree() -> int:
    return _STATE.sp_degree if _STATE is not None else 1


def cfg_degree() -> int:
    return _STATE.cfg_degree if _STATE is not None else 1


def backend_for_device(device: str | torch.device) -> str:
    """nccl for CUDA, hccl for Ascend NPU, gloo otherwise (CPU)."""
    kind = torch.device(device).type
    return {"cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


def rank_device(device: str | torch.device, local_rank: int) -> str:
    """The device of local rank ``local_rank``: ``cuda:<local_rank>`` / ``npu:<local_rank>``; ``cpu`` stays."""
    kind = torch.device(device).type
    return "cpu" if kind == "cpu" else f"{kind}:{local_rank}"
