"""Multi-device generation on torch.distributed: layouts, process groups, launcher, SP and CFG collectives.

Layer: between ``layers`` and ``models`` (imports only torch and its own modules).

Layout
    :class:`ParallelConfig` holds SGLang's degrees (``num_gpus = cfg x tp x ulysses x
    ring``, ``sp = ulysses x ring``); :meth:`ParallelConfig.resolve` fills unset degrees
    as SGLang's ``_adjust_parallelism`` does and :meth:`ParallelConfig.validate` rejects
    what cannot run (heads not divisible by Ulysses, tokens not divisible by SP, TP > 1,
    ring > 1) with a one-line :class:`ParallelConfigError` naming the flag, before any
    weights load.  Rank order is SGLang's "tp-sp-pp-cfg-dp": ``rank = cfg_rank * sp + sp_rank``.

Starting ranks
    :func:`launch` runs an entry function on every rank: in-process for one device,
    under torchrun (``env://``), or by spawning ``num_gpus`` processes on this host
    (free loopback port, nccl / hccl / gloo from the device).  Before the entry runs it
    builds the groups with :func:`init_parallel_state`; that **global parallel state is
    how the model and the pipeline learn the layout** — nothing is passed to
    ``from_pretrained``.  Code that joins its own process group calls
    ``init_parallel_state(config)`` itself; :func:`no_parallel` runs a block as one device.

Sequence parallel (Ulysses)
    The Wan transformer shards its tokens after patch embedding (:func:`shard_tokens`;
    RoPE tables and TI2V's per-token modulation are computed on the full grid and
    sliced), wraps its self-attention call in :func:`ulysses`, keeps cross-attention
    local (text K/V on every rank) and gathers the tokens (:func:`gather_tokens`) before
    ``norm_out`` / ``proj_out``.  The all-to-all is a thin layer on
    ``torch.distributed.all_to_all_single`` rather than diffusers' ``dispatch_attention_fn``
    or yunchang: both bring their own attention-kernel registry, so they would bypass
    mxdit's (``mxdit.layers.attention``, where the MX attention backends live) — ours
    wraps whatever backend is active, which then sees ordinary full-sequence attention
    on ``H / ulysses`` heads.  It also avoids diffusers' CPU DeviceMesh shim and
    yunchang's global groups (see ../shared/reference/scale-out-and-serving.md §2-3).
    Tokens are never padded: a length not divisible by SP is rejected (unmasked padding
    changes the result).  Ring attention is not built (``--ring-degree > 1`` is refused).

CFG parallel
    With ``cfg_degree == 2`` the pipeline runs the conditional branch on CFG rank 0 and
    the unconditional on CFG rank 1, all-gathers both predictions (:func:`gather_cfg`)
    and applies the single-device formula ``uncond + s * (cond - uncond)`` on every rank,
    so every rank holds the same latents as one device would (not SGLang's all-reduce
    combine, which is not bit-equal).  CFG x SP composes (``num_gpus = 2 x sp``).

Bit-identity
    Every per-token op is row-local, so on the reference backend the SP and CFG results
    equal one process's bit for bit when the linears are MX-quantized (MX blocks run along
    K).  Plain BF16/FP32 ``nn.Linear`` GEMMs on CPU depend on the row count, so an
    unquantized model under SP is close but not bit-equal (tests state the tolerance).
"""
from __future__ import annotations

from .config import RING_NOT_SUPPORTED, TP_NOT_SUPPORTED, ParallelConfig, ParallelConfigError
from .launch import DEFAULT_DIST_TIMEOUT_S, RankError, free_port, launch, under_torchrun
from .sequence import (cfg_parallel_active, cfg_rank, gather_cfg, gather_tokens, heads_to_seq, seq_to_heads,
                       sequence_parallel_active, shard_tokens, ulysses)
from .state import (ParallelState, backend_for_device, barrier, broadcast_object, cfg_degree,
                    clear_parallel_state, get_local_rank, get_parallel_state, get_rank, get_world_size, init_parallel_state,
                    is_initialized, is_rank0, no_parallel, rank_device, sp_degree)

__all__ = [
    "ParallelConfig", "ParallelConfigError", "ParallelState", "RankError", "TP_NOT_SUPPORTED",
    "RING_NOT_SUPPORTED", "DEFAULT_DIST_TIMEOUT_S",
    "launch", "under_torchrun", "free_port", "init_parallel_state", "get_parallel_state", "clear_parallel_state",
    "no_parallel", "get_rank", "get_local_rank", "get_world_size", "is_rank0", "is_initialized", "barrier", "broadcast_object",
    "backend_for_device", "rank_device", "sp_degree", "cfg_degree",
    "shard_tokens", "gather_tokens", "ulysses", "seq_to_heads", "heads_to_seq", "sequence_parallel_active",
    "cfg_parallel_active", "cfg_rank", "gather_cfg",
]
