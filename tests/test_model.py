"""Stateful model test: any sequence of write/read/madvise/scan/fork keeps the contents.

A ``ksm.mmap`` of a few pages is checked against a ``bytearray`` model after
every step. Pages are mostly written whole from a small set of patterns, so
that merges (and copies on write of merged pages) happen all the time.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from conftest import PAGE, Child, page_pattern
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ksm

NPAGES = 6
PATTERNS = [page_pattern(i) for i in range(3)] + [bytes(PAGE)]
KERNEL_STATS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")

pages = st.integers(0, NPAGES - 1)
offsets = st.integers(0, NPAGES * PAGE - 1)


class KsmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = ksm.mmap(NPAGES * PAGE)
        self.model = bytearray(NPAGES * PAGE)
        self.advised = [False] * NPAGES

    def teardown(self) -> None:
        self.m.close()

    @initialize(
        start=st.lists(st.sampled_from(PATTERNS), min_size=NPAGES, max_size=NPAGES),
        advise=st.booleans(),
    )
    def start(self, start: list[bytes], advise: bool) -> None:
        # Every page is written (a page that only maps the shared zero page is never
        # merged, see test_selftest), and usually advised, so that merging starts early.
        self.m[:] = self.model[:] = b"".join(start)
        if advise:
            self.m.madvise(ksm.MADV_MERGEABLE)
            self.advised = [True] * NPAGES

    # ---- rules ----------------------------------------------------------------------

    @rule(page=pages, pattern=st.sampled_from(PATTERNS))
    def write_page(self, page: int, pattern: bytes) -> None:
        self.m[page * PAGE : (page + 1) * PAGE] = pattern
        self.model[page * PAGE : (page + 1) * PAGE] = pattern

    @rule(offset=offsets, data=st.binary(min_size=1, max_size=64))
    def write_bytes(self, offset: int, data: bytes) -> None:
        data = data[: NPAGES * PAGE - offset]
        self.m[offset : offset + len(data)] = data
        self.model[offset : offset + len(data)] = data

    @rule(offset=offsets, length=st.integers(1, 2 * PAGE))
    def read(self, offset: int, length: int) -> None:
        assert self.m[offset : offset + length] == bytes(self.model[offset : offset + length])

    @rule(
        first=pages,
        count=st.integers(1, NPAGES),
        merge=st.sampled_from([True, True, False]),
        whole=st.booleans(),
    )
    def madvise(self, first: int, count: int, merge: bool, whole: bool) -> None:
        count = min(count, NPAGES - first)
        advice = ksm.MADV_MERGEABLE if merge else ksm.MADV_UNMERGEABLE
        if whole:
            ksm.madvise(self.m.address + first * PAGE, count * PAGE, advice)
        else:
            self.m.madvise(advice, first * PAGE, count * PAGE)
        for p in range(first, first + count):
            self.advised[p] = merge
        if not merge:
            for p in range(first, first + count):
                assert self.m.page_state(p * PAGE) == "unmerged"

    @rule(n=st.integers(1, 3))
    def scan(self, n: int) -> None:
        ksm.scan(n)

    @rule()
    def settle(self) -> None:
        # Two full scans with no write in between: every advised page is stable now,
        # so each one whose content another advised page has too must be merged
        # (max_page_sharing is far away). Smart scan would skip pages that were
        # unique for a while (as the kernel's does) for up to 8 more scans: off here.
        ksm.ksmd.smart_scan = 0
        ksm.scan(2)
        ksm.ksmd.smart_scan = 1
        content = [bytes(self.model[p * PAGE : (p + 1) * PAGE]) for p in range(NPAGES)]
        advised = [p for p in range(NPAGES) if self.advised[p]]
        for p in advised:
            if sum(content[q] == content[p] for q in advised) >= 2:
                assert self.m.page_state(p * PAGE) == "merged", f"page {p}"

    @rule()
    def fork(self) -> None:
        m, model = self.m, bytes(self.model)

        def child(conn: Connection) -> bool:
            ok = m[:] == model
            m[0 : NPAGES * PAGE] = bytes(NPAGES * PAGE)  # the child's writes stay its own
            return ok and ksm.stats()["rmap_items"] == 0

        assert Child(child).finish(), "the child saw different contents"

    # ---- invariants -----------------------------------------------------------------

    @invariant()
    def contents_match_the_model(self) -> None:
        assert self.m[:] == bytes(self.model)

    @invariant()
    def statistics_are_consistent(self) -> None:
        s = ksm.stats()
        assert sum(s[k] for k in KERNEL_STATS) == s["rmap_items"], s
        assert min(s[k] for k in KERNEL_STATS) >= 0
        assert s["frames"] >= s["pages_shared"]
        assert s["pages_sharing"] <= s["pages_shared"] * (ksm.ksmd.max_page_sharing - 1)
        assert s["rmap_items"] <= s["advised_pages"] <= s["tracked_pages"]

    @invariant()
    def unadvised_pages_are_never_merged(self) -> None:
        for p in range(NPAGES):
            if not self.advised[p]:
                assert self.m.page_state(p * PAGE) == "unmerged", f"page {p}"


TestKsmMachine = KsmMachine.TestCase
