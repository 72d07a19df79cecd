"""Sequence parallel (Ulysses) and CFG-parallel collectives on the active :class:`ParallelState`.

Every function is the identity (or a plain call) when no layout with that degree is active,
so a model calls them unconditionally.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from .config import ParallelConfigError
from .state import get_parallel_state


def _sp():
    st = get_parallel_state()
    return st if st is not None and st.sp_degree > 1 else None


def sequence_parallel_active() -> bool:
    return _sp() is not None


def shard_tokens(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This SP rank's contiguous slice of the token axis ``dim`` (the whole tensor without SP)."""
    st = _sp()
    if st is None:
        return x
    n = x.shape[dim]
    if n % st.sp_degree:
        raise ParallelConfigError(
            f"the video has {n} tokens, not divisible by the sequence-parallel degree {st.sp_degree}"
        )
    local = n // st.sp_degree
    return x.narrow(dim, st.sp_rank * local, local)


def gather_tokens(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate the SP ranks' token slices along ``dim`` (rank order), on every SP rank."""
    st = _sp()
    if st is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(st.sp_degree)]
    dist.all_gather(parts, x, group=st.sp_group)
    return torch.cat(parts, dim=dim)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` [N, ...]: chunk j goes to rank j; returns [N, ...] with chunk j received from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor) -> torch.Tensor:
    """Ulysses forward all-to-all: ``[B, L/N, H, D]`` (my tokens, all heads) -> ``[B, L, H/N, D]``."""
    st = _sp()
    n = st.sp_degree
    b, ls, h, d = x.shape
    if h % n:
        raise ParallelConfigError(f"--ulysses-degree {n} must divide the attention heads ({h})")
    x = x.reshape(b, ls, n, h // n, d).permute(2, 0, 1, 3, 4)        # [N(head group), B, Ls, H/N, D]
    y = _all_to_all(x, st.sp_group)                                   # [N(token shard), B, Ls, H/N, D]
    return y.permute(1, 0, 2, 3, 4).reshape(b, n * ls, h // n, d)


def heads_to_seq(x: torch.Tensor) -> torch.Tensor:
    """Ulysses backward all-to-all: ``[B, L, H/N, D]`` -> ``[B, L/N, H, D]``."""
    st = _sp()
    n = st.sp_degree
    b, l, hn, d = x.shape
    x = x.reshape(b, n, l // n, hn, d).permute(1, 0, 2, 3, 4)        # [N(token shard), B, Ls, H/N, D]
    y = _all_to_all(x, st.sp_group)                                   # [N(head group), B, Ls, H/N, D]
    return y.permute(1, 2, 0, 3, 4).reshape(b, l // n, n * hn, d)


def ulysses(attn_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap ``attn_fn(q, k, v, **kw)`` (``[B, L, H, D]`` tensors) for Ulysses sequence parallel.

    With SP active, q/k/v hold this rank's tokens and all heads; they are exchanged so
    each rank holds every token of ``H/N`` heads, ``attn_fn`` runs on those (whatever
    attention backend is active: it sees ordinary full-sequence attention), and the
    result goes back to token shards.  Without SP it returns ``attn_fn`` itself.
    """
    if _sp() is None:
        return attn_fn

    @functools.wraps(attn_fn)
    def wrapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = attn_fn(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v), *args, **kwargs)
        return heads_to_seq(out)

    return wrapped


# ------------------------------------------------------------------------------------------ CFG parallel
def cfg_parallel_active() -> bool:
    st = get_parallel_state()
    return st is not None and st.cfg_degree > 1


def cfg_rank() -> int:
    st = get_parallel_state()
    return st.cfg_rank if st is not None else 0


def gather_cfg(x: torch.Tensor) -> list[torch.Tensor]:
    """Every CFG rank's ``x`` (rank order: cfg rank 0 = conditional, 1 = unconditional)."""
    st = get_parallel_state()
    if st is None or st.cfg_degree == 1:
        return [x]
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(st.cfg_degree)]
    dist.all_gather(parts, x, group=st.cfg_group)
    return parts
