"""Planning for ``mxdit quantize`` (:mod:`mxdit.tools.quantize`): resolving ``--model-path`` into the
transformers to export, parsing ``--weight-rule``, and checking each BF16 checkpoint against its config
while assigning every linear layer its scheme (recipe, K multiple from the scheme record) -- all before
anything is read in bulk or written."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mxdit.quant.offline_rules import DEFAULT_RULES, FORMAT_RULES, RULES, SCHEME_FORMAT, SCHEME_K_MULTIPLE
from mxdit.tools.recipes import AttentionPlan, Recipe, RecipeError, canonical_scheme
from mxdit.tools.repack import EXPERT_SUBDIRS


class QuantizeError(ValueError):
    """A bad input found before anything is written (the CLI prints it on one line, exit 2)."""


@dataclass
class LayerPlan:
    model_name: str  # diffusers module name (the model's prefix)
    orig_name: str
    scheme: str
    rule: str
    in_features: int
    out_features: int


@dataclass
class ExpertPlan:
    key: str  # "transformer", "transformer_2", "high_noise_model", ... or "" (single transformer dir)
    src_dir: str
    out_rel: str
    ckpt: Any  # TransformerCheckpoint
    params: list[tuple[str, tuple[int, ...]]]  # model parameter names in model order (and shapes)
    layers: dict[str, LayerPlan]  # model_name -> plan (quantized layers only)
    linear_count: int
    #: recipe attention directives (W8A8F8 / W4A4F8): per blocks.N.self_attn; None without directives
    attention: Optional[AttentionPlan] = None
    head_dim: int = 0

    @property
    def title(self) -> str:
        return self.key or os.path.basename(os.path.normpath(self.src_dir))


def resolve_inputs(model_path: str, layout: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(kind, [(key, src_dir, out_rel)]) for a transformer dir, a model dir or an original A14B dir."""
    if not os.path.exists(model_path):
        raise QuantizeError(f"--model-path '{model_path}' does not exist")
    if not os.path.isdir(model_path):
        raise QuantizeError(f"--model-path '{model_path}' is not a directory")
    index = os.path.join(model_path, "model_index.json")
    if os.path.isfile(index):
        from mxdit.models.wan.config import read_config_json

        mi = read_config_json(index, error=QuantizeError)
        keys = [k for k in ("transformer", "transformer_2")
                if isinstance(mi.get(k), (list, tuple)) and len(mi[k]) == 2 and mi[k][0] is not None]
        if "transformer" not in keys:
            raise QuantizeError(f"'{index}' lists no 'transformer' component")
        for k in keys:
            if not os.path.isdir(os.path.join(model_path, k)):
                raise QuantizeError(f"model directory '{model_path}' has no {k}/ subdirectory")
        two = len(keys) == 2
        out = []
        for k in keys:
            rel = k if layout == "diffusers" else (EXPERT_SUBDIRS[k] if two else "")
            out.append((k, os.path.join(model_path, k), rel))
        return "model_dir", out
    subs = list(EXPERT_SUBDIRS.values())
    if all(os.path.isdir(os.path.join(model_path, s)) for s in subs):
        return "original_a14b", [(s, os.path.join(model_path, s), s) for s in subs]
    return "transformer_dir", [("", model_path, "")]


def parse_weight_rules(spec: Optional[str]) -> tuple[dict[str, str], list[str]]:
    rules = dict(DEFAULT_RULES)
    notes: list[str] = []
    if spec is None or spec == "auto":
        return rules, notes
    if "=" not in spec:
        if spec not in RULES:
            raise QuantizeError(f"--weight-rule {spec!r} is not a rule; valid: auto, {', '.join(RULES)}, or SCHEME=RULE,...")
        for scheme in rules:
            if spec in FORMAT_RULES[SCHEME_FORMAT[scheme]]:
                rules[scheme] = spec
            else:
                notes.append(f"--weight-rule {spec} does not apply to {scheme}; it keeps {rules[scheme]}")
        return rules, notes
    for part in spec.split(","):
        if "=" not in part:
            raise QuantizeError(f"--weight-rule: expected SCHEME=RULE, got {part!r}")
        s, r = (p.strip() for p in part.split("=", 1))
        scheme = canonical_scheme(s)
        if scheme is None or scheme == "FLOAT":
            raise QuantizeError(f"--weight-rule: unknown scheme {s!r}; valid: {', '.join(SCHEME_FORMAT)}")
        if r not in FORMAT_RULES[SCHEME_FORMAT[scheme]]:
            raise QuantizeError(
                f"--weight-rule: rule {r!r} does not apply to {scheme}; valid: {', '.join(FORMAT_RULES[SCHEME_FORMAT[scheme]])}"
            )
        rules[scheme] = r
    return rules, notes


