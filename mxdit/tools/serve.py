"""``mxdit serve``: load (and quantize) a Wan2.2 model once, serve SGLang's / OpenAI's ``/v1/videos`` API.

Flag names follow SGLang's ``sglang serve``. Jobs live in an SQLite database
(``--db-path``, default ``<output-path>/jobs.sqlite``); videos are written
atomically to ``--output-path`` as ``<id>.mp4``.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from mxdit.cli import UsageError, available_quant_methods


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", required=True, help="diffusers-layout Wan2.2 model directory")
    g.add_argument("--quantization", default=None,
                   help=f"quantize online, fixed for the server's life (one of: {', '.join(available_quant_methods())})")
    g.add_argument("--transformer-weights-path", default=None)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, npu (default: the first accelerator, else cpu)")
    g.add_argument("--dtype", default="bf16", help="bf16 (default), fp16, fp32")
    g.add_argument("--flow-shift", type=float, default=None)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --api-key)")
    g.add_argument("--port", type=int, default=30000)
    g.add_argument("--output-path", default="outputs", help="folder for the videos (default outputs/)")
    g.add_argument("--db-path", default=None, help="SQLite job database (default <output-path>/jobs.sqlite)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--max-queue-size", type=int, default=16, help="queued jobs before POST answers 429")
    g.add_argument("--served-model-name", default=None, help="the model id /v1/models reports")
    g = p.add_argument_group("parallelism")
    g.add_argument("--num-gpus", type=int, default=1)
    g.add_argument("--ulysses-degree", type=int, default=None)
    g.add_argument("--ring-degree", type=int, default=None)
    g.add_argument("--enable-cfg-parallel", action="store_true")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from mxdit.pipelines.model_dir import ModelDirError, inspect_model_dir
    from mxdit.tools.generate import DTYPES, _resolve_device

    if not _is_loopback(args.host) and not args.api_key:
        raise UsageError(f"--host {args.host} is not loopback; pass --api-key to serve beyond this machine")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_queue_size < 1:
        raise UsageError(f"--max-queue-size must be >= 1, got {args.max_queue_size}")
    if args.quantization is not None and args.quantization not in available_quant_methods():
        raise UsageError(f"unknown --quantization {args.quantization!r} "
                         f"(choose from: {', '.join(available_quant_methods())})")
    if args.dtype.lower() not in DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r} (choose from: bf16, fp16, fp32)")
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if args.num_gpus > 1:
        try:
            import mxdit.distributed  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("--num-gpus > 1 needs mxdit.distributed, which this build does not have") from None
        raise UsageError("--num-gpus > 1: the multi-rank server engine is not wired in this build yet")
    try:
        info = inspect_model_dir(args.model_path)
    except ModelDirError as e:
        raise UsageError(f"--model-path: {e}") from None
    out_dir = Path(args.output_path).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-path {args.output_path} is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    db_path = Path(args.db_path).expanduser() if args.db_path else out_dir / "jobs.sqlite"

    import torch
    import uvicorn

    from mxdit.pipelines.wan import WanVideoPipeline
    from mxdit.serve.app import Server, create_app
    from mxdit.serve.engine import Engine
    from mxdit.serve.store import JobStore

    device = _resolve_device(args.device)
    print(f"loading {info.path} ({info.kind}) on {device}, quantization={args.quantization or 'auto-detect'} ...",
          file=sys.stderr)
    try:
        pipe = WanVideoPipeline.from_pretrained(
            info.path, quantization=args.quantization, transformer_weights_path=args.transformer_weights_path,
            device=device, dtype=getattr(torch, DTYPES[args.dtype.lower()]), flow_shift=args.flow_shift)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"mxdit serve: error: {e}", file=sys.stderr)
        return 1
    store = JobStore(str(db_path))
    server = Server(Engine(pipe, info), store, out_dir, queue_size=args.max_queue_size, api_key=args.api_key,
                    model_name=args.served_model_name or info.path.name,
                    quantization=pipe.quantization or "none")
    server.start()
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning")
    print(f"serving on http://{args.host}:{args.port}/v1 (db {db_path}, videos in {out_dir})", file=sys.stderr,
          flush=True)
    import signal

    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it caught after shutting down;
        signal.signal(sig, lambda s, _f: stopped_by.append(s))  # land here so the worker is stopped cleanly
    try:
        uvicorn.Server(config).run()  # SIGINT/SIGTERM: stop accepting, drain connections, return
    finally:
        server.stop()  # the running job finishes; queued ones end failed with a reason
        store.close()
    return 0
