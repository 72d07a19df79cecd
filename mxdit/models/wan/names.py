"""The one name map between original Wan (``WanModel``) and diffusers parameter names.

:data:`RENAME_TABLE` pairs an original module path with its diffusers path
(``{i}`` stands for a block index).  Both directions use the same table: a name
is renamed by the single rule whose path is a whole-component prefix of it
(``blocks.3.self_attn.q`` matches ``blocks.3.self_attn.q.weight`` and
``blocks.3.self_attn.q.weight_scale`` but never ``blocks.3.self_attn.qq``), so
the map is exact in both directions, unlike diffusers' sequential ``str.replace``
table (where ``scale_shift_table`` cannot be told apart when inverting).

Names no rule matches (``patch_embedding.*``) are the same in both layouts.

Not here: checkpoint-tool wrappers such as msmodelslim's ``.linear.`` / ``.div.``
(SGLang's repack strips them) belong to the checkpoint-format readers.

Example::

    >>> original_to_diffusers("blocks.0.norm3.weight")      # cross-attn norm
    'blocks.0.norm2.weight'
    >>> diffusers_to_original("scale_shift_table")
    'head.modulation'
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, TypeVar

V = TypeVar("V")

#: (original path, diffusers path).  ``{i}`` is a block index.
RENAME_TABLE: tuple[tuple[str, str], ...] = (
    # condition embedders
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    # Wan2.1 CLIP image branch (I2V / FLF2V)
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    # output head
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("head.norm", "norm_out"),  # no parameters (LayerNorm without affine)
    # blocks
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
    ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
    # msmodelslim W8A8F8 / W4A4F8: the offline q/k rotations (buffers) and the FA quant label
    # (a description key, no tensor).  Whole-component rules: never ``attn1.to_q_rot`` (SGLang's repack).
    ("blocks.{i}.self_attn.q_rot", "blocks.{i}.attn1.q_rot"),
    ("blocks.{i}.self_attn.k_rot", "blocks.{i}.attn1.k_rot"),
    ("blocks.{i}.self_attn.quant_type", "blocks.{i}.attn1.quant_type"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
    ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
    ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
    ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
    ("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    # The original block order is norm1 (self-attn), norm3 (cross-attn, affine), norm2 (FFN);
    # diffusers numbers them in execution order.  Only the cross-attn norm has parameters.
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.norm2", "blocks.{i}.norm3"),
)

#: Prefixes that wrap a Wan state dict in other tools (ComfyUI single files).
KNOWN_PREFIXES: tuple[str, ...] = ("model.diffusion_model.",)

#: Original names of the block linears (the layers MX methods quantize), per block.
LINEAR_SUFFIXES_ORIGINAL: tuple[str, ...] = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
#: The same layers in diffusers names, in the same order.
LINEAR_SUFFIXES_DIFFUSERS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)


def _compile(template: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in template.split("{i}")]
    return re.compile("^" + r"(\d+)".join(parts) + r"(?=\.|$)")


def _fill(template: str, match: re.Match[str]) -> str:
    return template.replace("{i}", match.group(1)) if "{i}" in template else template


_FORWARD = [(_compile(o), d) for o, d in RENAME_TABLE]
_BACKWARD = [(_compile(d), o) for o, d in RENAME_TABLE]


def _check_table() -> None:
    for side in (0, 1):
        templates = [row[side] for row in RENAME_TABLE]
        if len(set(templates)) != len(templates):
            raise AssertionError(f"duplicate path in RENAME_TABLE column {side}")
        probes = [t.replace("{i}", "0") for t in templates]
        for j, probe in enumerate(probes):
            hits = [k for k, t in enumerate(templates) if _compile(t).match(probe)]
            if hits != [j]:
                raise AssertionError(f"RENAME_TABLE path {templates[j]!r} is ambiguous with {[templates[k] for k in hits]}")


_check_table()


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, target in rules:
        m = pattern.match(name)
        if m is not None:
            return _fill(target, m) + name[m.end():]
    return name


def original_to_diffusers(name: str) -> str:
    """Rename one original Wan parameter/module name to diffusers' name."""
    return _rename(name, _FORWARD)


def diffusers_to_original(name: str) -> str:
    """Rename one diffusers parameter/module name to original Wan's name (exact inverse)."""
    return _rename(name, _BACKWARD)


def strip_prefix(name: str, prefixes: Iterable[str] = KNOWN_PREFIXES) -> str:
    """Drop a known wrapper prefix (ComfyUI's ``model.diffusion_model.``) from ``name``."""
    for p in prefixes:
        if name.startswith(p):
            return name[len(p):]
    return name


# Paths that exist in one layout only; the norm2/norm3 swap (both layouts) is excluded.
_ORIGINAL_ONLY = [_compile(o) for o, d in RENAME_TABLE if o not in {dd for _, dd in RENAME_TABLE}]
_DIFFUSERS_ONLY = [_compile(d) for o, d in RENAME_TABLE if d not in {oo for oo, _ in RENAME_TABLE}]


def is_original_layout(keys: Iterable[str]) -> bool:
    """True if ``keys`` use original Wan names, False for diffusers names.

    Known wrapper prefixes are stripped first.  Keys that exist in both layouts
    (``patch_embedding.*``) say nothing; if no key decides, the answer is False
    (such keys need no renaming).  Raises ``ValueError`` if both layouts occur.
    """
    original = diffusers = None
    for key in keys:
        key = strip_prefix(key)
        if original is None and any(p.match(key) for p in _ORIGINAL_ONLY):
            original = key
        if diffusers is None and any(p.match(key) for p in _DIFFUSERS_ONLY):
            diffusers = key
        if original is not None and diffusers is not None:
            raise ValueError(
                f"state dict mixes original Wan names (e.g. '{original}') with diffusers names (e.g. '{diffusers}')"
            )
    return original is not None


def rename_state_dict(state_dict: Mapping[str, V], rename: Callable[[str], str]) -> dict[str, V]:
    """Apply ``rename`` to every key (after :func:`strip_prefix`); raise if two keys collide."""
    out: dict[str, V] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        new = rename(strip_prefix(key))
        if new in out:
            raise ValueError(f"keys '{source[new]}' and '{key}' both map to '{new}'")
        out[new] = value
        source[new] = key
    return out


def to_diffusers_state_dict(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Return ``state_dict`` with diffusers names, whichever layout it came in."""
    if is_original_layout(state_dict.keys()):
        return rename_state_dict(state_dict, original_to_diffusers)
    return rename_state_dict(state_dict, lambda k: k)
