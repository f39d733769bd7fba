"""Reproducers for the documented limitations (README "Limitations"; issue 5, item 6).

Each test states the kernel's behaviour and is marked ``xfail(strict=True)`` while
ksm does not match it, so that a fix shows up as an XPASS to turn into a plain test.
Only what is testable from Python, deterministically, is here: in-flight DMA into
a page being merged (pinned pages) and the EFAULT of user-mode-only userfaultfd
need a race inside the merge window.
"""

from __future__ import annotations

import ctypes

from conftest import PAGE, page_pattern, raw_mmap, raw_munmap

import ksm


def test_new_memory_at_an_unmapped_advised_address_is_not_advised() -> None:
    # The kernel keeps VM_MERGEABLE on the VMA: memory mapped where advised memory was
    # unmapped is a new VMA, not mergeable until advised. ksm follows /proc/self/maps
    # once per full scan and sees the same address, protection and kind.
    base = raw_mmap(4 * PAGE)
    try:
        ctypes.memmove(base, page_pattern(3) * 4, 4 * PAGE)
        ksm.madvise(base, 4 * PAGE, ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert ksm.stats()["pages_sharing"] == 3
        raw_munmap(base, 4 * PAGE)
        assert raw_mmap(4 * PAGE, fixed=base) == base  # new memory, never advised
        ctypes.memmove(base, page_pattern(7) * 4, 4 * PAGE)
        ksm.scan(3)
        assert ctypes.string_at(base, 4 * PAGE) == page_pattern(7) * 4  # no byte is lost either way
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"], s["advised_pages"]) == (0, 0, 0)
    finally:
        ksm.madvise(base, 4 * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(base, 4 * PAGE)
