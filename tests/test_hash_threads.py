"""``ksmd.hash_threads``: a scan's pages read and hashed on several threads.

With more than one thread, each batch takes the checksums its visits would take
ahead of them, spread over the threads; merging must come out exactly as with one
thread (each page hashed at its visit), on memory ksm owns and on memory it does not.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from mmap import PROT_READ, PROT_WRITE
from typing import Any

import pytest
from conftest import PAGE, available_cores, page_pattern, raw_mmap, raw_mprotect, raw_munmap

import ksm

PROT_NONE = 0

# The statistics a scan's decisions determine (not the process's VMAs or allocations).
DECIDED = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "rmap_items",
    "frames",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)
# Cumulative ones, compared as the change over a run.
COUNTED = ("full_scans", "pages_scanned", "pages_skipped", "merges", "merge_failures", "pages_hashed", "cows")


def test_hash_threads_defaults_to_the_available_cores_and_takes_1_to_1024() -> None:
    assert ksm.ksmd.hash_threads == available_cores()
    for good in (1, 2, 1024):
        ksm.ksmd.hash_threads = good
        assert ksm.ksmd.hash_threads == good


@pytest.mark.parametrize("bad", [0, -1, 1025, 2**32, -(2**63)])
def test_hash_threads_out_of_range_is_refused_and_the_old_value_kept(bad: int) -> None:
    ksm.ksmd.hash_threads = 3
    with pytest.raises(ValueError) as info:
        ksm.ksmd.hash_threads = bad
    msg = str(info.value)
    # What was wrong, and what is accepted.
    assert msg.startswith("hash_threads must be an integer from 1 to 1024"), msg
    assert f"the default is the {available_cores()} cores available" in msg, msg
    assert msg.endswith(f"got {bad}"), msg
    assert ksm.ksmd.hash_threads == 3


@pytest.mark.parametrize("bad", ["2", 2.0, None, True, b"2"])
def test_hash_threads_of_the_wrong_type_is_a_type_error(bad: Any) -> None:
    ksm.ksmd.hash_threads = 3
    with pytest.raises(TypeError, match="hash_threads"):
        ksm.ksmd.hash_threads = bad
    assert ksm.ksmd.hash_threads == 3


def unique(i: int) -> bytes:
    return page_pattern(100_000 + i)


@contextmanager
def foreign(pages: int) -> Iterator[int]:
    """``pages`` of memory ksm does not own, unadvised and unmapped afterwards."""
    base = raw_mmap(pages * PAGE)
    try:
        yield base
    finally:
        ksm.madvise(base, pages * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(base, pages * PAGE)


def scan_history(threads: int) -> tuple[dict[str, int], list[str], list[bytes]]:
    """The same merging work on ``threads`` hash threads: owned and foreign memory with
    copies (one page differing inside a copy), unique pages, zero pages and
    inaccessible pages, written between scans, merged pages included. Returns the
    statistics it leaves, the owned pages' states and a digest of every page."""
    ksm.ksmd.hash_threads = threads
    ksm.ksmd.use_zero_pages = 1
    n = 1100  # a copy: windows of 2048 checksums ahead give each of 2 threads >= 1024 pages
    before = ksm.stats()
    with ksm.mmap((3 * n + 600) * PAGE) as m, foreign(2 * n + 600) as base:
        for copy in range(3):
            for i in range(n):
                m[(copy * n + i) * PAGE : (copy * n + i + 1) * PAGE] = unique(i)
        m[(n + 5) * PAGE : (n + 6) * PAGE] = unique(99_999)  # copy 1 differs at page 5
        for i in range(400):
            m[(3 * n + i) * PAGE : (3 * n + i + 1) * PAGE] = unique(10_000 + i)
        for i in range(3 * n + 400, 3 * n + 600):
            m[i * PAGE] = 0  # pages of zeros, present
        for copy in range(2):
            for i in range(n):
                ctypes.memmove(base + (copy * n + i) * PAGE, unique(i), PAGE)
        for i in range(600):
            ctypes.memmove(base + (2 * n + i) * PAGE, unique(20_000 + i if i < 590 else 7), PAGE)
        # Four inaccessible pages, two alike (read through /proc/self/mem).
        raw_mprotect(base + (2 * n + 590) * PAGE, 4 * PAGE, PROT_NONE)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.madvise(base, (2 * n + 600) * PAGE, ksm.MADV_MERGEABLE)
        ksm.scan(1)
        m[(2 * n + 40) * PAGE : (2 * n + 41) * PAGE] = unique(41)  # copy 2 page 40 = page 41
        ctypes.memmove(base + (n + 70) * PAGE, unique(20_000), PAGE)  # = a unique page
        ksm.scan(2)
        m[3 * PAGE] = 1  # merged pages written: copies on write
        ctypes.memset(base + (n + 200) * PAGE, 2, 1)
        m[(3 * n + 10) * PAGE : (3 * n + 11) * PAGE] = unique(5)
        ksm.scan(6)  # smart scan skips what never merges
        after = ksm.stats()
        states = [m.page_state(i * PAGE) for i in range(3 * n + 600)]
        raw_mprotect(base + (2 * n + 590) * PAGE, 4 * PAGE, PROT_READ | PROT_WRITE)
        digests = [hashlib.sha1(m[i * PAGE : (i + 1) * PAGE]).digest() for i in range(3 * n + 600)]
        digests += [
            hashlib.sha1(ctypes.string_at(base + i * PAGE, PAGE)).digest() for i in range(2 * n + 600)
        ]
        m.madvise(ksm.MADV_UNMERGEABLE)
    stats = {k: after[k] for k in DECIDED} | {k: after[k] - before[k] for k in COUNTED}
    return stats, states, digests


def test_merging_is_the_same_on_one_and_on_two_hash_threads() -> None:
    one = scan_history(1)
    two = scan_history(2)
    assert one[0] == two[0]
    assert one[1] == two[1]
    assert one[2] == two[2]
    s = one[0]
    assert s["pages_sharing"] > 2 * 1100 and s["ksm_zero_pages"] == 200, s
    assert s["cows"] >= 2 and s["merge_failures"] == 0, s
    assert set(one[1]) >= {"merged", "unshared", "zero"}, set(one[1])
