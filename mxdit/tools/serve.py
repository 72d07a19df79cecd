"""``mxdit serve``: load (and quantize) a Wan2.2 model once, serve SGLang's / OpenAI's ``/v1/videos`` API.

Flag names follow SGLang's ``sglang serve``. Jobs live in an SQLite database
(``--db-path``, default ``<output-path>/jobs.sqlite``); videos are written
atomically to ``--output-path`` as ``<id>.mp4``.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from mxdit.errors import UsageError
from mxdit.quant.schemes import canonical_name
from mxdit.tools import sglang_args
from mxdit.tools.sglang_args import DEFAULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``sglang serve``'s flags (v0.5.23) for what mxdit serves; the model / precision / quantization and
    parallelism groups are ``mxdit generate``'s (one definition, :mod:`mxdit.tools.sglang_args`)."""
    sglang_args.add_model_arguments(p, serve=True)
    sglang_args.add_lora_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULTS["host"], help=f"bind address (default {DEFAULTS['host']}; others need --api-key)")
    g.add_argument("--port", type=int, default=DEFAULTS["port"])
    g.add_argument("--output-path", default=DEFAULTS["output_path"],
                   help=f"folder for the videos (default {DEFAULTS['output_path']})")
    g.add_argument("--db-path", default=None, help="SQLite job database (default <output-path>/jobs.sqlite)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--max-queue-size", type=int, default=16, help="queued jobs before POST answers 429")
    g.add_argument("--served-model-name", default=None, help="the model id /v1/models reports")
    sglang_args.add_parallel_arguments(p, serve=True)
    sglang_args.add_switch_arguments(p)  # --enable-torch-compile, offload, VAE, cache-dit
    sglang_args.install(p)  # --config files; SGLang flags mxdit lacks -> "not supported: why" (exit 2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _layout_args(args: argparse.Namespace, req: dict | None = None) -> argparse.Namespace:
    """What ``mxdit generate``'s ``parallel_config`` reads: the server's flags, and a request's size (or the
    model's default size).  Guidance stays the model's default, so every request resolves the server's layout."""
    req = req or {}
    return argparse.Namespace(
        num_gpus=args.num_gpus, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
        enable_cfg_parallel=args.enable_cfg_parallel, tp_size=args.tp_size, sp_degree=args.sp_degree,
        cfg_parallel_size=args.cfg_parallel_size, master_port=args.master_port,
        dist_timeout=args.dist_timeout, guidance_scale=None, guidance_scale_2=None, image_path=None,
        height=req.get("height"), width=req.get("width"), num_frames=req.get("num_frames"))


