"""The CPU's cache sizes, read from sysfs: what the channel-blocked kernels size their groups by.

Linux describes each cache level of a core in ``/sys/devices/system/cpu/cpu0/cache/index*/``
(files ``level``, ``type`` and ``size``, e.g. "2", "Unified", "2048K"). The kernels in
:mod:`bnlab.kernels.cpu` need two numbers: the private L2 of a core (where one thread's
group of channels should stay between its two passes) and the shared last-level cache.
Where sysfs is missing (macOS, containers that hide it), common sizes stand in, and
``source`` says so.

Serves notebook 04 (and the machine facts of ``make bench``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
# Stand-ins when sysfs says nothing: a typical server core's private L2 and a modest LLC.
FALLBACK_L2 = 1 << 20
FALLBACK_LLC = 32 << 20


class CacheSizes(NamedTuple):
    """Bytes of one core's L2 and of the last-level cache, and where they came from."""

    l2: int
    llc: int
    source: str  # "sysfs" or "fallback"


def parse_size(text: str) -> int:
    """sysfs's size notation ("48K", "2048K", "300M", "1G" or plain bytes) in bytes."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def read_caches(root: Path = SYSFS_CACHE) -> dict[int, int]:
    """{level: bytes} of the data or unified caches listed under ``root`` (empty if none)."""
    sizes: dict[int, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            sizes[level] = max(size, sizes.get(level, 0))
    return sizes


@functools.cache
def cache_sizes(root: Path = SYSFS_CACHE) -> CacheSizes:
    """This machine's L2 (per core) and last-level cache, in bytes, read once.

    Without an L2 entry the fallback L2 is used; the last-level cache is the highest level
    listed (the L2 itself on a machine with two levels).
    """
    sizes = read_caches(root)
    if 2 not in sizes:
        return CacheSizes(FALLBACK_L2, max(sizes.values(), default=FALLBACK_LLC), "fallback")
    return CacheSizes(sizes[2], sizes[max(sizes)], "sysfs")
