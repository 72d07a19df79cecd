"""Start ranks: in-process (one device), under torchrun (env://), or spawned on this host."""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .config import ParallelConfig
from .state import backend_for_device, clear_parallel_state, init_parallel_state, rank_device

DEFAULT_DIST_TIMEOUT_S = 1800.0
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankError(RuntimeError):
    """A spawned rank failed without an exception that could be sent back (killed, crashed)."""


def under_torchrun() -> bool:
    return all(v in os.environ for v in _ENV_VARS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_device(device: str) -> None:
    kind = torch.device(device).type
    if kind != "cpu":
        mod = getattr(torch, kind, None)
        if mod is not None and hasattr(mod, "set_device"):
            mod.set_device(torch.device(device))


def _cpu_threads(world: int) -> None:
    """Share the host's cores among the CPU ranks (one thread each on a small machine)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))


def _run_in_group(entry, config, args, *, backend, init_method, rank, world, device, timeout_s,
                  local_rank: int, on_error: Optional[Callable[[BaseException], None]] = None) -> Any:
    dev = rank_device(device, local_rank)
    _set_device(dev)
    if torch.device(dev).type == "cpu":  # ranks on this host: torchrun's LOCAL_WORLD_SIZE, else all of them
        _cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        init_parallel_state(config)
        return entry(*args)
    except BaseException as e:
        if on_error is not None:  # report before the teardown makes the peers' collectives fail too
            on_error(e)
        raise
    finally:
        clear_parallel_state()
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, backend: str, device: str, config: ParallelConfig,
            entry: Callable, args: tuple, timeout_s: float, results) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # (RANK / WORLD_SIZE stay unset: this is not torchrun)
    reported = []

    def report(e: BaseException) -> None:  # sent to the parent, which raises the earliest one
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
        except Exception:
            payload = None
        results.put((rank, "error", (payload, f"{type(e).__name__}: {e}", tb, time.time())))
        reported.append(True)

    try:
        out = _run_in_group(entry, config, args, backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world=world, device=device, timeout_s=timeout_s, local_rank=rank,
                            on_error=report)
        # plain pickle bytes: torch's queue reductions would share tensor memory with a process about to exit
        results.put((rank, "ok", pickle.dumps(out if rank == 0 else None)))
    except BaseException as e:
        if not reported:  # failed before the entry ran (e.g. the rendezvous)
            report(e)


def launch(entry: Callable[..., Any], config: ParallelConfig, *args: Any, device: str = "cpu",
           master_port: Optional[int] = None, timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
           join_timeout_s: Optional[float] = None, forward_signals: tuple[int, ...] = ()) -> Any:
    """Run ``entry(*args)`` on every rank of ``config``; return rank 0's result.

    * Inside torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): joins the ``env://``
      group (``WORLD_SIZE`` must equal ``config.num_gpus``), runs ``entry`` in this
      process and returns its result on rank 0, None on the others.
    * ``config.num_gpus == 1``: ``entry(*args)`` directly, no process group.
    * Otherwise spawns ``num_gpus`` ranks (``torch.multiprocessing``, "spawn"; ``entry``
      and ``args`` must be picklable), each joining ``tcp://127.0.0.1:<master_port>``
      (a free loopback port when None) with the backend of ``device`` (nccl / hccl /
      gloo) and using ``<type>:<rank>`` as its device; CPU ranks share the cores.
      The first rank to fail ends the run: its exception is raised here (with the rank
      noted), every other rank is terminated.  ``join_timeout_s`` bounds the whole run
      (TimeoutError); ``timeout_s`` is the collectives' timeout (``--dist-timeout``).
      ``forward_signals`` (e.g. SIGTERM): while the ranks run, this process passes each of
      these signals on to rank 0 (which then ends the others itself, as ``mxdit serve`` does)
      instead of acting on it (main thread only).

    Each rank's groups are built with :func:`init_parallel_state` before ``entry`` runs,
    and torn down after.
    """
    backend = backend_for_device(device)
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        out = _run_in_group(entry, config, args, backend=backend, init_method="env://", rank=rank, world=world,
                            device=device, timeout_s=timeout_s, local_rank=int(os.environ["LOCAL_RANK"]))
        return out if rank == 0 else None
    if config.num_gpus == 1:
        return entry(*args)

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = master_port or free_port()
    world = config.num_gpus
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, device, config, entry, args, timeout_s,
                                                results), daemon=True, name=f"mxdit-rank{r}")
             for r in range(world)]
    deadline = None if join_timeout_s is None else time.monotonic() + join_timeout_s
    saved_handlers: dict = {}
    early: list[int] = []  # signals that came before rank 0 existed

    def forward(signum, _frame):
        if procs[0].pid is None:
            early.append(signum)
        elif procs[0].is_alive():
            os.kill(procs[0].pid, signum)

    try:
        if forward_signals and threading.current_thread() is threading.main_thread():
            for sig in forward_signals:
                saved_handlers[sig] = signal.signal(sig, forward)
        for p in procs:
            p.start()
        for signum in early:
            os.kill(procs[0].pid, signum)
        done: dict[int, Any] = {}
        while len(done) < world:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode is not None and p.exitcode != 0:
                        time.sleep(0.5)  # its message may still be in flight
                        if results.empty():
                            raise RankError(f"rank {r} exited with status {p.exitcode} without a result")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} ranks did not finish within {join_timeout_s:.0f} s")
                continue
            if status == "error":
                # a failing rank makes its peers' collectives fail too: take the earliest error
                errors = [(value[3], rank, value)]
                until = time.monotonic() + 1.0
                while time.monotonic() < until:
                    try:
                        r2, s2, v2 = results.get(timeout=0.1)
                    except queue_mod.Empty:
                        continue
                    if s2 == "error":
                        errors.append((v2[3], r2, v2))
                _, rank, value = min(errors, key=lambda e: e[0])
                payload, summary, tb, _ = value
                exc = None
                if payload is not None:
                    try:
                        exc = pickle.loads(payload)
                    except Exception:
                        exc = None
                if not isinstance(exc, Exception):
                    raise RankError(f"rank {rank} failed: {summary}\n{tb}")
                exc.add_note(f"(raised on rank {rank} of {world})")
                raise exc
            done[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=30)
        return done[0]
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        results.close()