def run(args: argparse.Namespace) -> int:
    from mxdit.pipelines.model_dir import ModelDirError, inspect_model_dir
    from mxdit.tools.generate import _resolve_device, parallel_config

    if args.model_path is None:
        raise UsageError("--model-path is required (or model_path in --config)")
    if not _is_loopback(args.host) and not args.api_key:
        raise UsageError(f"--host {args.host} is not loopback; pass --api-key to serve beyond this machine")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_queue_size < 1:
        raise UsageError(f"--max-queue-size must be >= 1, got {args.max_queue_size}")
    if args.quantization is not None:
        canonical_name(args.quantization, what="--quantization")  # the one name check (a ValueError: exit 2)
    sglang_args.resolve_precisions(args, UsageError)
    from mxdit.pipelines.switches import switch_config_from_args

    try:
        args.switch_config = switch_config_from_args(args)  # checked before anything loads (exit 2)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        info = inspect_model_dir(args.model_path)
    except ModelDirError as e:
        raise UsageError(f"--model-path: {e}") from None
    parallel = parallel_config(_layout_args(args), info)  # the one layout validator (UsageError), before loading
    out_dir = Path(args.output_path).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-path {args.output_path} is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(args.device)
    try:  # fail in a second, not after loading the model (uvicorn binds again later)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        print(f"mxdit serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1

    import signal

    from mxdit.distributed import DEFAULT_DIST_TIMEOUT_S, RankError, launch

    try:
        return launch(_serve_rank, parallel, args, parallel, device=device, master_port=args.master_port,
                      timeout_s=args.dist_timeout or DEFAULT_DIST_TIMEOUT_S,
                      forward_signals=(signal.SIGTERM, signal.SIGINT)) or 0  # None: a torchrun peer
    except ServeFailure as e:
        print(f"mxdit serve: error: {e}", file=sys.stderr)
        return 1
    except (RankError, RuntimeError, TimeoutError) as e:  # a rank died or failed while serving
        print(f"mxdit serve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


class ServeFailure(RuntimeError):
    """A failure while loading (exit status 1), raised on any rank so that every rank stops."""


def _serve_rank(args: argparse.Namespace, parallel) -> int:
    """One rank: load the pipeline; rank 0 serves HTTP and hands each job to the others, which run it too."""
    import signal

    import torch

    from mxdit import distributed as mxdist
    from mxdit.pipelines.model_dir import inspect_model_dir
    from mxdit.loader.lora import lora_specs_from_args
    from mxdit.pipelines.wan import WanVideoPipeline
    from mxdit.serve.engine import DistributedEngine, Engine, control_group, serve_peer
    from mxdit.tools.generate import _resolve_device, parallel_config

    info = inspect_model_dir(args.model_path)
    out_dir = Path(args.output_path).expanduser()
    db_path = Path(args.db_path).expanduser() if args.db_path else out_dir / "jobs.sqlite"
    multi = mxdist.get_world_size() > 1
    rank0 = mxdist.is_rank0()
    device = _resolve_device(args.device)
    if multi:
        device = mxdist.rank_device(device, mxdist.get_local_rank())
        if not rank0:  # Ctrl-C reaches every process of the terminal: rank 0 alone decides, and stops the others
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    if rank0:
        print(f"loading {info.path} ({info.kind}) on {device}, quantization={args.quantization or 'auto-detect'}"
              + (f", {parallel.num_gpus} ranks (ulysses {parallel.ulysses_degree}, cfg {parallel.cfg_degree})"
                 if multi else "") + " ...", file=sys.stderr)
    try:
        pipe = WanVideoPipeline.from_pretrained(
            info.path, quantization=args.quantization, transformer_weights_path=args.transformer_weights_path,
            device=device, flow_shift=args.flow_shift, attention_quantization=args.attention_backend,
            **sglang_args.resolve_precisions(args, UsageError), **sglang_args.quant_options(args),
            loras=lora_specs_from_args(args), lora_merge_mode=args.lora_merge_mode)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise ServeFailure(str(e)) from None  # raised, so that every other rank is stopped too
    from mxdit.pipelines.switches import apply_switches

    # the switches hold for every job (each job's perf JSON reports them); with --enable-torch-compile
    # the first job compiles (the server does not know the first request's size)
    apply_switches(pipe, args.switch_config)
    if not multi:
        engine = Engine(pipe, info)
    else:
        group = control_group()  # collective: every rank has loaded when it returns
        if not rank0:
            return serve_peer(pipe, group)

        def check(req: dict) -> None:  # the request's size against the layout, with generate's validator
            try:
                parallel_config(_layout_args(args, req), info)
            except UsageError as e:
                raise ValueError(str(e)) from None

        engine = DistributedEngine(pipe, info, group, check=check)
    return _serve_http(args, engine, pipe, info, out_dir, db_path)


def _serve_http(args, engine, pipe, info, out_dir: Path, db_path: Path) -> int:
    """Rank 0 (or the only process): uvicorn, the job store and the worker thread, until SIGTERM / SIGINT."""
    import signal

    import uvicorn

    from mxdit.serve.app import Server, create_app
    from mxdit.serve.store import JobStore

    store = None
    server = None
    try:
        store = JobStore(str(db_path))
        server = Server(engine, store, out_dir, queue_size=args.max_queue_size, api_key=args.api_key,
                        model_name=args.served_model_name or info.path.name,
                        quantization=pipe.quantization or "none")
        config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning")
        userver = uvicorn.Server(config)
        if hasattr(engine, "on_broken"):  # ranks out of step: stop serving (the job has failed already)
            engine.on_broken = lambda: setattr(userver, "should_exit", True)
        server.start()
        print(f"serving on http://{args.host}:{args.port}/v1 (db {db_path}, videos in {out_dir})", file=sys.stderr,
              flush=True)
        stopped_by: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it caught after shutting down;
            signal.signal(sig, lambda s, _f: stopped_by.append(s))  # land here so the worker is stopped cleanly
        try:
            userver.run()  # SIGINT/SIGTERM: stop accepting, drain connections, return
        except SystemExit as e:  # uvicorn's startup failure (it logged why, e.g. the port was taken meanwhile)
            raise ServeFailure(f"the HTTP server did not start on {args.host}:{args.port} (exit {e.code})") from None
    finally:
        if server is not None and server.worker.ident is not None:
            server.stop()  # the running job finishes; queued ones end failed with a reason
        engine.close()  # multi-rank: the stop message to the other ranks (startup failures included)
        if store is not None:
            store.close()
    return 1 if getattr(engine, "broken", False) else 0
