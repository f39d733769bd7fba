"""Stateful model test: any sequence of operations keeps every byte.

Several regions live at once, owned (``ksm.mmap``) and foreign (stdlib
``mmap.mmap(-1, n)``, advised with ``ksm.madvise``), each checked against a
``bytearray`` model after every step. Rules: create and close regions (a
foreign region is unmapped advised or unadvised first), write pages and
bytes, writer threads (started, scanning meanwhile, joined), madvise both
ways, ``ksm.scan``, settle, ``ksmd.run`` 0/1/2 (with 1 the background ksmd
scans between and during steps), ``use_zero_pages`` flips, and fork (the child
checks its bytes against the model and exits with a status).

Invariants after every step: every byte of every region equals its model;
the statistics add up (``pages_shared + pages_sharing + pages_unshared +
pages_volatile == rmap_items``); every frame is accounted for (``frames ==
pages_shared + deferred_frames + suspect_frames``); pages not advised are not
merged. Merging is driven by ``ksm.scan()`` only (``settle`` asserts what two
full scans must have merged); ksmd's own scans only add interleavings.

Pages are mostly written whole from a small set of patterns, so that merges
(and copies on write of merged pages) happen all the time, across regions too.
``KSM_MODEL_STEPS`` (a file name) makes each run append the steps it ran.
"""

from __future__ import annotations

import ctypes
import mmap as stdlib_mmap
import os
import threading
from collections import Counter
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from conftest import PAGE, Child, buffer_address, page_pattern
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ksm

NPAGES = 4
MAX_REGIONS = 4
PATTERNS = [page_pattern(i) for i in range(3)] + [bytes(PAGE)]
ZERO = bytes(PAGE)
KERNEL_STATS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")

# Patterns are drawn by index (a failing example's repr stays readable).
patterns = st.integers(0, len(PATTERNS) - 1)
starts = st.lists(patterns, min_size=NPAGES, max_size=NPAGES)
pages = st.integers(0, NPAGES - 1)
offsets = st.integers(0, NPAGES * PAGE - 1)
which = st.integers(0, MAX_REGIONS - 1)  # a region, modulo the live ones

STEPS: Counter[str] = Counter()


def maps_a_frame(address: int) -> bool:
    """Whether the (present) page at ``address`` maps a file page: a frame of the pool."""
    ctypes.string_at(address, 1)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return bool(entry >> 61 & 1)


class Region:
    def __init__(self, owned: bool) -> None:
        self.owned = owned
        self.mem: Any
        if owned:
            self.mem = ksm.mmap(NPAGES * PAGE)
            self.address = self.mem.address
        else:
            self.mem = stdlib_mmap.mmap(-1, NPAGES * PAGE, flags=stdlib_mmap.MAP_PRIVATE)
            self.address = buffer_address(self.mem)
        self.model = bytearray(NPAGES * PAGE)
        self.advised = [False] * NPAGES

    def page(self, p: int) -> bytes:
        return bytes(self.model[p * PAGE : (p + 1) * PAGE])

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data
        self.model[offset : offset + len(data)] = data

    def merged(self, p: int) -> bool:
        if self.owned:
            return bool(self.mem.page_state(p * PAGE) == "merged")
        return maps_a_frame(self.address + p * PAGE)

    def unmerged(self, p: int) -> bool:
        if self.owned:
            return bool(self.mem.page_state(p * PAGE) == "unmerged")
        return not maps_a_frame(self.address + p * PAGE)

    def close(self, unadvise: bool) -> None:
        # A foreign region unmapped while advised: ksm learns of it through userfaultfd.
        if not self.owned and unadvise:
            ksm.madvise(self.address, NPAGES * PAGE, ksm.MADV_UNMERGEABLE)
        self.mem.close()


class KsmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each example starts from ksmd stopped and the default knobs.
        ksm.ksmd.run = 0
        ksm.ksmd.use_zero_pages = 0
        ksm.ksmd.smart_scan = 1
        self.regions: list[Region] = []

    def teardown(self) -> None:
        ksm.ksmd.run = 0
        for r in self.regions:
            r.close(unadvise=True)
        self.regions = []
        ksm.ksmd.use_zero_pages = 0

    def region(self, i: int) -> Region:
        return self.regions[i % len(self.regions)]

    def has_regions(self) -> bool:
        return bool(self.regions)

    def add_region(self, owned: bool, start: list[int], advise: bool) -> None:
        r = Region(owned)
        # Every page is written (a page that only maps the shared zero page is never
        # merged, see test_selftest), and usually advised, so that merging starts early.
        r.write(0, b"".join(PATTERNS[i] for i in start))
        if advise:
            ksm.madvise(r.address, NPAGES * PAGE, ksm.MADV_MERGEABLE)
            r.advised = [True] * NPAGES
        self.regions.append(r)

    @initialize(
        owned=st.lists(st.booleans(), min_size=1, max_size=3),
        start=starts,
        advise=st.booleans(),
    )
    def start(self, owned: list[bool], start: list[int], advise: bool) -> None:
        for o in owned:
            self.add_region(o, start, advise)

    # ---- rules ----------------------------------------------------------------------

    @precondition(lambda self: len(self.regions) < MAX_REGIONS)
    @rule(
        owned=st.booleans(),
        start=starts,
        advise=st.booleans(),
    )
    def new_region(self, owned: bool, start: list[int], advise: bool) -> None:
        STEPS["new_region"] += 1
        self.add_region(owned, start, advise)

    @precondition(has_regions)
    @rule(i=which, unadvise=st.booleans())
    def close_region(self, i: int, unadvise: bool) -> None:
        STEPS["close_region"] += 1
        r = self.regions.pop(i % len(self.regions))
        r.close(unadvise)

    @precondition(has_regions)
    @rule(i=which, page=pages, pattern=patterns)
    def write_page(self, i: int, page: int, pattern: int) -> None:
        STEPS["write_page"] += 1
        self.region(i).write(page * PAGE, PATTERNS[pattern])

    @precondition(has_regions)
    @rule(i=which, offset=offsets, data=st.binary(min_size=1, max_size=64))
    def write_bytes(self, i: int, offset: int, data: bytes) -> None:
        STEPS["write_bytes"] += 1
        self.region(i).write(offset, data[: NPAGES * PAGE - offset])

    @precondition(has_regions)
    @rule(
        writes=st.lists(
            st.tuples(which, pages, st.lists(patterns, min_size=1, max_size=6)),
            min_size=1,
            max_size=4,
        ),
        scans=st.integers(0, 2),
    )
    def writer_threads(self, writes: list[tuple[int, int, list[int]]], scans: int) -> None:
        # One thread per (region, page): it writes the page's sequence of patterns while
        # this thread scans; once joined, each page holds the last pattern of its sequence.
        STEPS["writer_threads"] += 1
        jobs: dict[tuple[int, int], list[bytes]] = {}
        for i, page, seq in writes:
            jobs[(id(self.region(i)), page)] = [PATTERNS[k] for k in seq]
        by_id = {id(r): r for r in self.regions}
        errors: list[BaseException] = []

        def write(r: Region, page: int, seq: list[bytes]) -> None:
            try:
                for pattern in seq:
                    r.mem[page * PAGE : (page + 1) * PAGE] = pattern
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=(by_id[rid], page, seq)) for (rid, page), seq in jobs.items()
        ]
        for t in threads:
            t.start()
        ksm.scan(scans)
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a writer thread is stuck (blocked in a fault?)"
        assert not errors, errors
        for (rid, page), patterns in jobs.items():
            by_id[rid].model[page * PAGE : (page + 1) * PAGE] = patterns[-1]

    @precondition(has_regions)
    @rule(
        i=which,
        first=pages,
        count=st.integers(1, NPAGES),
        merge=st.sampled_from([True, True, False]),
        whole=st.booleans(),
    )
    def madvise(self, i: int, first: int, count: int, merge: bool, whole: bool) -> None:
        STEPS["madvise"] += 1
        r = self.region(i)
        count = min(count, NPAGES - first)
        advice = ksm.MADV_MERGEABLE if merge else ksm.MADV_UNMERGEABLE
        if whole or not r.owned:
            ksm.madvise(r.address + first * PAGE, count * PAGE, advice)
        else:
            r.mem.madvise(advice, first * PAGE, count * PAGE)
        for p in range(first, first + count):
            r.advised[p] = merge
        if not merge:
            for p in range(first, first + count):
                assert r.unmerged(p), f"page {p} still merged after MADV_UNMERGEABLE"

    @rule(n=st.integers(1, 3))
    def scan(self, n: int) -> None:
        STEPS["scan"] += 1
        ksm.scan(n)

    @rule()
    def settle(self) -> None:
        # Two full scans with no write in between: every advised page is stable now,
        # so each one whose content another advised page has too must be merged
        # (max_page_sharing is far away). Smart scan would skip pages that were
        # unique for a while (as the kernel's does) for up to 8 more scans: off here.
        # All-zero pages are left out: with use_zero_pages they go to the zero page.
        STEPS["settle"] += 1
        ksm.ksmd.smart_scan = 0
        ksm.scan(2)
        ksm.ksmd.smart_scan = 1
        advised = [(r, p) for r in self.regions for p in range(NPAGES) if r.advised[p]]
        content = Counter(r.page(p) for r, p in advised)
        for r, p in advised:
            if r.page(p) != ZERO and content[r.page(p)] >= 2:
                assert r.merged(p), f"page {p} of a {'owned' if r.owned else 'foreign'} region"

    @rule(run=st.sampled_from([0, 1, 1, 2]))
    def set_run(self, run: int) -> None:
        STEPS["set_run"] += 1
        before = ksm.ksmd.run
        ksm.ksmd.run = run
        # As in the kernel, run = 2 unmerges when run changes to 2 (ksm.scan merges even
        # while run is 2; writing 2 again then keeps those merges).
        if run == 2 and before != 2:
            for r in self.regions:
                for p in range(NPAGES):
                    assert r.unmerged(p), f"page {p} still merged after run=2"

    @rule()
    def flip_use_zero_pages(self) -> None:
        STEPS["flip_use_zero_pages"] += 1
        ksm.ksmd.use_zero_pages = 1 - ksm.ksmd.use_zero_pages

    @rule()
    def fork(self) -> None:
        STEPS["fork"] += 1
        regions = [(r.mem, bytes(r.model)) for r in self.regions]

        def child(conn: Connection) -> tuple[list[bool], int]:
            same = [mem[:] == model for mem, model in regions]
            for mem, _ in regions:
                mem[:] = bytes(NPAGES * PAGE)  # the child's writes stay its own
            return same, ksm.stats()["rmap_items"]

        running = ksm.ksmd.run == 1
        same, rmap_items = Child(child).finish()
        assert all(same), f"the child saw different contents: {same}"
        # The child's counters start from zero (with run=1 its own ksmd may have scanned since).
        assert running or rmap_items == 0, rmap_items

    # ---- invariants -----------------------------------------------------------------

    @invariant()
    def contents_match_the_model(self) -> None:
        STEPS["checked"] += 1
        for r in self.regions:
            assert r.mem[:] == bytes(r.model), f"{'owned' if r.owned else 'foreign'} region differs"

    @invariant()
    def statistics_are_consistent(self) -> None:
        s = ksm.stats()
        assert sum(s[k] for k in KERNEL_STATS) == s["rmap_items"], s
        assert min(s[k] for k in KERNEL_STATS) >= 0
        assert s["frames"] == s["pages_shared"] + s["deferred_frames"] + s["suspect_frames"], s
        assert s["pages_sharing"] <= s["pages_shared"] * (ksm.ksmd.max_page_sharing - 1)
        assert s["rmap_items"] <= s["advised_pages"] <= s["tracked_pages"]
        assert s["advised_pages"] == sum(sum(r.advised) for r in self.regions), s

    @invariant()
    def unadvised_pages_are_never_merged(self) -> None:
        for r in self.regions:
            for p in range(NPAGES):
                if not r.advised[p]:
                    assert r.unmerged(p), f"page {p} of a {'owned' if r.owned else 'foreign'} region"


TestKsmMachine = KsmMachine.TestCase
# The CI profile runs 4x its default examples here (about 6,000 steps in ~15 s); slow as it is.
if os.environ.get("KSM_HYPOTHESIS_PROFILE", "fast") == "fast":
    _profile = settings()  # the profile's settings
    TestKsmMachine.settings = settings(_profile, max_examples=4 * _profile.max_examples)
else:  # about 100,000 steps: longer than the suite's per-test timeout
    TestKsmMachine.pytestmark = [pytest.mark.timeout(3600)]  # type: ignore[attr-defined]  # read by pytest


@pytest.fixture(autouse=True, scope="module")
def count_steps() -> Iterator[None]:
    STEPS.clear()
    yield
    path = os.environ.get("KSM_MODEL_STEPS")
    if path:
        rules = sum(v for k, v in STEPS.items() if k != "checked")
        with open(path, "a") as f:
            f.write(
                f"{rules} rule steps, {STEPS['checked']} invariant checks: {dict(sorted(STEPS.items()))}\n"
            )
