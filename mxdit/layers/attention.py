"""The single attention entry point and its backend registry.

Layout: ``q``, ``k``, ``v`` are ``[B, L, H, D]`` ("BSND", the layout the
projections produce and flash-attn / NPU fused attention take natively); the
result is ``[B, Lq, H, D]``.  Attention is full (no mask, no dropout, not
causal) with scale ``1/sqrt(D)``: the only kind Wan uses.

Backends are functions ``fn(q, k, v) -> out`` with that contract.  ``"sdpa"``
(:func:`torch.nn.functional.scaled_dot_product_attention`) is built in; faster
ones plug in with :func:`register_attention_backend` and are chosen globally
with :func:`set_attention_backend` (or per call with ``backend=``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BACKENDS: dict[str, AttentionBackend] = {}
_ACTIVE: str = "sdpa"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2)


def register_attention_backend(name: str, fn: AttentionBackend, *, overwrite: bool = False) -> None:
    """Make ``fn`` available as backend ``name`` (see the module docstring for the contract)."""
    if not callable(fn):
        raise TypeError(f"attention backend '{name}' must be callable, got {type(fn).__name__}")
    if name in _BACKENDS and not overwrite:
        raise ValueError(f"attention backend '{name}' is already registered (pass overwrite=True to replace it)")
    _BACKENDS[name] = fn


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend() -> str:
    """Name of the globally active backend."""
    return _ACTIVE


def _lookup(name: str) -> AttentionBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend '{name}'; registered: {available_attention_backends()}"
        ) from None


def set_attention_backend(name: str) -> None:
    """Use backend ``name`` for every :func:`attention` call without ``backend=``."""
    global _ACTIVE
    _lookup(name)
    _ACTIVE = name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside the ``with`` block."""
    previous = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Full softmax attention. ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] -> [B, Lq, H, D]."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, L, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            "attention shapes disagree (need q [B, Lq, H, D], k = v [B, Lk, H, D]): "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    return _lookup(backend or _ACTIVE)(q, k, v)


register_attention_backend("sdpa", _sdpa)
