"""Q/K rotations for quantized attention: one place for every rotation matrix.

Rotating Q and K by the same orthogonal ``R`` leaves ``Q K^T`` unchanged
(``(QR)(KR)^T = Q R R^T K^T = Q K^T``) while spreading outlier channels over
the whole head_dim, so the per-32 MX scales lose less.  V is never rotated.
Two sources of ``R`` exist (../shared/reference/mx-attention.md §1, §2):

* **online** (SGLang, ``ascend_fa.py``): one random orthogonal matrix per
  head_dim, the Q factor of the QR decomposition of a seeded normal matrix:
  ``torch.linalg.qr(torch.randn(D, D, fp32, CPU, generator seeded 42))[0]``,
  cast to the dtype of q, applied as ``q @ R`` and ``k @ R`` after RoPE, one
  ``R`` for all heads — :func:`online_rotation`;
* **offline** (msmodelslim W8A8F8 / W4A4F8 checkpoints): ``<attn>.q_rot`` and
  ``<attn>.k_rot`` [D, D] tensors stored in the checkpoint, applied as
  ``q @ q_rot`` and ``k @ k_rot`` after RoPE (SGLang, MindIE-SD).  msmodelslim
  makes them with :func:`random_hadamard` (size head_dim, seed 1234 shared by
  q and k, bfloat16; ``model/wan2_2/base_model_adapter.py``).

:func:`random_hadamard` reproduces msmodelslim @3de0a3c
``processor/quarot/common/hadamard.py`` ``random_hadamard_matrix`` as called
by ``quarot_utils.create_rot(HADAMARD, size, block_size=-1, seed)``:
``seed_all(seed)`` (so ``torch.manual_seed(seed)``), then
``randint(0, 2, (n,))`` on the CPU default generator, cast to ``dtype``,
``*2 - 1``, ``diag``, then ``matmul_had_u``: the in-place butterfly
(``a+b``, ``a-b`` on adjacent halves, log2(n) passes) over each row, divided
by ``torch.tensor(n).sqrt()`` — all in ``dtype``.  The result is
``diag(s) @ H_n / sqrt(n)`` with ``H_n`` the Sylvester Hadamard matrix.  Here
a private generator seeded the same way replaces the global seeding (same
draws, no side effect on the caller's RNG).  Only powers of two are built:
msmodelslim's non-power-of-two sizes need its stored Paley/Williamson
matrices (``hadamard_txt/had.*.txt``), which mxdit does not ship; Wan's
head_dim is 128.
"""
from __future__ import annotations

from typing import Optional

import torch

ONLINE_SEED = 42
HADAMARD_SEED = 1234

_ONLINE_CACHE: dict[int, torch.Tensor] = {}


def _check_size(n: int, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{what}: size must be a positive int, got {n!r}")


def online_rotation(head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """SGLang's online rotation for ``head_dim``: Q of QR(randn(D, D) seeded 42), [D, D].

    Computed once per head_dim in fp32 on the CPU (as SGLang does, so the matrix
    does not depend on the device), then cast to ``dtype`` and moved to ``device``.
    """
    _check_size(head_dim, "online_rotation")
    r = _ONLINE_CACHE.get(head_dim)
    if r is None:
        g = torch.Generator(device="cpu").manual_seed(ONLINE_SEED)
        a = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float32, device="cpu")
        r = torch.linalg.qr(a)[0].contiguous()
        _ONLINE_CACHE[head_dim] = r
    return r.to(device=device, dtype=dtype)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _butterfly_rows(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each row of ``x`` [R, n] (n a power of two), in x's dtype.

    Pass p pairs element ``2j`` with ``2j+1`` of the current view
    ``[R, n/2, 2, w]`` (w doubling each pass) into ``(a+b, a-b)`` — msmodelslim's
    ``matmul_had_u`` loop, whose result is ``x @ H_n`` (Sylvester order).
    """
    rows, n = x.shape
    cur = x.reshape(rows, n, 1)
    while cur.shape[1] > 1:
        v = cur.reshape(rows, cur.shape[1] // 2, 2, cur.shape[2])
        cur = torch.cat([v[:, :, 0, :] + v[:, :, 1, :], v[:, :, 0, :] - v[:, :, 1, :]], dim=-1)
    return cur.reshape(rows, n)


def random_hadamard(n: int, seed: int = HADAMARD_SEED, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """msmodelslim's random Hadamard rotation ``diag(±1) @ H_n / sqrt(n)`` [n, n] (see the module docstring)."""
    _check_size(n, "random_hadamard")
    if not _is_pow2(n):
        raise ValueError(
            f"random_hadamard: size {n} is not a power of two (msmodelslim needs its stored Paley/Williamson "
            "matrices for other sizes; mxdit builds powers of two only)"
        )
    g = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(low=0, high=2, size=(n,), generator=g).to(dtype) * 2 - 1
    h = _butterfly_rows(torch.diag(signs))
    return h / torch.tensor(n).sqrt()


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, q_rot: torch.Tensor, k_rot: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q @ q_rot, k @ k_rot)`` along head_dim (the last axis), rotations cast to q's dtype.

    ``k_rot`` defaults to ``q_rot`` (the online rotation shares one matrix).  Apply after RoPE.
    """
    k_rot = q_rot if k_rot is None else k_rot
    d = q.shape[-1]
    for name, r in (("q_rot", q_rot), ("k_rot", k_rot)):
        if r.shape != (d, d):
            raise ValueError(f"rotate_qk: {name} must be [{d}, {d}] for head_dim {d}, got {list(r.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"rotate_qk: q and k head_dim differ ({d} vs {k.shape[-1]})")
    return q @ q_rot.to(device=q.device, dtype=q.dtype), k @ k_rot.to(device=k.device, dtype=q.dtype)


__all__ = ["ONLINE_SEED", "HADAMARD_SEED", "online_rotation", "random_hadamard", "rotate_qk"]
