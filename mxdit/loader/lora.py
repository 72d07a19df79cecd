"""LoRA files -> adapters on mxdit's Wan transformers (both A14B experts), unmerged or merged.

Reading (safetensors only, through mxdit's checked reader): every key style users have goes
through diffusers' own Wan LoRA loader, ``WanLoraLoaderMixin.lora_state_dict`` (which dispatches
to ``_convert_non_diffusers_wan_lora_to_diffusers`` for original Wan / ComfyUI / lightx2v keys --
``diffusion_model.blocks.0.self_attn.q.lora_down.weight``, ``lora_A/lora_B``, ``.alpha``,
``.diff_b``, ``head.head.diff`` -- and to ``_convert_musubi_wan_lora_to_diffusers`` for kohya /
musubi ``lora_unet_blocks_0_self_attn_q.lora_down.weight``).  Before that, bare original names
(``blocks.0.self_attn.q...``) and ComfyUI's ``model.diffusion_model.`` prefix are brought to the
``diffusion_model.`` form diffusers expects (the layout is detected with mxdit's one name map,
:mod:`mxdit.models.wan.names`); the converted diffusers names then go through that map's
``to_diffusers_state_dict`` to mxdit's module names.  Keys that match no linear layer are a
one-line error naming the first few, never ignored; so are full-weight ``.diff`` keys that
diffusers drops (only all-zero norm diffs are dropped, as diffusers does).

Modes (SGLang's ``--lora-merge-mode``): ``dynamic`` = unmerged branch (:mod:`mxdit.layers.lora`),
switchable per request; ``merge`` = added to the float weight at load time, before online
quantization (a pre-quantized base refuses, naming the layer); ``auto`` = merge where the base
weights are float, dynamic where they are pre-quantized.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mxdit.layers import lora as L
from mxdit.layers.linear import QuantLinear
from mxdit.loader.safetensors_io import CheckpointError, SafetensorsFile
from mxdit.models.wan import names

MERGE_MODES = ("auto", "merge", "dynamic")
TARGETS = ("all", "transformer", "transformer_2")
EXPERTS = ("transformer", "transformer_2")
_LISTED = 5


class LoRAError(ValueError):
    """A LoRA file or request that cannot be applied (one line)."""


def _files(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise LoRAError(f"LoRA path '{path}' is a directory with {len(found)} .safetensors files; "
                            "pass the file itself")
        p = found[0]
    if not p.is_file():
        raise LoRAError(f"LoRA path '{path}' does not exist")
    if p.suffix != ".safetensors":
        raise LoRAError(f"LoRA file '{path}' is not a .safetensors file (pickled checkpoints are not read)")
    return p


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA safetensors file (header checked; NaN/Inf refused)."""
    p = _files(path)
    try:
        with SafetensorsFile(str(p)) as f:
            return {k: f.read(k, finite=True) for k in f.keys()}
    except CheckpointError as e:
        raise LoRAError(str(e)) from None


_NORM_DIFF = re.compile(r"\.norm[^.]*\.(diff|diff_b)$|norm_[qk]\.(diff|diff_b)$")


