"""Wan2.x DiT (``WanTransformer3DModel``) with diffusers parameter names.

Reimplements diffusers 0.42.1 ``transformer_wan.py`` with the same math, the
same parameter names (``model.load_state_dict(diffusers_model.state_dict())``
works with ``strict=True``) and the same ``forward`` signature.  Original Wan
checkpoints load after renaming with :mod:`mxdit.models.wan.names`.

Quantization
    **Every** linear layer is a :class:`~mxdit.layers.linear.QuantLinear` that gets
    the model's ``quant_config`` and its full dotted name as ``prefix``
    (``blocks.3.attn1.to_q``, ``blocks.3.ffn.net.0.proj``, ``proj_out``,
    ``condition_embedder.time_proj``, ...; exactly the diffusers state-dict names
    minus ``.weight``).  The model never decides what is quantized: the quant
    config's ``get_quant_method(layer, prefix)`` does, returning None to keep a
    layer unquantized.  The default for the online MX methods is "block linears
    only" (the ten per-block linears, as msmodelslim does), with ``proj_out``
    optional.  ``patch_embedding`` (Conv3d), norms, RoPE and the modulation tables
    are not linears and are never quantized.

Precision
    ``params_dtype`` (e.g. bf16) is the dtype of all parameters except those in
    :attr:`WanTransformer3DModel._keep_in_fp32_modules` (a parameter is kept in
    float32 when any component of its dotted name is listed: ``rope``,
    ``time_embedder``, ``scale_shift_table``, ``norm1``/``norm2``/``norm3``),
    which is what diffusers' ``from_pretrained(torch_dtype=...)`` does.  The
    modulation (shift/scale/gate), LayerNorms, residual gating and RoPE run in
    float32, exactly where diffusers runs them in float32.  Build the model in
    the dtype you want; a later ``model.to(torch.bfloat16)`` would also cast the
    float32-kept parameters (as in diffusers).

Devices
    Construction allocates only parameters (``device="meta"`` allocates nothing);
    RoPE tables are built lazily on the input's device.

Sequence parallel
    When a :mod:`mxdit.distributed` layout with ``sp_degree > 1`` is active, ``forward``
    shards the tokens after patch embedding (RoPE tables and per-token modulation are
    built on the full grid, then sliced), wraps the self-attention call in
    ``mxdist.ulysses`` (cross-attention stays local) and gathers the tokens before
    ``norm_out``; without a layout every one of these is the identity.

Layouts: latents ``[B, C, F, H, W]``; tokens ``[B, L, D]`` in (frame, row, column)
order; attention heads ``[B, L, H, head_dim]`` (see :mod:`mxdit.layers.attention`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mxdit import distributed as mxdist
from mxdit.layers.attention import attention
from mxdit.layers.linear import QuantLinear
from mxdit.layers.norms import FP32LayerNorm, RMSNorm
from mxdit.layers.rope import WanRotaryPosEmbed, apply_rotary_emb
from mxdit.models.wan.config import WanTransformerConfig
from mxdit.quant.base import QuantConfig

__all__ = ["WanTransformer3DModel", "WanTransformerOutput", "KEEP_IN_FP32_MODULES", "timestep_embedding"]

#: Module names whose parameters stay in float32 (diffusers' ``_keep_in_fp32_modules``).
KEEP_IN_FP32_MODULES: tuple[str, ...] = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

Device = Optional[torch.device | str]


@dataclass
class WanTransformerOutput:
    """Output of :meth:`WanTransformer3DModel.forward` (like diffusers' ``Transformer2DModelOutput``)."""

    sample: torch.Tensor

    def __getitem__(self, index: int | str) -> torch.Tensor:
        if index in (0, "sample"):
            return self.sample
        raise IndexError(f"WanTransformerOutput has only 'sample' (index 0), got {index!r}")

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.sample,)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` in float32, ``cos`` half first (diffusers ``Timesteps``
    with ``flip_sin_to_cos=True, downscale_freq_shift=0``)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _Factory:
    """Carries quant_config / dtype / device and hands each layer its prefix and dtype."""

    def __init__(self, quant_config: Optional[QuantConfig], params_dtype: torch.dtype, device: Device):
        self.quant_config = quant_config
        self.params_dtype = params_dtype
        self.device = device

    def dtype_for(self, prefix: str) -> torch.dtype:
        if any(part in KEEP_IN_FP32_MODULES for part in prefix.split(".")):
            return torch.float32
        return self.params_dtype

    def linear(self, in_features: int, out_features: int, prefix: str, bias: bool = True) -> QuantLinear:
        return QuantLinear(in_features, out_features, bias=bias, quant_config=self.quant_config, prefix=prefix,
                           params_dtype=self.dtype_for(prefix), device=self.device)

    def layer_norm(self, dim: int, eps: float, prefix: str, elementwise_affine: bool) -> FP32LayerNorm:
        return FP32LayerNorm(dim, eps, elementwise_affine, dtype=self.dtype_for(prefix), device=self.device)

    def rms_norm(self, dim: int, eps: float, prefix: str) -> RMSNorm:
        return RMSNorm(dim, eps, dtype=self.dtype_for(prefix), device=self.device)

    def parameter(self, shape: tuple[int, ...], prefix: str) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, dtype=self.dtype_for(prefix), device=self.device),
                            requires_grad=False)


# ------------------------------------------------------------------------------ layers
class WanAttention(nn.Module):
    """Self- or cross-attention with RMS qk-norm over all heads.

    Parameters: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``norm_q``, ``norm_k``;
    with ``added_kv_proj_dim`` (Wan2.1 I2V image context) also ``add_k_proj``,
    ``add_v_proj``, ``norm_added_k``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, *, prefix: str, factory: _Factory,
                 added_kv_proj_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = factory.linear(dim, inner, f"{prefix}.to_q")
        self.to_k = factory.linear(dim, inner, f"{prefix}.to_k")
        self.to_v = factory.linear(dim, inner, f"{prefix}.to_v")
        # A list so the parameter is named ``to_out.0`` as in diffusers (whose [1] is a Dropout).
        self.to_out = nn.ModuleList([factory.linear(inner, dim, f"{prefix}.to_out.0")])
        self.norm_q = factory.rms_norm(inner, eps, f"{prefix}.norm_q")
        self.norm_k = factory.rms_norm(inner, eps, f"{prefix}.norm_k")
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = factory.linear(added_kv_proj_dim, inner, f"{prefix}.add_k_proj")
            self.add_v_proj = factory.linear(added_kv_proj_dim, inner, f"{prefix}.add_v_proj")
            self.norm_added_k = factory.rms_norm(inner, eps, f"{prefix}.norm_added_k")
        # quantized self-attention (mxdit.layers.attention): the mode, and a checkpoint's offline rotations
        self.attention_quantization: Optional[str] = None
        self.register_buffer("q_rot", None)
        self.register_buffer("k_rot", None)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self._heads(self.norm_q(self.to_q(hidden_states)))
        key = self._heads(self.norm_k(self.to_k(context)))
        value = self._heads(self.to_v(context))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        # self-attention runs Ulysses sequence parallel when a layout is active (mxdit.distributed);
        # cross-attention stays local: every rank holds the whole text K/V
        self_attention = encoder_hidden_states is None
        attend = mxdist.ulysses(attention) if self_attention else attention
        out = attend(query, key, value, backend=self.attention_quantization, self_attention=self_attention,
                     q_rot=self.q_rot, k_rot=self.k_rot).flatten(2, 3).type_as(query)
        if encoder_hidden_states_image is not None:
            if self.add_k_proj is None:
                raise ValueError("image context given to an attention layer without add_k_proj/add_v_proj "
                                 "(config.added_kv_proj_dim is None)")
            key_img = self._heads(self.norm_added_k(self.add_k_proj(encoder_hidden_states_image)))
            value_img = self._heads(self.add_v_proj(encoder_hidden_states_image))
            out_img = attention(query, key_img, value_img).flatten(2, 3).type_as(query)
            out = out + out_img
        return self.to_out[0](out)


class _GeluProj(nn.Module):
    """``gelu(proj(x))`` (diffusers ``GELU``, parameter name ``proj``)."""

    def __init__(self, proj: QuantLinear, approximate: str):
        super().__init__()
        self.proj = proj
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class WanFeedForward(nn.Module):
    """``net.2(gelu(net.0.proj(x)))`` with diffusers' ``FeedForward`` names (``net.1`` is a no-op)."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int, *, prefix: str, factory: _Factory,
                 approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList([
            _GeluProj(factory.linear(dim, inner_dim, f"{prefix}.net.0.proj"), approximate),
            nn.Identity(),  # diffusers' Dropout(p=0)
            factory.linear(inner_dim, dim_out, f"{prefix}.net.2"),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class WanTransformerBlock(nn.Module):
    """AdaLN-modulated self-attention, cross-attention and GELU(tanh) FFN."""

    def __init__(self, config: WanTransformerConfig, *, prefix: str, factory: _Factory):
        super().__init__()
        dim, eps = config.inner_dim, config.eps
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.norm1 = factory.layer_norm(dim, eps, f"{prefix}.norm1", elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, head_dim, eps, prefix=f"{prefix}.attn1", factory=factory)
        self.attn2 = WanAttention(dim, heads, head_dim, eps, prefix=f"{prefix}.attn2", factory=factory,
                                  added_kv_proj_dim=config.added_kv_proj_dim)
        self.norm2 = (factory.layer_norm(dim, eps, f"{prefix}.norm2", elementwise_affine=True)
                      if config.cross_attn_norm else nn.Identity())
        self.ffn = WanFeedForward(dim, config.ffn_dim, dim, prefix=f"{prefix}.ffn", factory=factory)
        self.norm3 = factory.layer_norm(dim, eps, f"{prefix}.norm3", elementwise_affine=False)
        self.scale_shift_table = factory.parameter((1, 6, dim), f"{prefix}.scale_shift_table")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if temb.ndim == 4:  # [B, L, 6, D]: per-token timesteps (Wan2.2 TI2V)
            mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(dim=2)
        else:  # [B, 6, D]
            mod = (self.scale_shift_table + temb.float()).unsqueeze(2).unbind(dim=1)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mod

        # 1. self-attention (modulation and residual in float32)
        norm_hs = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_out = self.attn1(norm_hs, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_out * gate_msa).type_as(hidden_states)

        # 2. cross-attention
        norm_hs = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_out = self.attn2(norm_hs, encoder_hidden_states, None, encoder_hidden_states_image)
        hidden_states = hidden_states + attn_out

        # 3. feed-forward
        norm_hs = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
        ff_out = self.ffn(norm_hs)
        return (hidden_states.float() + ff_out.float() * c_gate_msa).type_as(hidden_states)


class _TimestepEmbedder(nn.Module):
    """``linear_2(silu(linear_1(t_freq)))`` (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, dim: int, *, prefix: str, factory: _Factory):
        super().__init__()
        self.linear_1 = factory.linear(in_dim, dim, f"{prefix}.linear_1")
        self.linear_2 = factory.linear(dim, dim, f"{prefix}.linear_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TextEmbedder(nn.Module):
    """``linear_2(gelu_tanh(linear_1(text)))`` (diffusers ``PixArtAlphaTextProjection``)."""

    def __init__(self, in_dim: int, dim: int, *, prefix: str, factory: _Factory):
        super().__init__()
        self.linear_1 = factory.linear(in_dim, dim, f"{prefix}.linear_1")
        self.linear_2 = factory.linear(dim, dim, f"{prefix}.linear_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class WanImageEmbedding(nn.Module):
    """Wan2.1 CLIP-feature projection: LayerNorm, GELU MLP, LayerNorm (+ FLF2V position embedding)."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: Optional[int], *, prefix: str,
                 factory: _Factory):
        super().__init__()
        self.norm1 = factory.layer_norm(in_dim, 1e-5, f"{prefix}.norm1", elementwise_affine=True)
        self.ff = WanFeedForward(in_dim, in_dim, dim, prefix=f"{prefix}.ff", factory=factory, approximate="none")
        self.norm2 = factory.layer_norm(dim, 1e-5, f"{prefix}.norm2", elementwise_affine=True)
        self.pos_embed = (factory.parameter((1, pos_embed_seq_len, in_dim), f"{prefix}.pos_embed")
                          if pos_embed_seq_len is not None else None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            b, n, c = image.shape
            image = image.view(-1, 2 * n, c) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep embedding, its 6-way modulation projection, text (and image) projections."""

    def __init__(self, config: WanTransformerConfig, *, prefix: str, factory: _Factory):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = _TimestepEmbedder(config.freq_dim, dim, prefix=f"{prefix}.time_embedder",
                                               factory=factory)
        self.time_proj = factory.linear(dim, 6 * dim, f"{prefix}.time_proj")
        self.text_embedder = _TextEmbedder(config.text_dim, dim, prefix=f"{prefix}.text_embedder", factory=factory)
        self.image_embedder = (
            WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len,
                              prefix=f"{prefix}.image_embedder", factory=factory)
            if config.image_dim is not None else None
        )

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        timestep_seq_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        t_freq = timestep_embedding(timestep, self.freq_dim)
        if timestep_seq_len is not None:
            t_freq = t_freq.unflatten(0, (-1, timestep_seq_len))
        t_freq = t_freq.to(self.time_embedder.linear_1.params_dtype)
        temb = self.time_embedder(t_freq).type_as(encoder_hidden_states)
        timestep_proj = self.time_proj(F.silu(temb))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            if self.image_embedder is None:
                raise ValueError("encoder_hidden_states_image was given but the model has no image embedder "
                                 "(config.image_dim is None; Wan2.2 I2V conditions through in_channels instead)")
            encoder_hidden_states_image = self.image_embedder(encoder_hidden_states_image)
        return temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image


# ------------------------------------------------------------------------------ model
class WanTransformer3DModel(nn.Module):
    """Wan2.x diffusion transformer (see the module docstring).

    Args:
        config: the architecture (:class:`WanTransformerConfig`; a dict is accepted
            and read with ``WanTransformerConfig.from_dict``).
        quant_config: decides each linear's method via ``get_quant_method(layer, prefix)``;
            None keeps every linear unquantized.
        params_dtype: dtype of parameters outside ``_keep_in_fp32_modules``
            (default: torch's default dtype).
        device: where parameters are created; ``"meta"`` allocates nothing.

    Parameters are created uninitialised (``torch.empty``), except LayerNorm/RMSNorm
    weights (ones/zeros); load a checkpoint, or call :meth:`init_random_weights_` for tests.
    """

    _keep_in_fp32_modules = list(KEEP_IN_FP32_MODULES)
    _no_split_modules = ["WanTransformerBlock"]
    #: forward follows the active mxdit.distributed layout (Ulysses SP); the pipeline checks this
    supports_sequence_parallel = True

    def __init__(
        self,
        config: WanTransformerConfig | dict,
        quant_config: Optional[QuantConfig] = None,
        params_dtype: Optional[torch.dtype] = None,
        device: Device = None,
    ):
        super().__init__()
        if isinstance(config, dict):
            config = WanTransformerConfig.from_dict(config)
        if not isinstance(config, WanTransformerConfig):
            raise TypeError(f"config must be a WanTransformerConfig or dict, got {type(config).__name__}")
        self.config = config
        self.quant_config = quant_config
        self.params_dtype = params_dtype or torch.get_default_dtype()
        factory = _Factory(quant_config, self.params_dtype, device)
        dim = config.inner_dim

        self.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size, device=device,
                                         dtype=factory.dtype_for("patch_embedding"))
        self.condition_embedder = WanTimeTextImageEmbedding(config, prefix="condition_embedder", factory=factory)
        self.blocks = nn.ModuleList(
            [WanTransformerBlock(config, prefix=f"blocks.{i}", factory=factory) for i in range(config.num_layers)]
        )
        self.norm_out = factory.layer_norm(dim, config.eps, "norm_out", elementwise_affine=False)
        self.proj_out = factory.linear(dim, config.out_dim * config.patch_volume, "proj_out")
        self.scale_shift_table = factory.parameter((1, 2, dim), "scale_shift_table")
        self.attention_quantization: Optional[str] = None  # see set_attention_quantization
        self.requires_grad_(False)  # inference only

    # -------------------------------------------------------------------------- helpers
    def quant_linears(self) -> Iterator[tuple[str, QuantLinear]]:
        """Every linear layer as ``(name, module)``; ``name`` equals the layer's ``prefix``."""
        for name, module in self.named_modules():
            if isinstance(module, QuantLinear):
                yield name, module

    @torch.no_grad()
    def set_attention_quantization(self, mode: Optional[str]) -> "WanTransformer3DModel":
        """Quantize every block's self-attention (``attn1``) with ``mode`` (a name of
        :data:`mxdit.layers.attention.QUANTIZED_ATTENTION_MODES`), or None for BF16.
        Cross-attention (``attn2``) is never quantized."""
        from mxdit.layers.attention import QUANTIZED_ATTENTION_MODES

        if mode is not None and mode not in QUANTIZED_ATTENTION_MODES:
            raise ValueError(f"unknown attention quantization {mode!r}; valid: {sorted(QUANTIZED_ATTENTION_MODES)}")
        for block in self.blocks:
            block.attn1.attention_quantization = mode
        self.attention_quantization = mode
        return self

    def init_random_weights_(self, std: float = 0.02, seed: int = 0) -> "WanTransformer3DModel":
        """Fill every floating parameter with ``N(0, std)`` (norm weights ``1 + N(0, std)``); for tests."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if not p.is_floating_point() or p.is_meta:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            parts = name.split(".")
            if len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight":
                noise += 1.0
            p.copy_(noise)
        return self

    # -------------------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        attention_kwargs: Optional[dict[str, Any]] = None,
    ) -> WanTransformerOutput | tuple[torch.Tensor]:
        """Predict the flow (velocity) for a noisy latent.

        Args:
            hidden_states: latent ``[B, C_in, F, H, W]``; F, H, W divisible by ``patch_size``.
            timestep: ``[B]``, or ``[B, L]`` per-token timesteps (Wan2.2 TI2V,
                ``L = (F/p_t)*(H/p_h)*(W/p_w)`` tokens).
            encoder_hidden_states: text embeddings ``[B, L_text, text_dim]``.
            encoder_hidden_states_image: Wan2.1 CLIP image features ``[B, 257, image_dim]``
                (needs ``config.image_dim``); None for Wan2.2.
            return_dict: return :class:`WanTransformerOutput` (else a 1-tuple).
            attention_kwargs: accepted for diffusers compatibility; must be empty
                (LoRA scaling is not supported).

        Returns:
            ``sample`` ``[B, C_out, F, H, W]`` in the dtype of the patch embedding.
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs are not supported (got keys {sorted(attention_kwargs)})")
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, {cfg.in_channels}, F, H, W], got {tuple(hidden_states.shape)}")
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = cfg.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"latent (F, H, W)=({num_frames}, {height}, {width}) is not divisible by "
                             f"patch_size {cfg.patch_size}")
        grid = (num_frames // p_t, height // p_h, width // p_w)
        seq_len = grid[0] * grid[1] * grid[2]

        rotary_emb = self.rope.tables(grid, hidden_states.device)

        hidden_states = hidden_states.to(self.patch_embedding.weight.dtype)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        if timestep.ndim == 2:  # [B, L] per-token timesteps
            if timestep.shape != (batch_size, seq_len):
                raise ValueError(f"per-token timestep must be [B, L] = [{batch_size}, {seq_len}], "
                                 f"got {tuple(timestep.shape)}")
            ts_seq_len: Optional[int] = seq_len
            timestep = timestep.flatten()
        elif timestep.ndim == 1:
            if timestep.shape[0] != batch_size:
                raise ValueError(f"timestep must be [B] = [{batch_size}] or [B, L], got {tuple(timestep.shape)}")
            ts_seq_len = None
        else:
            raise ValueError(f"timestep must be [B] or [B, L], got {tuple(timestep.shape)}")

        temb, timestep_proj, encoder_hidden_states, image_context = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        # [B, 6, D], or [B, L, 6, D] for per-token timesteps
        timestep_proj = timestep_proj.unflatten(-1, (6, -1))

        # sequence parallel: this rank's tokens; RoPE and per-token modulation were built on the full grid
        if mxdist.sequence_parallel_active():
            hidden_states = mxdist.shard_tokens(hidden_states, dim=1)
            rotary_emb = tuple(mxdist.shard_tokens(t, dim=1) for t in rotary_emb)
            if timestep_proj.ndim == 4:
                timestep_proj = mxdist.shard_tokens(timestep_proj, dim=1)

        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, image_context)

        hidden_states = mxdist.gather_tokens(hidden_states, dim=1)  # the output head sees every token

        # output modulation: temb [B, D] or [B, L, D]
        shift, scale = (self.scale_shift_table.squeeze(0) + temb.unsqueeze(-2)).unbind(dim=-2)
        if temb.ndim == 2:
            shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        # unpatchify: [B, F', H', W', p_t, p_h, p_w, C] -> [B, C, F, H, W]
        hidden_states = hidden_states.reshape(batch_size, *grid, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return WanTransformerOutput(sample=output)
