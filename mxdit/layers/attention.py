"""The single attention entry point and its backend registry.

Layout: ``q``, ``k``, ``v`` are ``[B, L, H, D]`` ("BSND", the layout the
projections produce and flash-attn / NPU fused attention take natively); the
result is ``[B, Lq, H, D]``.  Attention is full (no mask, no dropout, not
causal) with scale ``1/sqrt(D)``: the only kind Wan uses.

Backends are functions ``fn(q, k, v) -> out`` with that contract.  ``"sdpa"``
(:func:`torch.nn.functional.scaled_dot_product_attention`) is built in; faster
ones plug in with :func:`register_attention_backend` and are chosen globally
with :func:`set_attention_backend` (or per call with ``backend=``).

**Quantized attention** (self-attention only; cross-attention stays BF16 as
in SGLang).  Four named backends, each used only by calls made with
``self_attention=True`` — any other call under them runs ``"sdpa"``:

=====================  =======================================================
``mxfp8``              MXFP8 Q/K (per 32 along head_dim) and V (per 32 tokens),
                       E8M0 scales, P in fp32 — SGLang's Ascend MXFP8 FA
                       numerics (:mod:`mxdit.formats.attention`).  No online
                       rotation; a checkpoint's ``q_rot`` / ``k_rot`` are
                       applied when the layer has them.
``mxfp8_rotated``      ``mxfp8`` after rotating q and k: the checkpoint's
                       ``q_rot`` / ``k_rot`` when present, else SGLang's online
                       QR rotation (seed 42) — what SGLang runs.
``fp8_block``          MindIE-SD's FP8 E4M3 with one fp32 scale per 128 Q
                       tokens / 256 K, V tokens (x head_dim), per head.
``fp8_block_rotated``  ``fp8_block`` after the same rotation as above.
=====================  =======================================================

The arithmetic runs on the kernel backend of the tensors' device
(:func:`mxdit.kernels.select_backend`: reference, NPU, Triton).  SGLang's
switch ``SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION=1`` maps to
``mxfp8_rotated`` (:func:`resolve_attention_quantization`).
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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: Optional[str] = None,
    self_attention: bool = False,
    q_rot: Optional[torch.Tensor] = None,
    k_rot: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Full softmax attention. ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] -> [B, Lq, H, D].

    ``self_attention``: the call is a self-attention (q, k, v from the same
    tokens), the only kind the quantized backends take.  ``q_rot`` / ``k_rot``:
    a checkpoint's offline rotations [D, D], used only by quantized backends.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, L, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            "attention shapes disagree (need q [B, Lq, H, D], k = v [B, Lk, H, D]): "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    name = backend or _ACTIVE
    fn = _lookup(name)
    if isinstance(fn, QuantizedAttention):
        if not self_attention:
            return _sdpa(q, k, v)
        return fn(q, k, v, q_rot=q_rot, k_rot=k_rot)
    return fn(q, k, v)


class QuantizedAttention:
    """A quantized self-attention backend: ``mode`` of the kernel backend, optionally rotated."""

    def __init__(self, mode: str, rotate: bool) -> None:
        self.mode = mode
        self.rotate = rotate

    def __call__(self, q, k, v, *, q_rot: Optional[torch.Tensor] = None, k_rot: Optional[torch.Tensor] = None):
        from mxdit.formats.rotation import online_rotation, rotate_qk
        from mxdit.kernels import select_backend

        if (q_rot is None) != (k_rot is None):
            raise ValueError("attention: q_rot and k_rot must be given together")
        if q_rot is not None:  # offline (checkpoint) rotation, applied after RoPE
            q, k = rotate_qk(q, k, q_rot, k_rot)
        elif self.rotate:  # SGLang's online rotation
            q, k = rotate_qk(q, k, online_rotation(q.shape[-1], q.dtype, q.device))
        if torch.compiler.is_compiling():  # one opaque custom op for torch.compile
            from mxdit.kernels import ops

            return ops.quantized_attention(q, k, v, self.mode)
        return select_backend(q.device).quantized_attention(q, k, v, mode=self.mode)


#: quantized self-attention backends: name -> (kernel mode, online rotation)
QUANTIZED_ATTENTION_MODES: dict[str, tuple[str, bool]] = {
    "mxfp8": ("mxfp8", False),
    "mxfp8_rotated": ("mxfp8", True),
    "fp8_block": ("fp8_block", False),
    "fp8_block_rotated": ("fp8_block", True),
}
#: SGLang's switch for MXFP8 attention and the mode it means here
SGLANG_MXFP8_ATTENTION_ENV = "SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION"
SGLANG_MXFP8_ATTENTION_MODE = "mxfp8_rotated"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def resolve_attention_quantization(value: Optional[str]) -> Optional[str]:
    """The quantized self-attention mode to use: ``value`` (a name above, or
    None / "none" / "sdpa" for none); when ``value`` is None,
    ``SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION`` truthy gives ``mxfp8_rotated``."""
    import os

    if value is None:
        raw = os.environ.get(SGLANG_MXFP8_ATTENTION_ENV, "").strip().lower()
        if raw in _TRUE:
            return SGLANG_MXFP8_ATTENTION_MODE
        if raw not in _FALSE:
            raise ValueError(f"{SGLANG_MXFP8_ATTENTION_ENV} must be a boolean (1/0, true/false), got {raw!r}")
        return None
    if value in ("none", "sdpa"):
        return None
    if value not in QUANTIZED_ATTENTION_MODES:
        raise ValueError(
            f"unknown attention quantization {value!r}; valid: {sorted(QUANTIZED_ATTENTION_MODES)} or 'none'"
        )
    return value


register_attention_backend("sdpa", _sdpa)
for _name, (_mode, _rot) in QUANTIZED_ATTENTION_MODES.items():
    register_attention_backend(_name, QuantizedAttention(_mode, _rot))
