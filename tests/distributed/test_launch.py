"""bnlab.distributed.launch: values come back by rank; a failure or a timeout kills every child."""

from __future__ import annotations

import os
import time

import pytest

from bnlab.distributed import launch

psutil = pytest.importorskip("psutil")


def _gone(pids: list[int]) -> bool:
    """Every pid dead and reaped (or reused by a process that is not our child)."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    return all(not psutil.pid_exists(pid) or pid not in mine for pid in pids)


def test_run_returns_each_ranks_value_in_rank_order(monkeypatch):
    import socket

    with socket.socket() as taken:  # a port "free" a moment ago, taken since by another run
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(launch, "free_port", lambda: taken.getsockname()[1], raising=False)
        found = launch.run(2, launch.rank_and_size, timeout=60)
    assert [(rank, size) for rank, size, _pid in found] == [(0, 2), (1, 2)]
    pids = [pid for *_, pid in found]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert _gone(pids)


def test_a_failing_rank_kills_the_group_and_its_traceback_comes_back():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError, match="rank 1 fails on purpose") as info:
        launch.run(2, "bnlab.distributed.launch:fail_on", 1, timeout=60)
    assert info.value.rank == 1
    assert "Traceback" in info.value.details and "fail_on" in info.value.details
    assert len(info.value.pids) == 2 and _gone(info.value.pids)
    assert time.monotonic() - start < 45  # not the collective's 60 s timeout


def test_a_timeout_kills_the_group():
    start = time.monotonic()
    with pytest.raises(launch.GroupTimeout, match="did not finish within 3") as info:
        launch.run(2, launch.sleep, 60, timeout=3)
    assert time.monotonic() - start < 20
    assert _gone(info.value.pids)


@pytest.mark.parametrize(
    "fn",
    [lambda: 0, "tests.helpers:images", "bnlab.distributed.launch:no_such_worker", os.getpid],
)
def test_functions_a_child_cannot_import_by_name_are_refused_before_spawning(fn):
    with pytest.raises((ValueError, AttributeError)):
        launch.run(2, fn, timeout=5)


def test_the_rendezvous_port_is_held_from_its_choice_to_the_end_of_the_run():
    """The parent binds port 0 and keeps the socket: a parallel run cannot take the port
    between its choice and its use, as it could when a port was read, released and bound."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    store = launch.rendezvous(timeout=10)
    with socket.socket() as other, pytest.raises(OSError):  # another program's attempt
        other.bind(("127.0.0.1", store.port))
    rank = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    rank.set("hello", "rank")
    assert store.get("hello") == b"rank"


@pytest.mark.parametrize(
    "platform, interfaces, loopback",
    [
        ("linux", [(1, "lo"), (2, "eth0")], "lo"),
        ("darwin", [(1, "lo0"), (2, "en0")], "lo0"),
        ("darwin", [], "lo0"),  # none listed: the platform's usual name
        ("linux", [], "lo"),
    ],
)
def test_gloo_talks_over_the_loopback_interface_of_this_platform(
    monkeypatch, platform, interfaces, loopback
):
    monkeypatch.setattr(launch.socket, "if_nameindex", lambda: interfaces)
    monkeypatch.setattr(launch.sys, "platform", platform)
    assert launch.loopback_interface() == loopback
