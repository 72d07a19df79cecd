"""The switches Wan2.2 users turn on beside quantization (SGLang's flag names):

``--enable-torch-compile``
    Regional compilation: every repeated transformer block (``WanTransformerBlock``) is
    compiled with ``torch.compile`` (as diffusers' ``compile_repeated_blocks``); mxdit's
    quantized linears and quantized attention are ``torch.library`` custom ops
    (:mod:`mxdit.kernels.ops`), so a block is one graph whatever its quantization, and one
    compiled graph serves all blocks.  :func:`warmup` runs a short generation so the first
    request does not pay for compilation.
``--dit-cpu-offload``
    A14B: the idle expert lives in CPU memory; it is moved to the device (its quantized
    storage as it is) at the boundary step and the other one moved out, so the two experts need
    one expert's device memory.  Forward pre-hooks on the experts: the pipeline is unchanged.
``--dit-layerwise-offload``
    Every transformer block lives in CPU memory and is streamed to the device just before it
    runs (forward pre-hook) and back after it (forward hook): device memory holds one block and
    the small non-block layers.
``--vae-tiling`` / ``--vae-slicing``
    diffusers' ``AutoencoderKLWan.enable_tiling()`` / ``enable_slicing()``.
``--enable-cache-dit``
    Block caching with cache-dit's DBCache (``pip install cache-dit``; the ``cache`` extra) on
    mxdit's own transformer (its blocks have cache-dit's ``ForwardPattern.Pattern_2``), both A14B
    experts with their own cache contexts, as SGLang does; refreshed per request with the
    number of steps each expert runs.  Options: SGLang's ``SGLANG_CACHE_DIT_*`` environment
    variables and/or ``--cache-dit-config`` (JSON or YAML with DBCacheConfig field names).

Each switch is reported in the perf JSON under ``"switches"`` (which were on, what they did:
expert moves, compiled blocks, cache-dit's skipped block computations); the device's peak
memory is ``peak_memory.device_max_allocated_bytes`` as before.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SwitchConfig", "Switches", "apply_switches", "switch_config_from_args",
           "compile_repeated_blocks", "warmup", "apply_generate_switches", "load_cache_dit_config", "CACHE_DIT_DEFAULTS"]

#: SGLang's cache-dit defaults and environment variables (python/sglang/multimodal_gen/docs/cache_dit.md)
CACHE_DIT_DEFAULTS: dict[str, Any] = {
    "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4,
    "residual_diff_threshold": 0.24, "max_continuous_cached_steps": 3,
}
CACHE_DIT_ENV: dict[str, tuple[str, type]] = {
    "SGLANG_CACHE_DIT_FN": ("Fn_compute_blocks", int),
    "SGLANG_CACHE_DIT_BN": ("Bn_compute_blocks", int),
    "SGLANG_CACHE_DIT_WARMUP": ("max_warmup_steps", int),
    "SGLANG_CACHE_DIT_RDT": ("residual_diff_threshold", float),
    "SGLANG_CACHE_DIT_MC": ("max_continuous_cached_steps", int),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
#: block classes compiled by the regional compilation (mxdit's and diffusers' Wan blocks)
REPEATED_BLOCKS = ("WanTransformerBlock",)


@dataclass
class SwitchConfig:
    enable_torch_compile: bool = False
    torch_compile_backend: str = "inductor"
    torch_compile_mode: Optional[str] = None
    dit_cpu_offload: bool = False
    dit_layerwise_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    enable_cache_dit: bool = False
    cache_dit: dict[str, Any] = field(default_factory=dict)  # DBCacheConfig fields
    offload_device: str = "cpu"

    @property
    def any(self) -> bool:
        return any((self.enable_torch_compile, self.dit_cpu_offload, self.dit_layerwise_offload,
                    self.vae_tiling, self.vae_slicing, self.enable_cache_dit))


def parse_bool(v: str) -> bool:
    """A boolean flag or variable (SGLang's StoreBoolean spellings; empty is false)."""
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def load_cache_dit_config(path: Optional[str] = None, env: Optional[dict] = None) -> dict[str, Any]:
    """DBCacheConfig fields: SGLang's defaults, then ``SGLANG_CACHE_DIT_*`` variables, then the file."""
    env = os.environ if env is None else env
    cfg = dict(CACHE_DIT_DEFAULTS)
    for var, (name, typ) in CACHE_DIT_ENV.items():
        if env.get(var, "").strip():
            try:
                cfg[name] = typ(env[var])
            except ValueError:
                raise ValueError(f"{var} must be {typ.__name__}, got {env[var]!r}") from None
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--cache-dit-config {path}: cannot read ({e.strerror or e})") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is a bad input
            raise ValueError(f"--cache-dit-config {path}: not valid {p.suffix.lstrip('.') or 'JSON'} ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("cache_config"), dict):
            data = data["cache_config"]  # cache-dit's load_configs layout
        if not isinstance(data, dict):
            raise ValueError(f"--cache-dit-config {path}: expected a mapping of DBCacheConfig fields")
        cfg.update(data)
    _check_cache_dit_fields(cfg, path)
    return cfg


def _check_cache_dit_fields(cfg: dict, where: Optional[str]) -> None:
    import dataclasses

    try:
        from cache_dit import DBCacheConfig
    except ImportError:
        return  # reported when the switch is applied
    known = {f.name for f in dataclasses.fields(DBCacheConfig)}
    bad = sorted(set(cfg) - known)
    if bad:
        raise ValueError(f"{'--cache-dit-config ' + where if where else 'cache-dit config'}: unknown DBCacheConfig "
                         f"field(s) {bad}")


def switch_config_from_args(args) -> SwitchConfig:
    """A :class:`SwitchConfig` from parsed flags (raises ValueError on a bad cache-dit config)."""
    env_on = os.environ.get("SGLANG_CACHE_DIT_ENABLED", "").strip().lower()
    if env_on not in _TRUE + _FALSE:
        raise ValueError(f"SGLANG_CACHE_DIT_ENABLED must be a boolean, got {env_on!r}")
    cache_on = bool(args.enable_cache_dit) or args.cache_dit_config is not None or (
        args.enable_cache_dit is None and env_on in _TRUE)
    cfg = SwitchConfig(
        enable_torch_compile=bool(args.enable_torch_compile),
        torch_compile_backend=args.torch_compile_backend, torch_compile_mode=args.torch_compile_mode,
        dit_cpu_offload=bool(args.dit_cpu_offload), dit_layerwise_offload=bool(args.dit_layerwise_offload),
        vae_tiling=bool(args.vae_tiling), vae_slicing=bool(args.vae_slicing), enable_cache_dit=cache_on,
        cache_dit=load_cache_dit_config(args.cache_dit_config) if cache_on else {},
    )
    if cfg.enable_cache_dit and (getattr(args, "num_gpus", None) or 1) > 1:
        raise ValueError("--enable-cache-dit runs on one device only (SGLang disables it with world_size > 1)")
    if cfg.dit_cpu_offload and cfg.dit_layerwise_offload:
        raise ValueError("--dit-cpu-offload and --dit-layerwise-offload are alternatives; pick one")
    if cfg.dit_layerwise_offload and cfg.enable_cache_dit:
        raise ValueError("--dit-layerwise-offload and --enable-cache-dit cannot be combined "
                         "(cache-dit skips blocks the offload hooks stream; SGLang refuses it too)")
    return cfg


# ----------------------------------------------------------------------------- compile
def compile_repeated_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every ``WanTransformerBlock`` of ``model`` in place (``module.compile``); register its
    quantized linears for :mod:`mxdit.kernels.ops`.  Returns the number of blocks compiled."""
    from mxdit.kernels import ops

    ops.register_quantized_linears(model)
    n = 0
    for m in model.modules():
        if type(m).__name__ in REPEATED_BLOCKS:
            m.compile(**compile_kwargs)
            n += 1
    if n == 0:
        raise ValueError(f"--enable-torch-compile: {type(model).__name__} has no {REPEATED_BLOCKS[0]} blocks to compile")
    return n


def warmup(pipe: Any, **call_kwargs: Any) -> float:
    """Run the pipeline once at the request's size with two steps (both A14B experts run) and no
    decoding, so compilation happens here and not in the first request.  Returns seconds."""
    import time

    kw = dict(call_kwargs)
    kw.update(num_inference_steps=2, output_type="latent", progress=False, step_callback=None)
    if getattr(pipe, "boundary_ratio", None) is not None:  # step 0 high-noise, step 1 low-noise
        import copy

        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(2)
        t0_, t1_ = (float(t) for t in sched.timesteps[:2])
        kw["boundary_ratio"] = (t0_ + t1_) / 2 / float(sched.config.get("num_train_timesteps", 1000))
    t0 = time.perf_counter()
    sw = getattr(pipe, "switches", None)
    if sw is not None:
        sw.in_warmup = True
    try:
        pipe(**kw)
    finally:
        if sw is not None:
            sw.in_warmup = False
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- offload
def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)


class Switches:
    """The switches applied to one pipeline; the pipeline calls :meth:`begin` once its timesteps are
    known and :meth:`report` for the perf JSON."""

    def __init__(self, pipe: Any, config: SwitchConfig):
        self.pipe = pipe
        self.config = config
        self.device = torch.device(pipe.device)
        self.offload_device = torch.device(config.offload_device)
        self.in_warmup = False
        self._hooks: list = []
        self.expert_moves: list[dict[str, Any]] = []
        self.layer_moves = 0
        self.compiled_blocks = 0
        self._cache_dit_stats: Optional[dict[str, Any]] = None
        self._call_experts: list[str] = []
        self.warmup_s: Optional[float] = None

    # -- helpers
    def experts(self) -> list[tuple[str, nn.Module]]:
        out = [("transformer", self.pipe.transformer)]
        if getattr(self.pipe, "transformer_2", None) is not None and self.pipe.boundary_ratio is not None:
            out.append(("transformer_2", self.pipe.transformer_2))
        return out

    def apply(self) -> "Switches":
        c = self.config
        if c.dit_cpu_offload and c.dit_layerwise_offload:
            raise ValueError("--dit-cpu-offload and --dit-layerwise-offload are alternatives; pick one")
        if c.vae_tiling or c.vae_slicing:
            vae = self.pipe.vae
            for on, meth in ((c.vae_tiling, "enable_tiling"), (c.vae_slicing, "enable_slicing")):
                if on:
                    if not hasattr(vae, meth):
                        raise ValueError(f"the VAE ({type(vae).__name__}) has no {meth}()")
                    getattr(vae, meth)()
        if c.enable_cache_dit:
            self._enable_cache_dit()
        if c.enable_torch_compile:
            kw: dict[str, Any] = {"backend": c.torch_compile_backend}
            if c.torch_compile_mode:
                kw["mode"] = c.torch_compile_mode
            for _, m in self.experts():
                self.compiled_blocks += compile_repeated_blocks(m, **kw)
        if c.dit_cpu_offload:
            self._enable_expert_offload()
        if c.dit_layerwise_offload:
            self._enable_layerwise_offload()
        return self

    # -- expert offload
    def _enable_expert_offload(self) -> None:
        experts = self.experts()
        if len(experts) < 2:
            logger.warning("--dit-cpu-offload: one transformer only (not A14B); it stays on %s", self.device)
            return
        # the first steps run the high-noise expert: the low-noise one starts offloaded
        _move(experts[1][1], self.offload_device)
        _move(experts[0][1], self.device)
        self._resident = experts[0][0]
        for name, m in experts:
            others = [(n, o) for n, o in experts if o is not m]
            self._hooks.append(m.register_forward_pre_hook(self._make_expert_hook(name, m, others)))

    def _make_expert_hook(self, name, module, others):
        def hook(_mod, _args):
            if self._resident != name:
                for oname, other in others:
                    _move(other, self.offload_device)
                _move(module, self.device)
                self._resident = name
                self.expert_moves.append({"to_device": name, "to_offload": [n for n, _ in others],
                                          "warmup": self.in_warmup})
            return None
        return hook

    # -- layerwise offload
    def _enable_layerwise_offload(self) -> None:
        for _, m in self.experts():
            blocks = getattr(m, "blocks", None)
            if blocks is None:
                raise ValueError(f"--dit-layerwise-offload: {type(m).__name__} has no .blocks")
            for b in blocks:
                _move(b, self.offload_device)

                def pre(mod, _args):
                    _move(mod, self.device)
                    self.layer_moves += 1

                def post(mod, _args, _out):
                    _move(mod, self.offload_device)

                self._hooks.append(b.register_forward_pre_hook(pre))
                self._hooks.append(b.register_forward_hook(post))

    # -- cache-dit
    def _enable_cache_dit(self) -> None:
        try:
            import cache_dit
            from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, ParamsModifier
        except ImportError as e:
            raise ValueError(f"--enable-cache-dit needs cache-dit (pip install 'mxdit[cache]'): {e}") from None
        from mxdit import distributed as mxdist

        if mxdist.get_world_size() > 1:
            raise ValueError("--enable-cache-dit runs on one device only (cache-dit's residual test is per rank; "
                             "SGLang disables it with world_size > 1)")
        experts = self.experts()
        fields = dict(self.config.cache_dit)
        fields.pop("num_inference_steps", None)
        mods = [ParamsModifier(cache_config=DBCacheConfig(num_inference_steps=1, **fields)) for _ in experts]
        cache_dit.enable_cache(
            BlockAdapter(
                transformer=[m for _, m in experts], blocks=[m.blocks for _, m in experts],
                forward_pattern=[ForwardPattern.Pattern_2] * len(experts), params_modifiers=mods,
                check_forward_pattern=True, check_num_outputs=False, has_separate_cfg=True,
            ),
        )
        self._cache_dit = cache_dit
        self._DBCacheConfig = DBCacheConfig

    def begin(self, experts_per_step: list[str]) -> None:
        """Called by the pipeline once per request with the expert of each step."""
        self._call_experts = list(experts_per_step)
        if self.config.enable_cache_dit:
            for name, m in self.experts():
                n = max(1, experts_per_step.count(name))
                self._cache_dit.refresh_context(
                    m, cache_config=self._DBCacheConfig().reset(num_inference_steps=n), verbose=False)

    def cache_dit_stats(self) -> Optional[dict[str, Any]]:
        if not self.config.enable_cache_dit:
            return None
        out: dict[str, Any] = {"config": dict(self.config.cache_dit), "experts": {}}
        total_skipped = 0
        total_blocks = 0
        for name, m in self.experts():
            st = self._cache_dit.summary(m, logging=False)
            st = st[0] if isinstance(st, (list, tuple)) else st  # one entry per blocks list (mxdit: one)
            nblocks = len(m.blocks)
            cfg = self.config.cache_dit
            # a cached step skips every block between the Fn first and the Bn last ones
            skipped_per = max(0, nblocks - int(cfg.get("Fn_compute_blocks", 8)) - int(cfg.get("Bn_compute_blocks", 0)))
            cached = len(st.cached_steps) + len(st.cfg_cached_steps)
            forwards = self._forwards.get(name, 0)
            out["experts"][name] = {
                "cached_steps": list(st.cached_steps), "cfg_cached_steps": list(st.cfg_cached_steps),
                "residual_diffs": {str(k): float(v) for k, v in dict(st.residual_diffs).items()},
                "cfg_residual_diffs": {str(k): float(v) for k, v in dict(st.cfg_residual_diffs).items()},
                "forwards": forwards, "blocks_per_forward": nblocks,
                "skipped_block_computations": cached * skipped_per,
            }
            total_skipped += cached * skipped_per
            total_blocks += forwards * nblocks
        out["skipped_block_computations"] = total_skipped
        out["block_computations"] = total_blocks
        return out

    _forwards: dict[str, int] = {}

    def count_forwards(self) -> None:
        self._forwards = {}
        for name, m in self.experts():
            def hook(_m, _a, name=name):
                self._forwards[name] = self._forwards.get(name, 0) + 1
            self._hooks.append(m.register_forward_pre_hook(hook))

    def report(self) -> dict[str, Any]:
        c = self.config
        rep: dict[str, Any] = {
            "enable_torch_compile": c.enable_torch_compile,
            "dit_cpu_offload": c.dit_cpu_offload,
            "dit_layerwise_offload": c.dit_layerwise_offload,
            "vae_tiling": c.vae_tiling,
            "vae_slicing": c.vae_slicing,
            "enable_cache_dit": c.enable_cache_dit,
        }
        if c.enable_torch_compile:
            rep["torch_compile"] = {"backend": c.torch_compile_backend, "mode": c.torch_compile_mode,
                                    "compiled_blocks": self.compiled_blocks, "warmup_s": self.warmup_s}
        if c.dit_cpu_offload:
            rep["expert_moves"] = [m for m in self.expert_moves if not m["warmup"]]
            rep["offload_device"] = str(self.offload_device)
        if c.dit_layerwise_offload:
            rep["block_moves"] = self.layer_moves
            rep["offload_device"] = str(self.offload_device)
        if c.enable_cache_dit:
            rep["cache_dit"] = self.cache_dit_stats()
        return rep

    def reset_counters(self) -> None:
        self.expert_moves = []
        self.layer_moves = 0
        self._forwards = {k: 0 for k in self._forwards}


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def apply_switches(pipe: Any, config: SwitchConfig) -> Optional[Switches]:
    """Apply ``config`` to a :class:`~mxdit.pipelines.wan.WanVideoPipeline` (in place); it then
    reports them in every perf JSON.  Returns the :class:`Switches` (also ``pipe.switches``)."""
    if not config.any:
        return None
    sw = Switches(pipe, config)
    sw.count_forwards()
    sw.apply()
    pipe.switches = sw
    return sw


def apply_generate_switches(pipe: Any, args: Any, *, prompt: str, image: Any = None, seed: int = 42) -> Optional[Switches]:
    """``mxdit generate``'s one call: apply ``args.switch_config`` (made by
    :func:`switch_config_from_args` while validating) and, with ``--enable-torch-compile``, warm up
    at the first request's settings (``prompt``, ``image``, ``seed``), so both experts compile here."""
    cfg = getattr(args, "switch_config", None)
    if cfg is None:
        cfg = switch_config_from_args(args)
    sw = apply_switches(pipe, cfg)
    if cfg.enable_torch_compile:
        secs = warmup(pipe, prompt=prompt, negative_prompt=args.negative_prompt, image=image,
                      height=args.height, width=args.width, num_frames=args.num_frames,
                      guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2, seed=seed)
        if sw is not None:
            sw.warmup_s = secs
        logger.info("warmup (2 steps, compile included): %.1f s", secs)
    return sw