def _config_has_quantization(directory: str) -> bool:
    p = os.path.join(directory, "config.json")
    if not os.path.isfile(p):
        return False
    from mxdit.models.wan.config import read_config_json

    try:
        return bool(read_config_json(p).get("quantization_config"))
    except ValueError:
        return False


def plan_expert(key: str, src: str, out_rel: str, recipe: Recipe, rules: dict[str, str],
                 allow_non_block: bool, warnings: list[str]) -> ExpertPlan:
    from mxdit.loader.checkpoint import open_checkpoint
    from mxdit.models.wan.names import diffusers_to_original
    from mxdit.models.wan.transformer import WanTransformer3DModel

    where = f"'{src}'"
    try:
        ckpt = open_checkpoint(src)
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{where}: {e}".replace("\n", " ")) from None
    if ckpt.layout not in ("diffusers", "original"):
        raise QuantizeError(f"{where} is already quantized ({ckpt.layout} layout); --model-path must be a BF16 model")
    if _config_has_quantization(src):
        raise QuantizeError(f"{where}: config.json has a quantization_config; --model-path must be a BF16 model")
    model = WanTransformer3DModel(ckpt.config, device="meta")
    params = dict(model.named_parameters())
    unexpected = sorted(ckpt.names[m] for m in ckpt.names if m not in params)
    missing = sorted(p for p, t in params.items() if p not in ckpt.names and getattr(t, "missing_init", None) is None)
    bad = []
    for p, t in params.items():
        if p in ckpt.names:
            info = ckpt.files.info(ckpt.names[p])
            if tuple(info.shape) != tuple(t.shape):
                bad.append(f"{info.name} {tuple(info.shape)} (expected {tuple(t.shape)})")
            elif not info.dtype.is_floating_point or info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                bad.append(f"{info.name} is {info.dtype} (expected a float16/bfloat16/float32 model)")
    if missing or unexpected or bad:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", bad)):
            if items:
                parts.append(f"{len(items)} {title} tensors ({'; '.join(items[:5])}{' ...' if len(items) > 5 else ''})")
        raise QuantizeError(f"{where} does not hold a Wan transformer of its config: " + ", ".join(parts))

    linears = {name: (m.in_features, m.out_features) for name, m in model.quant_linears()}
    orig = {name: diffusers_to_original(name) for name in linears}
    try:
        assignment = recipe.assign(orig.values(), allow_non_block=allow_non_block,
                                   diffusers_names={o: d for d, o in orig.items()})
    except RecipeError as e:
        raise QuantizeError(f"{e} (model {where})") from None
    warnings.extend(f"{w} (model {where})" for w in assignment.warnings)
    layers: dict[str, LayerPlan] = {}
    bad_k = []
    for name, (k, n) in linears.items():
        scheme = assignment.schemes[orig[name]]
        if scheme == "FLOAT":
            continue
        mult = SCHEME_K_MULTIPLE[scheme]
        if k % mult:
            bad_k.append(f"{orig[name]} (K={k})")
            continue
        layers[name] = LayerPlan(name, orig[name], scheme, rules[scheme], k, n)
    if bad_k:
        schemes = sorted({assignment.schemes[o.split(' ')[0]] for o in bad_k})
        mults = ", ".join(f"{s} needs K % {SCHEME_K_MULTIPLE[s]} == 0" for s in schemes)
        raise QuantizeError(
            f"recipe {recipe.name}: in_features (K) does not fit the scheme for {len(bad_k)} layer(s): "
            f"{', '.join(bad_k[:6])}{' ...' if len(bad_k) > 6 else ''} ({mults}); map them to another scheme or FLOAT"
        )
    plist = [(p, tuple(t.shape)) for p, t in params.items() if p in ckpt.names]
    attention = None
    if recipe.attn_rules:
        attn_mods = [f"blocks.{i}.{a}" for i in range(ckpt.config.num_layers) for a in ("self_attn", "cross_attn")]
        try:
            attention = recipe.attention_plan(attn_mods)
        except RecipeError as e:
            raise QuantizeError(f"{e} (model {where})") from None
        if any(attention.rotation.values()):
            hd = ckpt.config.attention_head_dim
            if hd <= 0 or hd & (hd - 1):
                raise QuantizeError(f"recipe {recipe.name}: the Hadamard rotation needs a power-of-two head_dim, "
                                    f"model {where} has {hd}")
    return ExpertPlan(key, src, out_rel, ckpt, plist, layers, len(linears), attention,
                      ckpt.config.attention_head_dim)
