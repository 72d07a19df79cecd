"""Quantization recipes for ``mxdit quantize``: which scheme each linear layer gets.

File format (plain text, no YAML)::

    # comments start with '#'; blank lines are ignored
    # one rule per line:  PATTERN  SCHEME
    blocks.[0-4].*   W8A8_MXFP8
    blocks.*         W4A4_MXFP4

* PATTERN is a shell-style glob (:mod:`fnmatch`, case-sensitive) matched
  against the layer's **original Wan module name** -- the names msmodelslim
  writes: ``blocks.7.self_attn.q``, ``blocks.7.cross_attn.o``,
  ``blocks.7.ffn.0``, ``blocks.7.ffn.2``, ``head.head``,
  ``text_embedding.0``, ``time_embedding.2``, ``time_projection.1``.  ``[0-4]``
  is a single-character class, so ``blocks.[0-4].*`` is blocks 0 to 4 (and not
  10 to 49); write one rule per range beyond that (``blocks.1[0-9].*``).
* SCHEME is the msmodelslim label of a scheme ``mxdit quantize`` writes
  (:data:`mxdit.quant.schemes.EXPORTABLE`: ``W8A8_MXFP8``, ``W4A4_MXFP4``,
  ``W4A4_MXFP4_DUALSCALE``, ``W4A4_DYNAMIC``) or ``FLOAT`` (case-insensitive;
  the records' aliases ``mxfp8``, ``mxfp4``, ``mxfp4_dual``, ``int4``, and ``float``/``bf16``).
* The first rule that matches a layer wins; a layer no rule matches stays
  FLOAT.
* Attention (msmodelslim's W8A8F8 / W4A4F8 exports), on original attention
  module names (``blocks.7.self_attn``), first match wins, self-attention only
  (cross-attention stays BF16, as in SGLang and MindIE-SD)::

      rotation   blocks.*.self_attn  HADAMARD       # write <attn>.q_rot / <attn>.k_rot (FLOAT)
      attention  blocks.0.self_attn  FLOAT          # no FA3 quantization here
      attention  blocks.*.self_attn  FP8_DYNAMIC    # write <attn>.quant_type = "FP8_DYNAMIC"

  The rotation is msmodelslim's ``online_quarot``: a random Hadamard
  (:func:`mxdit.formats.rotation.random_hadamard`, size head_dim, seed 1234
  shared by q and k, bf16), applied to q and k at run time; nothing is folded
  into the q / k weights (msmodelslim's ``OnlineRotationWrapper`` saves the
  matrix as is, ``mindie_format.py on_online_rotation_wrapper``).

Checks (each a :class:`RecipeError`, i.e. a one-line CLI error, exit 2):

* an unknown scheme or a malformed line (named with its line number);
* a recipe that quantizes no layer of the model ("names no layer"); a single
  rule that matches nothing is only a warning (``blocks.[0-4].*`` shadows
  ``blocks.*`` entirely on a model with <= 5 blocks);
* a rule that would quantize a **non-block** linear (the embedders,
  ``time_projection.1``, ``head.head``): rejected unless ``allow_non_block``
  (``--allow-non-block``), then a warning.  msmodelslim's Wan adapters only
  quantize ``blocks.N`` linears and vllm-omni refuses msmodelslim checkpoints
  that quantize anything else, so a stray ``*`` must not silently produce a
  checkpoint those runtimes reject.  ``FLOAT`` rules may match anything.

Built-in recipes (``--recipe NAME``): see :data:`BUILTIN_RECIPES`;
``msmodelslim-wan2.2`` is the published Wan2.2 W4A4 recipe's layer split
(``lab_practice/wan2_2``: blocks 0-4 MXFP8, the other blocks MXFP4).
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from mxdit.quant.schemes import EXPORTABLE, FLOAT, canonical_label

SCHEMES = (*EXPORTABLE, FLOAT)

BUILTIN_RECIPES: dict[str, str] = {
    # one per exportable scheme record: all-mxfp8, all-mxfp4, all-mxfp4-dual, all-int4
    **{f"all-{s.label_aliases[0].replace('_', '-')}": f"blocks.* {s.label}\n" for s in EXPORTABLE.values()},
    "msmodelslim-wan2.2": "blocks.[0-4].* W8A8_MXFP8\nblocks.* W4A4_MXFP4\n",
    # msmodelslim lab_practice/wan2_2/wan2_2_w8a8f8_mxfp_*.yaml: MXFP8 everywhere, quarot + FP8 FA3 on self-attn
    "msmodelslim-wan2.2-w8a8f8": (
        "blocks.* W8A8_MXFP8\n"
        "rotation blocks.*.self_attn HADAMARD\n"
        "attention blocks.*.self_attn FP8_DYNAMIC\n"
    ),
    # wan2_2_w4a4f8_mxfp_t2v.yaml: MXFP4 except blocks 0-4 (MXFP8); quarot on self-attn; FA3 excludes blocks.0
    "msmodelslim-wan2.2-w4a4f8": (
        "blocks.[0-4].* W8A8_MXFP8\nblocks.* W4A4_MXFP4\n"
        "rotation blocks.*.self_attn HADAMARD\n"
        "attention blocks.0.self_attn FLOAT\n"
        "attention blocks.*.self_attn FP8_DYNAMIC\n"
    ),
}

#: directive -> accepted values (the first is the "off" value)
ATTENTION_DIRECTIVES = {"rotation": ("FLOAT", "HADAMARD"), "attention": ("FLOAT", "FP8_DYNAMIC")}
_SELF_ATTN_RE = re.compile(r"^blocks\.\d+\.self_attn$")

_BLOCK_RE = re.compile(r"^blocks\.\d+\.")


class RecipeError(ValueError):
    """A recipe that cannot be used (the message names the file/line/layer)."""


def canonical_scheme(name: str) -> Optional[str]:
    """A recipe's scheme spelling -> its label (FLOAT included), or None (:func:`canonical_label`)."""
    return canonical_label(name)


