"""Entry functions the distributed tests run on every spawned rank (importable by 'spawn' children)."""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_pipe(model_dir, quantization, dtype):
    from mxdit.pipelines.wan import WanVideoPipeline

    return WanVideoPipeline.from_pretrained(model_dir, quantization=quantization, dtype=DTYPES[dtype],
                                            text_encoder_dtype=torch.float32, progress=False)


def generate_latents(pipe, **kw):
    out = pipe("a red fox in the snow", "blurry", output_type="latent", seed=3, **kw)
    return out.latents


def run_cases(cases):
    """``cases``: list of (layout ParallelConfig, model_dir, quantization, dtype, call kwargs).

    Every rank runs every case under its layout; returns (on rank 0) one entry per case:
    (rank-0 latents, whether all ranks' latents are bit-equal)."""
    import torch.distributed as dist

    from mxdit import distributed as mxdist

    pipes = {}
    results = []
    for layout, model_dir, quantization, dtype, kw in cases:
        mxdist.init_parallel_state(layout)
        key = (model_dir, quantization, dtype)
        if key not in pipes:
            pipes[key] = load_pipe(model_dir, quantization, dtype)
        lat = generate_latents(pipes[key], **kw).contiguous()
        parts = [torch.empty_like(lat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, lat)
        results.append((lat, all(torch.equal(p, lat) for p in parts)))
    return results if mxdist.is_rank0() else None


def check_collectives(seed: int = 0):
    """Ulysses attention and the CFG gather against plain single-process math, on random tensors.

    Returns (on rank 0) a dict of booleans; every rank checks its own shard."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from mxdit import distributed as mxdist
    from mxdit.layers.attention import attention

    world = dist.get_world_size()
    rank = dist.get_rank()
    out = {}
    g = torch.Generator().manual_seed(seed)
    b, l, h, d = 2, 6 * world, 2 * world, 16
    q, k, v = (torch.randn(b, l, h, d, generator=g) for _ in range(3))
    # oracle: SDPA on the whole sequence, [B, H, L, D] layout
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    mxdist.init_parallel_state(mxdist.ParallelConfig(num_gpus=world, ulysses_degree=world))
    local = slice(rank * (l // world), (rank + 1) * (l // world))
    sq, sk, sv = q[:, local], k[:, local], v[:, local]
    out["shard"] = torch.equal(mxdist.shard_tokens(q), sq)
    out["a2a_roundtrip"] = torch.equal(mxdist.heads_to_seq(mxdist.seq_to_heads(sq)), sq)
    heads = slice(rank * (h // world), (rank + 1) * (h // world))
    out["a2a_layout"] = torch.equal(mxdist.seq_to_heads(sq), q[:, :, heads])
    got = mxdist.ulysses(attention)(sq, sk, sv)
    out["ulysses_max_err"] = (got - ref[:, local]).abs().max().item()
    out["gather"] = torch.equal(mxdist.gather_tokens(sq), q)
    if world % 2 == 0:
        mxdist.init_parallel_state(mxdist.ParallelConfig(num_gpus=world, cfg_degree=2, ulysses_degree=world // 2))
        st = mxdist.get_parallel_state()
        parts = mxdist.gather_cfg(torch.full((3,), float(rank)))
        sp = world // 2
        out["cfg_groups"] = [p[0].item() for p in parts] == [float(st.sp_rank), float(st.sp_rank + sp)]
    every = [None] * world
    dist.all_gather_object(every, out)
    return every if rank == 0 else None


def fail_on_rank(bad_rank: int):
    """Raises ValueError on ``bad_rank``; the others block in a collective that never completes."""
    import torch.distributed as dist

    if dist.get_rank() == bad_rank:
        raise ValueError(f"bad input seen on rank {bad_rank}")
    dist.barrier()
    return "unreachable"
