"""Fault injection: system calls fail halfway through
merging and unmerging; no write may be lost, no page corrupted, no frame leaked,
and errors surface only where the API promises them (EAGAIN from unmerge).

``ksm._ksm._inject(point, every, errno)`` makes every ``every``-th call at a point
of the sys layer fail. Each case merges and unmerges owned and foreign memory
under that failure, writes between scans, and checks every byte against a model.
"""

from __future__ import annotations

import ctypes
import errno
import random
from collections.abc import Iterator

import pytest
from conftest import PAGE, page_pattern, raw_mmap, raw_munmap

import ksm
from ksm import _ksm

CASES = [
    ("map_fixed", errno.ENOMEM),
    ("move_over", errno.ENOMEM),
    ("anonymous", errno.ENOMEM),
    ("register", errno.ENOMEM),
    ("writeprotect", errno.ENOMEM),
    ("writeprotect", errno.EAGAIN),
    ("continue", errno.EAGAIN),
    ("punch", errno.EIO),
    ("read_foreign", errno.EFAULT),
]
NPAGES = 48


@pytest.fixture
def no_injection() -> Iterator[None]:
    yield
    for point in {p for p, _ in CASES}:
        _ksm._inject(point, 0, 0)


def advise_retrying(address: int, length: int) -> None:
    """MADV_MERGEABLE until it succeeds (EAGAIN is its documented temporary failure)."""
    for _ in range(50):
        try:
            ksm.madvise(address, length, ksm.MADV_MERGEABLE)
            return
        except OSError as e:
            assert e.errno == errno.EAGAIN, e
    raise AssertionError("MADV_MERGEABLE never succeeded")


def unmerge_retrying(address: int, length: int, point: str) -> int:
    """MADV_UNMERGEABLE, retried on EAGAIN (the only error it may give); after a few
    refusals the failures stop (a failure at every few calls can refuse a long run
    every time), and then it must succeed. Returns the refusals."""
    refusals = 0
    while True:
        try:
            ksm.madvise(address, length, ksm.MADV_UNMERGEABLE)
            return refusals
        except OSError as e:
            assert e.errno == errno.EAGAIN, e
            refusals += 1
            if refusals == 5:
                _ksm._inject(point, 0, 0)
            assert refusals < 10, "unmerge failed with nothing injected"


@pytest.mark.usefixtures("no_injection")
@pytest.mark.parametrize(("point", "err"), CASES, ids=[f"{p}-{errno.errorcode[e]}" for p, e in CASES])
@pytest.mark.parametrize("every", [2, 5])
def test_failures_lose_nothing(point: str, err: int, every: int) -> None:
    rng = random.Random(f"{point}{err}{every}")
    patterns = [page_pattern(700 + i) for i in range(4)]
    owned = ksm.mmap(NPAGES * PAGE)
    foreign = raw_mmap(NPAGES * PAGE)
    model = {a: bytearray() for a in (owned.address, foreign)}
    try:
        for k, base in enumerate(model):
            # Contents both regions share, and one of each region's own: unmerging either
            # region then frees frames (frames freed by one unmerge are punched together).
            own = [page_pattern(710 + k)]
            data = b"".join(rng.choice(patterns + own) for _ in range(NPAGES))
            ctypes.memmove(base, data, len(data))
            model[base] = bytearray(data)
        fired = _ksm._injected()
        _ksm._inject(point, every, err)
        for base in model:
            advise_retrying(base, NPAGES * PAGE)
        for _ in range(4):
            ksm.scan(1)
            for base, m in model.items():
                # Writes between scans: into merged pages (copy on write) and others.
                for _ in range(4):
                    off = rng.randrange(NPAGES * PAGE)
                    b = rng.randrange(256)
                    ctypes.memset(base + off, b, 1)
                    m[off] = b
                assert ctypes.string_at(base, NPAGES * PAGE) == bytes(m), "a byte changed"
        for base in model:
            unmerge_retrying(base, NPAGES * PAGE, point)
        _ksm._inject(point, 0, 0)
        injected = _ksm._injected() - fired
        if every == 2:  # (rare calls, such as punching freed frames, may not reach 5)
            assert injected > 0, "nothing was injected: the case tests nothing"
        for base, m in model.items():
            assert ctypes.string_at(base, NPAGES * PAGE) == bytes(m), "a byte changed"
        assert all(owned.page_state(i * PAGE) == "unmerged" for i in range(NPAGES))
        s = ksm.stats()
        assert s["frames"] == s["pages_shared"] + s["deferred_frames"] + s["suspect_frames"], s
    finally:
        _ksm._inject(point, 0, 0)
        unmerge_retrying(foreign, NPAGES * PAGE, point)
        raw_munmap(foreign, NPAGES * PAGE)
        owned.close()
    # Everything released: no frame is left referenced by these regions.
    ksm.scan(1)
    s = ksm.stats()
    assert s["pages_shared"] == 0 and s["pages_sharing"] == 0, s
