"""Spawn a local process group, run one bnlab function on every rank, collect the results.

:func:`run` is what notebooks and tests use to try distributed code on one machine:

- ``world_size`` processes started with torch.multiprocessing's "spawn" method (a fresh
  interpreter each, as on a cluster; no fork of a process that holds threads);
- the group's rendezvous, a ``torch.distributed.TCPStore``, served by the calling process on
  a port of 127.0.0.1 that the system picks (port 0) and held for the whole run, so no other
  program can take the port between its choice and its use; the ranks join it as clients;
- gloo on the loopback interface (GLOO_SOCKET_IFNAME ``lo`` on Linux, ``lo0`` on macOS,
  unless already set) and a bounded ``init_process_group(timeout=...)`` so no collective
  waits forever;
- each rank's return value comes back through a multiprocessing queue, in rank order;
- on the first error, or when ``timeout`` passes, every child is killed (none is left
  behind) and the error is raised in the caller with the failing rank's traceback text.

The function to run is named by a string ("bnlab.distributed.equality:equality_worker") or
passed as a function defined at the top level of a bnlab module: a spawned process imports
it by name, so a function defined in a notebook, a test or a local scope cannot be used.
:func:`rank_and_size`, :func:`fail_on` and :func:`sleep` are small workers to try it with.

Serves notebook 09.
"""

from __future__ import annotations

import importlib
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank raised (or died): carries its rank, its traceback text and every child's pid."""

    def __init__(self, rank: int, details: str, pids: list[int]) -> None:
        super().__init__(f"rank {rank} of the spawned group failed:\n{details}")
        self.rank, self.details, self.pids = rank, details, pids


class GroupTimeout(TimeoutError):
    """The group did not finish in time; every child has been killed (``pids``)."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


def loopback_interface() -> str:
    """The loopback interface's name, for GLOO_SOCKET_IFNAME: ``lo`` on Linux, ``lo0`` on macOS."""
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:  # no interface list on this system: go by the platform's usual name
        names = []
    for name in names:
        if name in ("lo", "lo0"):
            return name
    return "lo0" if sys.platform == "darwin" else "lo"


def rendezvous(timeout: float) -> dist.TCPStore:
    """The group's TCPStore, served by this process on 127.0.0.1 at a port the system picks.

    Binding port 0 and keeping the socket is what makes the port safe: a port read from a
    released socket can be taken by another program before rank 0 binds it again.
    """
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
    )


def target_name(fn: str | Callable) -> str:
    """'module:function' for a bnlab function or a name; raise for what a child cannot import."""
    if isinstance(fn, str):
        name = fn if ":" in fn else ":".join(fn.rsplit(".", 1))
    else:
        name = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
    module, _, qualname = name.partition(":")
    if module.split(".")[0] != "bnlab" or not qualname or "<" in qualname:
        raise ValueError(
            f"run() needs a function defined at the top level of a bnlab module (got {name!r}): "
            "a spawned process imports it by name, so functions defined in a notebook, a test "
            "or inside another function cannot be used; put the worker in bnlab, e.g. "
            "bnlab/distributed/equality.py"
        )
    resolve(name)  # fail here, in the caller, if the name is wrong
    return name


def resolve(name: str) -> Callable:
    """The function named 'module:qualname'."""
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(rank, world_size, port, name, args, kwargs, results, timeout, backend, threads):
    """One rank: join the group, run the function, report (value or traceback), leave."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    torch.set_num_threads(threads)
    try:
        limit = timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=limit)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=limit
        )
        value = resolve(name)(*args, **kwargs)
        dist.barrier()  # no rank leaves while another still talks to it
        results.put((rank, True, value))
    except BaseException:  # noqa: B036 - report everything, SystemExit included
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # the report is in the pipe before this rank's sockets close
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: list, grace: float) -> None:
    """Wait up to ``grace`` seconds for the children, then terminate, then kill the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def run(
    world_size: int,
    fn: str | Callable,
    *args,
    timeout: float = 120.0,
    backend: str = "gloo",
    threads: int = 1,
    **kwargs,
) -> list:
    """Run ``fn(*args, **kwargs)`` on each rank of a fresh group; return the values by rank.

    world_size: how many processes; fn: a top-level bnlab function, or its name as
    "module:function"; timeout: seconds for the whole run (start-up included), also each
    collective's limit; threads: torch threads per process (1: the ranks share the cores).
    Raises WorkerError (the first rank to fail, with its traceback) or GroupTimeout; either
    way, and on KeyboardInterrupt, every child is dead when it returns.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive int (got {world_size!r})")
    name = target_name(fn)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = rendezvous(timeout)  # held until this function returns
    port = store.port
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, name, args, kwargs, results, timeout, backend, threads),
            daemon=True,
            name=f"bnlab-rank-{rank}",
        )
        for rank in range(world_size)
    ]
    values: dict[int, Any] = {}
    failed = True
    try:
        for p in procs:
            p.start()
        pids = [p.pid for p in procs]
        deadline = time.monotonic() + timeout
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world_size) if r not in values]
                raise GroupTimeout(
                    f"{name} on {world_size} ranks did not finish within {timeout} s (ranks "
                    f"{missing} still running); every child process has been killed",
                    pids,
                )
            try:
                rank, ok, payload = results.get(timeout=min(0.2, left))
            except queue_module.Empty:
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if r not in values and p.exitcode not in (None, 0)
                ]
                if dead and results.empty():
                    rank, code = dead[0]
                    raise WorkerError(
                        rank, f"exited with code {code} without a report", pids
                    ) from None
                continue
            if not ok:
                raise WorkerError(rank, payload, pids)
            values[rank] = payload
        failed = False
    finally:
        _stop(procs, grace=10.0 if not failed else 0.0)
        results.close()
        results.cancel_join_thread()
    return [values[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------
# Small workers, to try the launcher with
# ---------------------------------------------------------------------------------


def rank_and_size() -> tuple[int, int, int]:
    """(rank, world size, pid) of the calling process, after one all_reduce as a handshake."""
    t = torch.ones(1)
    dist.all_reduce(t)
    assert int(t.item()) == dist.get_world_size()
    return dist.get_rank(), dist.get_world_size(), os.getpid()


def fail_on(rank: int) -> int:
    """Raise on ``rank``; the other ranks wait in an all_reduce that the failure never joins."""
    if dist.get_rank() == rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def sleep(seconds: float) -> int:
    """Sleep, then return the rank: a group that outlives a short timeout."""
    time.sleep(seconds)
    return dist.get_rank()