def to_module_adapters(state: dict[str, torch.Tensor], where: str = "LoRA") -> dict[str, L.LoRAWeights]:
    """A LoRA state dict in any supported key style -> {mxdit module name: LoRAWeights}."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    if not state:
        raise LoRAError(f"{where}: the file holds no tensors")
    sd = {}
    for k, v in state.items():
        k = names.strip_prefix(k)  # ComfyUI's model.diffusion_model.
        sd[k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k] = v
    bare = {k: v for k, v in sd.items() if not k.startswith("lora_unet_")}
    try:
        original = bool(bare) and names.is_original_layout(bare.keys())
    except ValueError as e:
        raise LoRAError(f"{where}: {e}") from None
    if original:
        for k, v in list(sd.items()):  # what diffusers' converter drops: refuse unless it is a zero norm diff
            if k.endswith((".diff", ".diff_b")):
                if _NORM_DIFF.search(k):
                    if bool(v.ne(0).any()):
                        raise LoRAError(f"{where}: '{k}' is a non-zero norm difference; not supported")
                    del sd[k]
                elif k.endswith(".diff") and not k.startswith("head.head."):
                    raise LoRAError(f"{where}: '{k}' is a full weight difference (.diff); only low-rank "
                                    "LoRA tensors (and .diff_b biases) are supported")
        sd = {"diffusion_model." + k: v for k, v in sd.items()}
    try:
        conv = WanLoraLoaderMixin.lora_state_dict(sd)  # diffusers' own dispatch and converters
    except (ValueError, KeyError) as e:
        raise LoRAError(f"{where}: diffusers' Wan LoRA converter rejected the file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'missing key'})") from None
    pre = "transformer."
    if any(k.startswith(pre) for k in conv):
        other = [k for k in conv if not k.startswith(pre)]
        if other:
            raise LoRAError(f"{where}: {len(other)} tensors are not for the transformer (e.g. {other[:_LISTED]})")
        conv = {k[len(pre):]: v for k, v in conv.items()}
    conv = {k[len("base_model.model."):] if k.startswith("base_model.model.") else k: v for k, v in conv.items()}
    try:
        conv = names.to_diffusers_state_dict(conv)  # mxdit's module names (the one name map)
    except ValueError as e:
        raise LoRAError(f"{where}: {e}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, v in conv.items():
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias")):
            if k.endswith(suffix):
                parts.setdefault(k[: -len(suffix)], {})[slot] = v
                break
        else:
            bad.append(k)
    if bad:
        raise LoRAError(f"{where}: {len(bad)} tensors are not lora_A / lora_B tensors (e.g. {bad[:_LISTED]})")
    out = {}
    for m, p in parts.items():
        if "A" not in p or "B" not in p:
            raise LoRAError(f"{where}: layer '{m}' has {'lora_B' if 'A' not in p else 'lora_A'} without "
                            f"{'lora_A' if 'A' not in p else 'lora_B'}")
        out[m] = L.LoRAWeights(p["A"], p["B"], p.get("bias"))
    return out


def match_model(model: nn.Module, adapters: dict[str, L.LoRAWeights], where: str = "LoRA") -> dict[str, nn.Module]:
    """{module name: QuantLinear}; raises naming the first unmatched layers and bad shapes."""
    mods = dict(model.named_modules())
    unmatched = [m for m in adapters if not isinstance(mods.get(m), QuantLinear)]
    if unmatched:
        raise LoRAError(f"{where}: {len(unmatched)} of {len(adapters)} LoRA layers match no linear layer of the "
                        f"model: {', '.join(unmatched[:_LISTED])}{', ...' if len(unmatched) > _LISTED else ''}")
    layers = {m: mods[m] for m in adapters}
    for m, w in adapters.items():
        try:
            L.check_shapes(layers[m], w, where)
        except ValueError as e:
            raise LoRAError(str(e)) from None
    return layers


@dataclass
class LoRASpec:
    """One adapter to load: a file, its nickname, scale and which expert(s) it is for."""

    path: str
    nickname: str = "default"
    scale: float = 1.0
    target: str = "all"


def parse_lora_paths(paths: Sequence[str], nicknames: Sequence[str] | None = None,
                     scales: Sequence[float] | None = None) -> list[LoRASpec]:
    """CLI values -> specs.  A path may be ``transformer=PATH`` / ``transformer_2=PATH`` (A14B: one
    file per expert) or ``PATH`` (every expert).  Nicknames and scales: one, or one per path (SGLang's
    broadcast rule); one nickname over several per-expert paths names one adapter on each expert."""
    paths = list(paths or [])
    nicknames = list(nicknames or ["default"])
    scales = [float(s) for s in (scales if scales is not None else [1.0])]
    if not paths:
        return []
    for label, vals in (("--lora-nickname", nicknames), ("--lora-scale", scales)):
        if len(vals) not in (1, len(paths)):
            raise LoRAError(f"{label}: give one value or one per --lora-path ({len(paths)}), got {len(vals)}")
    out = []
    for i, p in enumerate(paths):
        target, sep, rest = p.partition("=")
        if sep and target in EXPERTS + ("all",):
            p = rest
        else:
            target = "all"
        s = scales[i if len(scales) > 1 else 0]
        if s != s or s in (float("inf"), float("-inf")):
            raise LoRAError(f"--lora-scale must be finite, got {s}")
        out.append(LoRASpec(p, nicknames[i if len(nicknames) > 1 else 0], s, target))
    seen = set()
    for sp in out:
        for e in (EXPERTS if sp.target == "all" else (sp.target,)):
            if (sp.nickname, e) in seen:
                raise LoRAError(f"LoRA nickname '{sp.nickname}' is given twice for {e}")
            seen.add((sp.nickname, e))
    return out


class LoadTimeMerge:
    """Adapters merged into one expert's float weights by ``load_transformer`` before quantization.

    ``mode`` "merge" or "auto".  :meth:`prepare` checks names and shapes on the meta model (before
    any tensor is read) and, for a pre-quantized base, refuses ("merge") or falls back to unmerged
    ("auto": :attr:`merged` stays False)."""

    def __init__(self, items: Sequence[tuple[str, dict[str, L.LoRAWeights], float]], mode: str = "merge"):
        self.items = list(items)  # (label, adapters, scale)
        self.mode = mode
        self.merged = False
        self._per_layer: dict[str, list[tuple[L.LoRAWeights, float]]] = {}

    def prepare(self, model: nn.Module) -> None:
        per: dict[str, list] = {}
        for label, adapters, scale in self.items:
            for m, layer in match_model(model, adapters, label).items():
                if not L.is_float_weight(layer):
                    if self.mode == "auto":
                        self.merged = False
                        return
                    raise LoRAError(f"{label}: cannot merge into layer '{m}': the base is pre-quantized "
                                    f"({layer.quant_method.name}); use --lora-merge-mode dynamic (unmerged)")
                per.setdefault(m, []).append((adapters[m], scale))
        self._per_layer = per
        self.merged = True

    def apply(self, name: str, layer: nn.Module) -> None:
        """Called for each QuantLinear after its tensors are loaded, before process_weights_after_loading."""
        if self.merged and name in self._per_layer:
            L.merge_into_float_weight(layer, self._per_layer[name])


@dataclass
class _Loaded:
    path: str
    adapters: dict[str, L.LoRAWeights]
    merged_at_load: bool = False


class PipelineLoRA:
    """The LoRA state of a pipeline's experts: adapters by (nickname, expert), what is active,
    SGLang's ``set_lora`` / ``merge_lora_weights`` / ``unmerge_lora_weights`` / ``list_loras``."""

    def __init__(self, experts: dict[str, Optional[nn.Module]]):
        self.experts = {k: v for k, v in experts.items() if v is not None}
        self.loaded: dict[tuple[str, str], _Loaded] = {}
        self.active: dict[str, list[tuple[str, float]]] = {e: [] for e in self.experts}
        self.merged: dict[str, bool] = {e: False for e in self.experts}

    # -- helpers ------------------------------------------------------------------
    def _targets(self, target: str) -> list[str]:
        if target not in TARGETS:
            raise LoRAError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if target == "all":
            return list(self.experts)
        if target not in self.experts:
            raise LoRAError(f"target '{target}': this model has no {target}")
        return [target]

    def _layers(self, expert: str):
        return [m for m in self.experts[expert].modules() if isinstance(m, QuantLinear)]

    def load(self, nickname: str, path: str, expert: str, *, merged_at_load: bool = False,
             adapters: Optional[dict[str, L.LoRAWeights]] = None) -> None:
        """Read (or take) and check an adapter for one expert; attach it unmerged unless it was merged at load."""
        where = f"LoRA '{path}'"
        if adapters is None:
            adapters = to_module_adapters(read_lora_file(path), where)
        layers = match_model(self.experts[expert], adapters, where)
        old = self.loaded.get((nickname, expert))
        if old is not None and old.merged_at_load:
            raise LoRAError(f"{expert}: '{nickname}' was merged into the weights at load time; choose another nickname")
        if old is not None:  # a new file under the same nickname: drop every layer of the old one
            for layer in self._layers(expert):
                L.remove_adapter(layer, nickname)
        if not merged_at_load:
            for m, w in adapters.items():
                L.add_adapter(layers[m], nickname, w)
        self.loaded[(nickname, expert)] = _Loaded(path, adapters, merged_at_load)

    def _apply_active(self, expert: str) -> None:
        act = [(n, s) for n, s in self.active[expert] if not self.loaded[(n, expert)].merged_at_load]
        for layer in self._layers(expert):
            L.set_active(layer, act)

    # -- SGLang's operations -----------------------------------------------------
    def set_lora(self, nickname, path=None, target="all", strength=1.0) -> None:
        """Activate exactly the given adapters (loading those with a path) on each targeted expert."""
        nicks = [nickname] if isinstance(nickname, str) else list(nickname)
        if not nicks or not all(isinstance(n, str) and n for n in nicks):
            raise LoRAError("lora_nickname must be a non-empty string or list of strings")
        paths = path if isinstance(path, list) else [path] * (1 if isinstance(nickname, str) else len(nicks))
        if len(paths) != len(nicks):
            raise LoRAError(f"lora_path has {len(paths)} items for {len(nicks)} nicknames")
        strengths = [strength] * len(nicks) if isinstance(strength, (int, float)) else list(strength)
        targets = [target] * len(nicks) if isinstance(target, str) else list(target)
        for label, vals in (("strength", strengths), ("target", targets)):
            if len(vals) != len(nicks):
                raise LoRAError(f"{label} has {len(vals)} items for {len(nicks)} nicknames")
        for s in strengths:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) == float("inf"):
                raise LoRAError(f"strength must be a finite number, got {s!r}")
        plan: dict[str, list[tuple[str, float]]] = {}
        for n, p, s, t in zip(nicks, paths, strengths, targets):
            for e in self._targets(t):
                if any(self.merged.values()) and self.merged.get(e):
                    raise LoRAError(f"{e}: LoRA weights are merged; call unmerge_lora_weights first")
                have = self.loaded.get((n, e))
                if p is not None and (have is None or have.path != p):
                    self.load(n, p, e)  # checked fully before anything is switched
                elif have is None:
                    if t != "all":
                        raise LoRAError(f"LoRA '{n}' is not loaded for {e}; give its lora_path")
                    continue
                plan.setdefault(e, []).append((n, float(s)))
        if not plan:
            raise LoRAError(f"LoRA {nicks} is not loaded; give its lora_path")
        for e, act in plan.items():
            fixed = [k for (k, ee), v in self.loaded.items() if ee == e and v.merged_at_load and k not in dict(act)]
            if fixed:
                raise LoRAError(f"{e}: '{fixed[0]}' was merged into the weights at load time and cannot be "
                                "turned off; start with --lora-merge-mode dynamic to switch it")
            self.active[e] = act
            self._apply_active(e)

    def disable(self, target: str = "all") -> None:
        for e in self._targets(target):
            self.active[e] = [(n, s) for n, s in self.active[e] if self.loaded[(n, e)].merged_at_load]
            self._apply_active(e)

    def merge(self, target: str = "all", strength: float = 1.0) -> None:
        """Fold the active unmerged adapters into unquantized experts (exact unmerge kept)."""
        exps = self._targets(target)
        for e in exps:
            for layer in self._layers(e):
                lora = L.layer_lora(layer)
                if lora is not None and lora.active and (layer.quant_method.name != "unquantized"
                                                           or not L.is_float_weight(layer)):
                    raise LoRAError(f"{e}: layer '{layer.prefix}' is quantized ({layer.quant_method.name}); its BF16 "
                                    "weight is gone, LoRAs run unmerged (merge at load: --lora-merge-mode merge)")
        for e in exps:
            if strength != 1.0:
                self.active[e] = [(n, s * strength) for n, s in self.active[e]]
                self._apply_active(e)
            for layer in self._layers(e):
                L.merge_active(layer)
            self.merged[e] = True

    def unmerge(self, target: str = "all") -> None:
        for e in self._targets(target):
            for layer in self._layers(e):
                L.unmerge(layer)
            self.merged[e] = False

    def list(self) -> dict[str, Any]:
        return {
            "loaded_adapters": [{"nickname": n, "target": e, "path": v.path, "merged_at_load": v.merged_at_load}
                                for (n, e), v in self.loaded.items()],
            "active": {e: [{"nickname": n, "strength": s} for n, s in act] for e, act in self.active.items()},
            "merged": dict(self.merged),
        }


