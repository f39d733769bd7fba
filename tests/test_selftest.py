"""The kernel's ksm selftest scenarios (tools/testing/selftests/mm/ksm_tests.c), through our API.

Merging is driven with ``ksm.scan()``: a page merges on its second full scan
(the first only records its checksum), so ``ksm.scan(2)`` merges every page
written before it.
"""

from __future__ import annotations

import mmap as stdlib_mmap
import os
import tempfile

import numpy as np
import pytest
from conftest import PAGE, buffer_address, delta, fill, page_pattern, raw_mprotect
from hypothesis import given
from hypothesis import strategies as st

import ksm

COUNTS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "rmap_items", "frames")


def kernel_expected(n: int, m: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for n identical pages with max_page_sharing = m (ksm_tests.c)."""
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def test_kernel_expected_formula() -> None:
    # The values measured on the kernel (docs/kernel-contract.md, "Statistics").
    assert kernel_expected(262144, 256) == (1024, 261120)
    assert kernel_expected(2048, 128) == (16, 2032)


def merge_identical(n: int, m: int) -> None:
    pattern = page_pattern(n)
    with ksm.mmap(n * PAGE) as buf:
        buf[:] = pattern * n
        buf.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        ksm.scan(2)
        after = ksm.stats()
        d = delta(before, after, *COUNTS)
        shared, sharing = kernel_expected(n, m)
        assert (d["pages_shared"], d["pages_sharing"]) == (shared, sharing)
        # Pages left out of a full KSM page wait in the unstable tree.
        assert d["pages_unshared"] == n - shared - sharing
        assert d["rmap_items"] == n
        # Every frame holding bytes is a shared page's, or held back (fork, vanished
        # mapping); earlier tests may release held frames during these scans.
        assert after["frames"] == after["pages_shared"] + after["deferred_frames"] + after["suspect_frames"]
        merged = sum(buf.page_state(i * PAGE) == "merged" for i in range(n))
        assert merged == shared + sharing
        with memoryview(buf) as view:
            for i in range(n):
                assert view[i * PAGE : (i + 1) * PAGE] == pattern, f"page {i} changed"


@pytest.mark.parametrize("n", [10, 257, 1000])
def test_identical_pages_merge_like_the_kernel(n: int) -> None:
    assert ksm.ksmd.max_page_sharing == 256
    merge_identical(n, 256)


@given(n=st.integers(1, 200), m=st.sampled_from([2, 3, 4, 7, 16, 256]))
def test_identical_pages_follow_max_page_sharing(n: int, m: int) -> None:
    ksm.ksmd.max_page_sharing = m
    try:
        merge_identical(n, m)
    finally:
        ksm.ksmd.max_page_sharing = 256


def test_merge_is_on_the_second_full_scan() -> None:
    with ksm.mmap(4 * PAGE) as buf:
        buf[:] = page_pattern(1) * 4
        buf.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        ksm.scan(1)
        assert delta(before, ksm.stats(), "pages_sharing", "pages_volatile") == {
            "pages_sharing": 0,
            "pages_volatile": 4,
        }
        assert buf.page_state(0) == "volatile"
        ksm.scan(1)
        assert delta(before, ksm.stats(), "pages_shared", "pages_sharing") == {
            "pages_shared": 1,
            "pages_sharing": 3,
        }
        assert {buf.page_state(i * PAGE) for i in range(4)} == {"merged"}


def test_merged_pages_written_differently_unmerge() -> None:
    pattern = page_pattern(7)
    with ksm.mmap(2 * PAGE) as buf:
        before = ksm.stats()
        buf[:] = pattern * 2
        buf.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        d = delta(before, ksm.stats(), "pages_shared", "pages_sharing")
        assert d == {"pages_shared": 1, "pages_sharing": 1}
        buf[0:PAGE] = b"\x11" * PAGE
        buf[PAGE : 2 * PAGE] = b"\x22" * PAGE
        ksm.scan(1)
        after = ksm.stats()
        assert delta(before, after, "pages_shared", "pages_sharing", "frames") == {
            "pages_shared": 0,
            "pages_sharing": 0,
            "frames": 0,
        }
        assert after["cows"] - before["cows"] == 2
        assert buf[0:PAGE] == b"\x11" * PAGE
        assert buf[PAGE : 2 * PAGE] == b"\x22" * PAGE
        assert buf.page_state(0) != "merged"
        assert buf.page_state(PAGE) != "merged"


@pytest.mark.parametrize("n", [1, 100])
def test_unique_pages_never_merge(n: int) -> None:
    pages = [page_pattern(1000 + i) for i in range(n)]
    with ksm.mmap(n * PAGE) as buf:
        fill(buf, pages)
        buf.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        ksm.scan(2)
        d = delta(before, ksm.stats(), *COUNTS, "merges")
        assert d == {
            "pages_shared": 0,
            "pages_sharing": 0,
            "pages_unshared": n,
            "pages_volatile": 0,
            "rmap_items": n,
            "frames": 0,
            "merges": 0,
        }
        ksm.scan(2)
        d = delta(before, ksm.stats(), "pages_shared", "pages_sharing", "pages_unshared", "merges")
        assert d == {"pages_shared": 0, "pages_sharing": 0, "pages_unshared": n, "merges": 0}
        # Smart scan (on by default): the 5th visit of a page that never merged skips
        # it, which takes it out of the unstable tree (docs/kernel-contract.md, "Smart scan").
        ksm.scan(1)
        d = delta(before, ksm.stats(), "pages_unshared", "pages_skipped", "merges")
        assert d == {"pages_unshared": 0, "pages_skipped": n, "merges": 0}
        for i, p in enumerate(pages):
            assert buf[i * PAGE : (i + 1) * PAGE] == p


def test_never_written_pages_are_not_merged() -> None:
    # The kernel only scans present anonymous pages: never-touched pages and pages
    # that only map the shared zero page (read, never written) use no memory of their
    # own, so they get no rmap_item and never merge (folio_walk_start skips the zero page).
    with ksm.mmap(8 * PAGE) as buf:
        buf.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        ksm.scan(2)
        assert delta(before, ksm.stats(), *COUNTS) == dict.fromkeys(COUNTS, 0)
        assert bytes(buf[:]) == bytes(8 * PAGE)  # maps the zero page now
        ksm.scan(2)
        assert delta(before, ksm.stats(), *COUNTS) == dict.fromkeys(COUNTS, 0)
        assert {buf.page_state(i * PAGE) for i in range(8)} == {"unmerged"}


def test_zero_filled_written_pages_merge() -> None:
    # Pages written with zeros are real anonymous pages: they merge like any others.
    with ksm.mmap(6 * PAGE) as buf:
        buf[:] = bytes(6 * PAGE)
        buf.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        ksm.scan(2)
        assert delta(before, ksm.stats(), "pages_shared", "pages_sharing") == {
            "pages_shared": 1,
            "pages_sharing": 5,
        }
        assert bytes(buf[:]) == bytes(6 * PAGE)


def test_read_only_memory_merges() -> None:
    n = 16
    pattern = page_pattern(42)
    m = stdlib_mmap.mmap(-1, n * PAGE, flags=stdlib_mmap.MAP_PRIVATE | stdlib_mmap.MAP_ANONYMOUS)
    try:
        m[:] = pattern * n
        addr = buffer_address(m)
        raw_mprotect(addr, n * PAGE, stdlib_mmap.PROT_READ)
        before = ksm.stats()
        ksm.madvise(addr, n * PAGE, ksm.MADV_MERGEABLE)
        ksm.scan(2)
        d = delta(before, ksm.stats(), "pages_shared", "pages_sharing", "frames")
        assert d == {"pages_shared": 1, "pages_sharing": n - 1, "frames": 1}
        assert m[:] == pattern * n
        ksm.madvise(addr, n * PAGE, ksm.MADV_UNMERGEABLE)
        assert delta(before, ksm.stats(), "pages_shared", "pages_sharing", "frames") == {
            "pages_shared": 0,
            "pages_sharing": 0,
            "frames": 0,
        }
        assert m[:] == pattern * n
        # Still read-only after unmerging: mprotect back, then writable again.
        raw_mprotect(addr, n * PAGE, stdlib_mmap.PROT_READ | stdlib_mmap.PROT_WRITE)
        m[0:4] = b"abcd"
        assert m[0:4] == b"abcd"
    finally:
        m.close()


def test_bytearray_pages_merge() -> None:
    n = 32
    pattern = page_pattern(3)
    ba = bytearray((n + 1) * PAGE)
    base = buffer_address(ba)
    first = -base % PAGE  # offset of the first page-aligned byte
    addr = base + first
    for i in range(n):
        ba[first + i * PAGE : first + (i + 1) * PAGE] = pattern
    before = ksm.stats()
    ksm.madvise(addr, n * PAGE, ksm.MADV_MERGEABLE)
    try:
        ksm.scan(2)
        d = delta(before, ksm.stats(), "pages_shared", "pages_sharing", "advised_pages")
        assert d == {"pages_shared": 1, "pages_sharing": n - 1, "advised_pages": n}
        assert ba[first : first + n * PAGE] == pattern * n
        # Writing a merged page gives it a private copy; the others keep the shared one.
        ba[first + 5 * PAGE] = 0
        assert ba[first + 5 * PAGE] == 0
        assert ba[first + 5 * PAGE + 1 : first + 6 * PAGE] == pattern[1:]
        assert ba[first + 6 * PAGE : first + n * PAGE] == pattern * (n - 6)
        ksm.scan(1)
        after = ksm.stats()
        assert after["cows"] - before["cows"] == 1
        assert after["pages_sharing"] - before["pages_sharing"] == n - 2
    finally:
        ksm.madvise(addr, n * PAGE, ksm.MADV_UNMERGEABLE)
    assert delta(before, ksm.stats(), "pages_shared", "pages_sharing", "advised_pages") == {
        "pages_shared": 0,
        "pages_sharing": 0,
        "advised_pages": 0,
    }
    assert ba[first + 6 * PAGE : first + n * PAGE] == pattern * (n - 6)


def test_numpy_array_from_ksm_merges() -> None:
    rows = 64
    before = ksm.stats()
    a = ksm.zeros((rows, PAGE // 8), dtype=np.uint64)
    assert a.shape == (rows, PAGE // 8)
    assert not a.any()
    a[:] = 0x0123456789ABCDEF
    ksm.scan(2)
    d = delta(before, ksm.stats(), "pages_shared", "pages_sharing")
    assert d == {"pages_shared": 1, "pages_sharing": rows - 1}
    assert (a == 0x0123456789ABCDEF).all()
    a[7, 3] = 5
    assert a[7, 3] == 5
    assert (a[6] == 0x0123456789ABCDEF).all()
    assert int((a != 0x0123456789ABCDEF).sum()) == 1
    del a  # frees the ksm.mmap behind it


def test_plain_numpy_array_merges() -> None:
    n = 32
    a = np.full((n + 1) * PAGE // 8, 77, dtype=np.int64)
    first = -a.ctypes.data % PAGE
    addr = a.ctypes.data + first
    before = ksm.stats()
    ksm.madvise(addr, n * PAGE, ksm.MADV_MERGEABLE)
    try:
        ksm.scan(2)
        d = delta(before, ksm.stats(), "pages_shared", "pages_sharing")
        assert d == {"pages_shared": 1, "pages_sharing": n - 1}
        assert (a == 77).all()
        a[first // 8 + 10] = -1
        assert int((a != 77).sum()) == 1
    finally:
        ksm.madvise(addr, n * PAGE, ksm.MADV_UNMERGEABLE)
    assert int((a != 77).sum()) == 1


def test_kernel_reads_and_writes_merged_pages() -> None:
    # read(2) into merged pages copies them on write inside the kernel; write(2) from
    # merged pages reads the shared frame.
    a, new = page_pattern(60), page_pattern(61)
    with ksm.mmap(4 * PAGE) as m:
        m[:] = a * 4
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert {m.page_state(i * PAGE) for i in range(4)} == {"merged"}
        before = ksm.stats()
        r, w = os.pipe()
        try:
            with memoryview(m) as view:
                assert os.write(w, view[2 * PAGE : 2 * PAGE + 100]) == 100
            assert os.read(r, 100) == a[:100]
        finally:
            os.close(r)
            os.close(w)
        with tempfile.TemporaryFile() as f:
            f.write(new * 2)
            f.seek(0)
            with memoryview(m) as view:
                assert f.readinto(view[PAGE : 3 * PAGE]) == 2 * PAGE
        assert m[:] == a + new + new + a
        ksm.scan(1)
        d = delta(before, ksm.stats(), "cows", "pages_sharing")
        assert d == {"cows": 2, "pages_sharing": -2}
