"""Tiny, randomly initialised Wan2.2 model directories for the demo and the tests.

:func:`build_tiny_wan_model_dir` writes a complete diffusers-layout model
directory (``model_index.json``, ``transformer/``, ``transformer_2/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) with the
*architecture shape* of a real Wan2.2 release but tiny sizes, so the whole
generation path (tokenizer -> UMT5 -> two-expert DiT -> UniPC -> VAE) runs in
seconds on a CPU.  Nothing is downloaded: the tokenizer is built in code.

Sizes are chosen for the quantized layers: every linear inside a transformer
block has ``in_features`` (K) a multiple of 512 (dim 512 = 4 heads x 128,
ffn_dim 1024), as dual-level MXFP4 needs; ``proj_out`` has K = 512 too.

:func:`ensure_tiny_wan_model_dir` caches a build: it builds into a temporary
sibling directory and renames it into place, so a cache directory is either
complete or absent, never half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

#: bump when the recipe changes; a cached directory with another version is rebuilt
TINY_RECIPE_VERSION = 2
_MARKER = "mxdit_tiny_model.json"

#: kind -> (pipeline class, transformer in/out channels, vae, boundary_ratio, expand_timesteps, flow_shift)
TINY_KINDS = {
    # Wan2.2-T2V-A14B shape: two experts, Wan2.1 VAE (z16, stride 4x8x8)
    "t2v-a14b": dict(pipeline="WanPipeline", in_channels=16, out_channels=16, vae="wan2.1",
                     boundary_ratio=0.875, expand_timesteps=False, flow_shift=3.0),
    # Wan2.2-I2V-A14B shape: 36 input channels (16 noise + 4 mask + 16 image latent), no CLIP
    "i2v-a14b": dict(pipeline="WanImageToVideoPipeline", in_channels=36, out_channels=16, vae="wan2.1",
                     boundary_ratio=0.9, expand_timesteps=False, flow_shift=3.0),
    # Wan2.2-TI2V-5B shape: one dense model, Wan2.2 VAE (z48, stride 4x16x16), per-token timesteps
    "ti2v-5b": dict(pipeline="WanPipeline", in_channels=48, out_channels=48, vae="wan2.2",
                    boundary_ratio=None, expand_timesteps=True, flow_shift=5.0),
}

TINY_DIM = 512          # 4 heads x 128
TINY_HEADS = 4
TINY_FFN = 1024
TINY_LAYERS = 2
TINY_TEXT_DIM = 512     # UMT5 d_model == transformer text_dim


def build_tiny_tokenizer():
    """A T5-style (Metaspace + Unigram) tokenizer over printable ASCII, built in code."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def _tiny_vae(kind: str):
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(1234)
    if kind == "wan2.1":
        z = 16
        vae = AutoencoderKLWan(
            base_dim=16, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True],
        )
    else:  # Wan2.2 VAE: z48, patchify 2, residual, stride 16
        z = 48
        vae = AutoencoderKLWan(
            base_dim=16, decoder_base_dim=24, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
            latents_mean=(torch.randn(z, generator=g) * 0.2).tolist(),
            latents_std=(1.0 + torch.rand(z, generator=g)).tolist(),
        )
    return vae


def _tiny_transformer(in_channels: int, out_channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=TINY_HEADS, attention_head_dim=TINY_DIM // TINY_HEADS,
        in_channels=in_channels, out_channels=out_channels, text_dim=TINY_TEXT_DIM, freq_dim=256,
        ffn_dim=TINY_FFN, num_layers=TINY_LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    )
    # Default init leaves the output head tiny; give it a velocity of O(1) so the
    # sampler actually moves the latents and the quantization error is visible.
    with torch.no_grad():
        model.proj_out.weight.mul_(4.0)
    return model


def _tiny_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(7)
    cfg = UMT5Config(
        vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=32, d_ff=512, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


def build_tiny_wan_model_dir(path: str | os.PathLike, kind: str = "t2v-a14b", *, seed: int = 0) -> Path:
    """Write a tiny random Wan2.2 model directory of ``kind`` at ``path`` (must not exist).

    ``kind`` is one of ``"t2v-a14b"``, ``"i2v-a14b"``, ``"ti2v-5b"``.  The directory is
    written by diffusers' own ``save_pretrained`` so its layout is exactly the one of
    the ``Wan-AI/Wan2.2-*-Diffusers`` repositories.
    """
    import diffusers
    from diffusers import UniPCMultistepScheduler

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {sorted(TINY_KINDS)}")
    spec = TINY_KINDS[kind]
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")

    tokenizer = build_tiny_tokenizer()
    text_encoder = _tiny_text_encoder(len(tokenizer))
    vae = _tiny_vae(spec["vae"])
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=spec["flow_shift"],
    )
    transformer = _tiny_transformer(spec["in_channels"], spec["out_channels"], seed=seed + 100)
    transformer_2 = None
    if spec["boundary_ratio"] is not None:
        transformer_2 = _tiny_transformer(spec["in_channels"], spec["out_channels"], seed=seed + 200)

    pipe_cls = getattr(diffusers, spec["pipeline"])
    kwargs = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=spec["boundary_ratio"], expand_timesteps=spec["expand_timesteps"],
    )
    if spec["pipeline"] == "WanImageToVideoPipeline":
        kwargs.update(image_encoder=None, image_processor=None)
    pipe = pipe_cls(**kwargs)
    pipe.save_pretrained(str(path), safe_serialization=True)
    (path / _MARKER).write_text(
        json.dumps({"recipe_version": TINY_RECIPE_VERSION, "kind": kind, "seed": seed}, indent=2) + "\n"
    )
    return path


def is_tiny_model_dir(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True when ``path`` holds a complete tiny model of the current recipe (and ``kind``)."""
    marker = Path(path) / _MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("recipe_version") == TINY_RECIPE_VERSION and (kind is None or meta.get("kind") == kind)


def ensure_tiny_wan_model_dir(path: str | os.PathLike, kind: str = "t2v-a14b", *, seed: int = 0) -> tuple[Path, bool]:
    """Return ``(path, built)``: build the tiny model at ``path`` unless a current one is there.

    The build goes into a temporary directory next to ``path`` that is renamed into
    place when complete, so an interrupted build never leaves a partial cache.  A stale
    cache (older recipe) is replaced.
    """
    path = Path(path).expanduser()
    if is_tiny_model_dir(path, kind):
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=str(path.parent)))
    try:
        build_tiny_wan_model_dir(tmp / "model", kind, seed=seed)
        if path.exists():  # stale recipe or foreign content: move it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=str(path.parent)))
            os.replace(path, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp / "model", path)
        except OSError:
            # another process won the race with a complete build: use theirs
            if not is_tiny_model_dir(path, kind):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, True