def plan_load_time(specs: Sequence[LoRASpec], experts: Sequence[str], mode: str) -> tuple[dict, dict]:
    """Read every spec's file once (before any weight is loaded).  Returns
    ``({expert: LoadTimeMerge or None}, {(nickname, expert): (path, adapters, scale)})``."""
    if mode not in MERGE_MODES:
        raise LoRAError(f"--lora-merge-mode must be one of {list(MERGE_MODES)}, got {mode!r}")
    read: dict[str, dict] = {}
    per: dict[tuple[str, str], tuple] = {}
    for sp in specs:
        targets = list(experts) if sp.target == "all" else [sp.target]
        for t in targets:
            if t not in experts:
                raise LoRAError(f"--lora-path {t}={sp.path}: this model has no {t}")
        if sp.path not in read:
            read[sp.path] = to_module_adapters(read_lora_file(sp.path), f"LoRA '{sp.path}'")
        for t in targets:
            per[(sp.nickname, t)] = (sp.path, read[sp.path], sp.scale)
    merges = {}
    for e in experts:
        items = [(f"LoRA '{p}'", a, s) for (n, ee), (p, a, s) in per.items() if ee == e]
        merges[e] = LoadTimeMerge(items, mode) if items and mode != "dynamic" else None
    return merges, per


def attach_after_load(experts: dict[str, Optional[nn.Module]], merges: dict, per: dict) -> PipelineLoRA:
    """After loading: the :class:`PipelineLoRA`; adapters not merged at load run unmerged and active."""
    ctl = PipelineLoRA(experts)
    for (n, e), (p, adapters, s) in per.items():
        m = merges.get(e)
        ctl.load(n, p, e, merged_at_load=bool(m is not None and m.merged), adapters=adapters)
        ctl.active[e].append((n, s))
    for e in ctl.experts:
        ctl._apply_active(e)
    return ctl


def lora_specs_from_args(args) -> list[LoRASpec]:
    """The --lora-* flags -> specs (files checked to exist); raises :class:`LoRAError`."""
    specs = parse_lora_paths(getattr(args, "lora_path", None) or [], getattr(args, "lora_nickname", None),
                             getattr(args, "lora_scale", None))
    for sp in specs:
        _files(sp.path)
    return specs