def is_block_layer(original_name: str) -> bool:
    return bool(_BLOCK_RE.match(original_name))


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: str
    line: int

    def matches(self, layer: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.pattern)


@dataclass
class Assignment:
    """Result of applying a recipe to a model's linear layers."""

    schemes: dict[str, str]  # original layer name -> scheme (FLOAT included)
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> dict[str, str]:
        return {k: v for k, v in self.schemes.items() if v != "FLOAT"}


@dataclass
class AttentionPlan:
    """Per self-attention module (original name ``blocks.N.self_attn``): what to write."""

    rotation: dict[str, bool]  # write q_rot / k_rot
    quant_type: dict[str, Optional[str]]  # "<attn>.quant_type" value, or None


@dataclass
class Recipe:
    name: str
    rules: list[Rule]
    #: "rotation" / "attention" directives, in file order
    attn_rules: list[tuple[str, Rule]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, name: str = "<recipe>") -> "Recipe":
        rules: list[Rule] = []
        attn_rules: list[tuple[str, Rule]] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) == 3 and parts[0].lower() in ATTENTION_DIRECTIVES:
                kind, pattern, value = parts[0].lower(), parts[1], parts[2].upper()
                if value not in ATTENTION_DIRECTIVES[kind]:
                    raise RecipeError(
                        f"recipe {name} line {lineno}: '{kind}' takes one of {', '.join(ATTENTION_DIRECTIVES[kind])}, "
                        f"got {parts[2]!r}"
                    )
                attn_rules.append((kind, Rule(pattern, value, lineno)))
                continue
            if len(parts) != 2:
                raise RecipeError(
                    f"recipe {name} line {lineno}: expected 'PATTERN SCHEME', got {raw.strip()!r}"
                )
            pattern, scheme_name = parts
            scheme = canonical_scheme(scheme_name)
            if scheme is None:
                raise RecipeError(
                    f"recipe {name} line {lineno}: unknown scheme {scheme_name!r}; valid: {', '.join(SCHEMES)}"
                )
            rules.append(Rule(pattern, scheme, lineno))
        if not rules:
            raise RecipeError(f"recipe {name} has no rules (expected lines 'PATTERN SCHEME')")
        return cls(name, rules, attn_rules)

    @classmethod
    def load(cls, spec: str) -> "Recipe":
        """A built-in name (:data:`BUILTIN_RECIPES`) or a path to a recipe file."""
        if spec in BUILTIN_RECIPES:
            return cls.parse(BUILTIN_RECIPES[spec], name=spec)
        if os.path.isfile(spec):
            try:
                with open(spec, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise RecipeError(f"cannot read recipe file '{spec}': {e}") from None
            return cls.parse(text, name=f"'{spec}'")
        raise RecipeError(
            f"recipe {spec!r} is neither a built-in recipe ({', '.join(BUILTIN_RECIPES)}) nor an existing file"
        )

    def to_text(self) -> str:
        return "".join(f"{r.pattern} {r.scheme}\n" for r in self.rules) + "".join(
            f"{kind} {r.pattern} {r.scheme}\n" for kind, r in self.attn_rules)

    def attention_plan(self, attention_modules: Iterable[str]) -> AttentionPlan:
        """Rotation and FA3 settings for the model's attention modules (original names,
        ``blocks.N.self_attn`` and ``blocks.N.cross_attn``).  A directive that would act on
        a cross-attention module is an error (self-attention only)."""
        mods = list(attention_modules)
        rot: dict[str, bool] = {}
        qt: dict[str, Optional[str]] = {}
        for m in mods:
            for kind in ATTENTION_DIRECTIVES:
                hit = next((r for k, r in self.attn_rules if k == kind and r.matches(m)), None)
                on = hit is not None and hit.scheme != ATTENTION_DIRECTIVES[kind][0]
                if on and not _SELF_ATTN_RE.match(m):
                    raise RecipeError(
                        f"recipe {self.name} line {hit.line}: '{kind} {hit.pattern} {hit.scheme}' matches '{m}'; "
                        f"attention quantization and rotation apply to self-attention (blocks.N.self_attn) only"
                    )
                if _SELF_ATTN_RE.match(m):
                    if kind == "rotation":
                        rot[m] = on
                    else:
                        qt[m] = hit.scheme if on else None
        return AttentionPlan(rot, qt)

    def first_match(self, layer: str) -> Optional[Rule]:
        for r in self.rules:
            if r.matches(layer):
                return r
        return None

    def assign(self, layers: Iterable[str], *, allow_non_block: bool = False,
               diffusers_names: Optional[dict[str, str]] = None) -> Assignment:
        """Schemes for ``layers`` (original Wan names of the model's linears).

        ``diffusers_names`` (original -> diffusers) only improves the "matches no
        layer" message when a pattern was written with diffusers names.
        """
        layers = list(layers)
        schemes: dict[str, str] = {}
        used: set[int] = set()
        non_block: dict[int, list[str]] = {}
        for layer in layers:
            rule = self.first_match(layer)
            if rule is None:
                schemes[layer] = "FLOAT"
                continue
            used.add(rule.line)
            schemes[layer] = rule.scheme
            if rule.scheme != "FLOAT" and not is_block_layer(layer):
                non_block.setdefault(rule.line, []).append(layer)
        warnings: list[str] = []
        if non_block:
            desc = "; ".join(
                f"line {ln} ('{self._rule(ln).pattern} {self._rule(ln).scheme}') matches {', '.join(ls)}"
                for ln, ls in sorted(non_block.items())
            )
            if not allow_non_block:
                raise RecipeError(
                    f"recipe {self.name} quantizes non-block linear layers ({desc}); only blocks.N linears are "
                    f"quantized by msmodelslim-compatible runtimes -- restrict the pattern (e.g. 'blocks.*') "
                    f"or pass --allow-non-block"
                )
            warnings.append(f"recipe {self.name} quantizes non-block layers ({desc}); vllm-omni rejects such checkpoints")
        if not any(s != "FLOAT" for s in schemes.values()):
            hint = self._diffusers_hint(diffusers_names or {})
            raise RecipeError(
                f"recipe {self.name} names no layer of this model: no rule quantizes any of its "
                f"{len(layers)} linear layers (patterns match original Wan names such as "
                f"'blocks.0.self_attn.q', 'blocks.0.ffn.0'){hint}"
            )
        for r in self.rules:
            if r.line not in used:
                warnings.append(f"recipe {self.name} line {r.line}: rule '{r.pattern} {r.scheme}' matches no layer")
        return Assignment(schemes, warnings)

    def _rule(self, line: int) -> Rule:
        return next(r for r in self.rules if r.line == line)

    def _diffusers_hint(self, names: dict[str, str]) -> str:
        for r in self.rules:
            if r.scheme != "FLOAT" and any(fnmatch.fnmatchcase(d, r.pattern) for d in names.values()):
                return f"; pattern '{r.pattern}' matches diffusers names -- use original names instead"
        return ""
