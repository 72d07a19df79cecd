"""Wan 3-D rotary position embedding (diffusers ``WanRotaryPosEmbed`` numerics).

The head dimension ``d`` is split into a frame part of ``d - 4*(d//6)`` and
height/width parts of ``2*(d//6)`` each (44/42/42 for ``d = 128``).  Each part
rotates consecutive channel pairs ``(x[2j], x[2j+1])`` by ``pos * theta**(-2j/n)``
where ``pos`` is the token's frame/row/column index in the patch grid.

Frequencies are computed in float64 on the CPU and rounded to float32, as
diffusers does, so the tables agree bit for bit.  Tables are built lazily on the
device of the input (nothing is allocated at construction, so models can be
built on ``meta``), and the last few grids are cached.

Representation: :class:`WanRotaryPosEmbed` returns ``(cos, sin)`` of shape
``[1, L, 1, d/2]`` in float32, one value per channel pair (diffusers returns the
same values repeated per channel, ``[1, L, 1, d]``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn


def wan_rope_split(head_dim: int) -> tuple[int, int, int]:
    """``(t, h, w)`` rotary dims for ``head_dim``: ``(d - 4*(d//6), 2*(d//6), 2*(d//6))``."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    if head_dim % 2 or hw == 0:
        raise ValueError(f"head_dim={head_dim} cannot be split for 3-D RoPE (must be even and >= 6)")
    return t, hw, hw


def rope_angles(dim: int, num_positions: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[num_positions, dim // 2]`` in float64 on the CPU."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(num_positions), inv_freq)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` [..., d] by angles whose cos/sin are [..., d/2] (broadcast).

    Computed in the promoted dtype of ``x`` and the tables (float32 for a bf16
    ``x``) and returned in ``x.dtype``, as diffusers does.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class WanRotaryPosEmbed(nn.Module):
    """3-D RoPE tables for a ``[B, C, F, H, W]`` latent (before patching).

    Args:
        attention_head_dim: per-head channels ``d``.
        patch_size: ``(p_t, p_h, p_w)``; the grid is ``(F/p_t, H/p_h, W/p_w)``.
        max_seq_len: largest grid extent per axis (diffusers' ``rope_max_seq_len``).
        theta: RoPE base.
    """

    _CACHE_SIZE = 4

    def __init__(self, attention_head_dim: int, patch_size: Sequence[int], max_seq_len: int,
                 theta: float = 10000.0):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.patch_size = tuple(patch_size)
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.t_dim, self.h_dim, self.w_dim = wan_rope_split(attention_head_dim)
        self._cache: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def grid(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        return f // p_t, h // p_h, w // p_w

    def tables(self, grid: tuple[int, int, int], device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` float32 ``[1, F*H*W, 1, d/2]`` for a patch grid, tokens in (f, h, w) order."""
        device = torch.device(device)
        key = (grid, device)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if max(grid) > self.max_seq_len:
            raise ValueError(
                f"patch grid {grid} exceeds rope_max_seq_len={self.max_seq_len} along an axis; "
                "raise rope_max_seq_len in the model config"
            )
        ppf, pph, ppw = grid
        a_f = rope_angles(self.t_dim, ppf, self.theta)
        a_h = rope_angles(self.h_dim, pph, self.theta)
        a_w = rope_angles(self.w_dim, ppw, self.theta)
        out = []
        for fn in (torch.cos, torch.sin):
            # float64 -> float32 per axis (as diffusers), then broadcast to the grid.
            parts = (
                fn(a_f).float().view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                fn(a_h).float().view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                fn(a_w).float().view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
            )
            table = torch.cat(parts, dim=-1).reshape(1, ppf * pph * ppw, 1, -1)
            out.append(table.to(device))
        result = (out[0], out[1])
        self._cache[key] = result
        while len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables(self.grid(hidden_states), hidden_states.device)

    def extra_repr(self) -> str:
        return (f"head_dim={self.attention_head_dim}, split=({self.t_dim}, {self.h_dim}, {self.w_dim}), "
                f"max_seq_len={self.max_seq_len}, theta={self.theta}")
