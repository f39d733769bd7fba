"""``ksm.ksmd``: the knobs of /sys/kernel/mm/ksm/ and the background scanner."""

from __future__ import annotations

import errno
import time
from mmap import PROT_READ, PROT_WRITE
from pathlib import Path

import pytest
from conftest import KNOB_DEFAULTS, PAGE, fill, page_pattern, raw_mmap, raw_munmap

import ksm

STATISTICS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)

U32 = 2**32 - 1
# knob: (lowest accepted, highest accepted)
RANGES = {
    "run": (0, 2),
    "pages_to_scan": (0, U32),
    "sleep_millisecs": (0, U32),
    "max_page_sharing": (2, 2**31 - 1),
    "use_zero_pages": (0, 1),
    "merge_across_nodes": (0, 1),
    "stable_node_chains_prune_millisecs": (0, U32),
    "smart_scan": (0, 1),
    "advisor_max_cpu": (0, U32),
    "advisor_min_pages_to_scan": (0, U32),
    "advisor_max_pages_to_scan": (0, U32),
    "advisor_target_scan_time": (1, U32),
    "vma_reserve": (0, 2**31 - 1),
    "write_tracking": (0, 1),
    "hash_threads": (1, 1024),
}
BOOLEAN_KNOBS = {"use_zero_pages", "merge_across_nodes", "smart_scan", "write_tracking"}


def test_every_knob_is_in_the_tables() -> None:
    knobs = set(dir(ksm.ksmd)) - set(STATISTICS)
    assert knobs == set(KNOB_DEFAULTS) == set(RANGES) | {"advisor_mode"}


def test_available_here() -> None:
    assert ksm.available() is True
    assert ksm.unavailable_reason() is None


@pytest.mark.parametrize("name", sorted(KNOB_DEFAULTS))
def test_knob_defaults(name: str) -> None:
    value = getattr(ksm.ksmd, name)
    assert type(value) is type(KNOB_DEFAULTS[name])
    assert value == KNOB_DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(RANGES))
def test_knob_bounds_are_accepted(name: str) -> None:
    lo, hi = RANGES[name]
    if name == "run":
        hi = 0  # run = 1 and run = 2 are exercised below
    for value in (lo, hi):
        setattr(ksm.ksmd, name, value)
        assert getattr(ksm.ksmd, name) == value


@pytest.mark.parametrize("name", sorted(RANGES))
def test_invalid_knob_values_are_refused_and_change_nothing(name: str) -> None:
    lo, hi = RANGES[name]
    before = getattr(ksm.ksmd, name)
    for bad in (lo - 1, hi + 1, -(2**63), 2**64):
        with pytest.raises(ValueError) as info:
            setattr(ksm.ksmd, name, bad)
        assert name in str(info.value)
        if abs(bad) < 2**63:
            # The message names the accepted range.
            assert str(lo) in str(info.value) and str(hi) in str(info.value)
        assert getattr(ksm.ksmd, name) == before
    for bad_type in ("1", 1.0, None, b"1", *(() if name in BOOLEAN_KNOBS else (True,))):
        with pytest.raises(TypeError) as type_info:
            setattr(ksm.ksmd, name, bad_type)
        assert name in str(type_info.value)
        assert getattr(ksm.ksmd, name) == before


@pytest.mark.parametrize("name", sorted(BOOLEAN_KNOBS))
def test_boolean_knobs_take_bools(name: str) -> None:
    for value in (False, True):
        setattr(ksm.ksmd, name, value)
        assert getattr(ksm.ksmd, name) == int(value)


def test_advisor_mode_values_and_side_effects() -> None:
    assert ksm.ksmd.advisor_mode == "none"
    for bad in ("None", "scan_time", "", 1, None):
        with pytest.raises((ValueError, TypeError)) as info:
            ksm.ksmd.advisor_mode = bad  # type: ignore[assignment]
        assert "advisor_mode" in str(info.value)
        assert ksm.ksmd.advisor_mode == "none"
    ksm.ksmd.pages_to_scan = 1234
    ksm.ksmd.advisor_min_pages_to_scan = 900
    # As the kernel: switching to scan-time sets pages_to_scan to the minimum, and
    # pages_to_scan cannot be written while the advisor owns it.
    ksm.ksmd.advisor_mode = "scan-time"
    assert ksm.ksmd.advisor_mode == "scan-time"
    assert ksm.ksmd.pages_to_scan == 900
    with pytest.raises(ValueError, match="advisor"):
        ksm.ksmd.pages_to_scan = 5
    assert ksm.ksmd.pages_to_scan == 900
    ksm.ksmd.advisor_mode = "scan-time"  # the current mode: nothing changes
    assert ksm.ksmd.pages_to_scan == 900
    # Switching back resets pages_to_scan to 100 (the user's 1234 is lost, as in the kernel).
    ksm.ksmd.advisor_mode = "none"
    assert ksm.ksmd.pages_to_scan == 100


def test_the_advisor_sets_pages_to_scan_after_each_full_scan() -> None:
    with ksm.mmap(256 * PAGE) as m:
        fill(m, [page_pattern(i) for i in range(256)])
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.ksmd.advisor_target_scan_time = 1
        ksm.ksmd.advisor_mode = "scan-time"
        assert ksm.ksmd.pages_to_scan == 500
        ksm.scan(1)
        # 256 pages scanned in far less than the 1 s target: the advisor slows down
        # (the kernel's 10 % CPU floor would pin it at advisor_max_pages_to_scan).
        after = ksm.ksmd.pages_to_scan
        assert 1 <= after < 500
        assert after < ksm.ksmd.advisor_max_pages_to_scan


def test_merge_across_nodes_is_busy_while_pages_are_shared() -> None:
    with ksm.mmap(4 * PAGE) as m:
        m[:] = page_pattern(1) * 4
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        with pytest.raises(OSError) as info:
            ksm.ksmd.merge_across_nodes = 0
        assert info.value.errno == errno.EBUSY
        ksm.ksmd.merge_across_nodes = 1  # the current value is fine
    ksm.ksmd.merge_across_nodes = 0
    assert ksm.ksmd.merge_across_nodes == 0


def test_max_page_sharing_is_busy_while_pages_are_shared() -> None:
    # The kernel refuses to change max_page_sharing while KSM pages exist (EBUSY).
    with ksm.mmap(4 * PAGE) as m:
        m[:] = page_pattern(1) * 4
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert ksm.ksmd.pages_shared >= 1
        with pytest.raises(OSError) as info:
            ksm.ksmd.max_page_sharing = 128
        assert info.value.errno == errno.EBUSY
        assert ksm.ksmd.max_page_sharing == 256
        ksm.ksmd.max_page_sharing = 256  # the same value is fine
    ksm.ksmd.max_page_sharing = 128
    assert ksm.ksmd.max_page_sharing == 128


def test_unknown_attribute_is_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = ksm.ksmd.no_such_knob
    with pytest.raises(AttributeError):
        ksm.ksmd.no_such_knob = 1
    with pytest.raises(AttributeError):
        _ = ksm.ksmd.no_such_knob
    assert not hasattr(ksm.ksmd, "pages_to_scan_typo")


@pytest.mark.parametrize("name", STATISTICS)
def test_statistics_are_read_only(name: str) -> None:
    value = getattr(ksm.ksmd, name)
    assert type(value) is int
    assert value == ksm.stats()[name]
    with pytest.raises(AttributeError):
        setattr(ksm.ksmd, name, 0)
    assert getattr(ksm.ksmd, name) == ksm.stats()[name]


def test_stats_snapshot_has_the_kernel_names() -> None:
    s = ksm.stats()
    for name in (*STATISTICS, "rmap_items", "frames", "merges", "cows", "tracked_pages", "advised_pages"):
        assert name in s, name
        assert isinstance(s[name], int)
    assert isinstance(s["settled"], bool)


def test_dir_lists_knobs_and_statistics() -> None:
    names = dir(ksm.ksmd)
    for name in (*KNOB_DEFAULTS, *STATISTICS):
        assert name in names


def test_ksmd_merges_in_the_background_and_stops() -> None:
    a, b = page_pattern(1), page_pattern(2)
    with ksm.mmap(64 * PAGE) as m:
        fill(m, [a] * 32 + [b] * 32)
        m.madvise(ksm.MADV_MERGEABLE)
        scans = ksm.ksmd.full_scans
        ksm.ksmd.run = 1
        assert ksm.ksmd.run == 1
        assert ksm.wait_settled(timeout=30)
        assert ksm.ksmd.full_scans >= scans + 3  # record, merge, a quiet one
        assert {m.page_state(i * PAGE) for i in range(64)} == {"merged"}
        assert ksm.stats()["settled"] is True
        ksm.ksmd.run = 0
        assert ksm.ksmd.run == 0
        # Stopped: no more scanning, merges are kept.
        stopped_at = ksm.ksmd.full_scans
        fill(m, [b] * 32)
        time.sleep(0.2)  # ten sleep_millisecs periods: a running ksmd would scan several times
        assert ksm.ksmd.full_scans == stopped_at
        assert {m.page_state(i * PAGE) for i in range(32, 64)} == {"merged"}
        assert m[:] == b * 64
        # With ksmd stopped, wait_settled answers at once.
        t0 = time.monotonic()
        ksm.wait_settled(timeout=10)
        assert time.monotonic() - t0 < 5


def test_ksmd_obeys_pages_to_scan() -> None:
    with ksm.mmap(64 * PAGE) as m:
        m[:] = page_pattern(3) * 64
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.ksmd.pages_to_scan = 1
        ksm.ksmd.sleep_millisecs = 0
        ksm.ksmd.run = 1
        assert ksm.wait_settled(timeout=30)
        ksm.ksmd.run = 0
        assert {m.page_state(i * PAGE) for i in range(64)} == {"merged"}


def test_wait_settled_validates_timeout() -> None:
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ksm.wait_settled(timeout=bad)


def test_run_2_unmerges_everything_and_resets_full_scans() -> None:
    a = page_pattern(4)
    with ksm.mmap(16 * PAGE) as m, ksm.mmap(4 * PAGE) as other:
        m[:] = a * 16
        other[:] = a * 4
        m.madvise(ksm.MADV_MERGEABLE)
        other.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(3)
        assert ksm.ksmd.full_scans >= 3
        assert ksm.ksmd.pages_sharing >= 19
        ksm.ksmd.run = 2
        assert ksm.ksmd.run == 2
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"]) == (0, 0, 0)
        assert s["full_scans"] == 0 and ksm.ksmd.full_scans == 0
        assert s["rmap_items"] == 0
        assert {m.page_state(i * PAGE) for i in range(16)} == {"unmerged"}
        assert {other.page_state(i * PAGE) for i in range(4)} == {"unmerged"}
        assert m[:] == a * 16 and other[:] == a * 4
        # The advice stays: merging again works once ksmd (or scan) runs.
        assert s["advised_pages"] >= 20
        ksm.ksmd.run = 0
        ksm.scan(2)
        assert ksm.ksmd.full_scans == 2
        assert {m.page_state(i * PAGE) for i in range(16)} == {"merged"}
        assert m[:] == a * 16


# ---- the VMA budget: vma_reserve ------------------------------------------------------


def _vmas() -> int:
    """VMAs of this process now (lines of /proc/self/maps)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def _max_map_count() -> int:
    return int(Path("/proc/sys/vm/max_map_count").read_text())


def test_vma_reserve_is_half_of_the_limit_and_sets_the_budget() -> None:
    limit = _max_map_count()
    assert ksm.ksmd.vma_reserve == limit // 2
    assert ksm.stats()["vma_budget"] == limit - limit // 2
    ksm.ksmd.vma_reserve = 1000  # takes effect at once, without a scan
    assert ksm.stats()["vma_budget"] == limit - 1000
    assert ksm.stats()["vmas_used"] == pytest.approx(_vmas(), abs=8)
    ksm.ksmd.vma_reserve = 2**31 - 1  # more than the limit: merging may add no VMA
    assert ksm.stats()["vma_budget"] == 0


def test_a_raised_vma_reserve_stops_merging_at_the_budget_and_the_application_keeps_it() -> None:
    limit = _max_map_count()
    npages, headroom = 1024, 64
    # Pairs of equal pages with a unique page between them (pages 0 and 2, 4 and 6, ...):
    # no run to extend, so each merged pair costs VMAs of its own (up to 2 per page).
    pages = [page_pattern(i // 4) if i % 2 == 0 else page_pattern(10_000 + i) for i in range(npages)]
    mappings: list[tuple[int, int]] = []
    with ksm.mmap(npages * PAGE) as m:
        fill(m, pages)
        ksm.ksmd.vma_reserve = limit - _vmas() - headroom
        budget = ksm.stats()["vma_budget"]
        assert budget == limit - ksm.ksmd.vma_reserve
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(3)
        s = ksm.stats()
        # Merged up to the budget, and no further: the rest was put off, and counted.
        assert 0 < s["pages_sharing"] < npages // 4, s
        assert s["vma_budget_skips"] > 0, s
        assert s["vmas_added"] <= headroom, s
        assert s["vmas_used"] <= budget and _vmas() <= budget, s
        assert m[:] == b"".join(pages)
        # The application still has its reserve: it maps all but a few of those VMAs,
        # one mapping each (alternate protections keep neighbours from merging), then
        # splits one by unmapping a page in its middle.
        room = limit - _vmas()
        assert room >= ksm.ksmd.vma_reserve
        n = room - 32  # a few left for the interpreter itself
        before = _vmas()
        try:
            for i in range(n):
                prot = PROT_READ if i % 2 else PROT_READ | PROT_WRITE
                mappings.append((raw_mmap(3 * PAGE, prot), 3 * PAGE))
            # (a few may land next to a mapping of the same protection that was already
            # there and merge with it: CI saw 4 of 64,958 do so)
            assert _vmas() >= before + n - 16
            addr, _ = mappings.pop()
            raw_munmap(addr + PAGE, PAGE)  # a split: one more VMA
            mappings += [(addr, PAGE), (addr + 2 * PAGE, PAGE)]
        finally:
            for addr, length in mappings:
                raw_munmap(addr, length)
        # Merging goes on once the reserve is back at its default.
        ksm.ksmd.vma_reserve = limit // 2
        ksm.scan(2)
        assert ksm.stats()["pages_sharing"] == npages // 4
        assert m[:] == b"".join(pages)


def test_vma_budget_bytes_is_what_the_merges_put_off_would_save_once_per_full_scan() -> None:
    limit = _max_map_count()
    npages, headroom = 1024, 64
    # Pairs of equal pages with a unique page between them, as above: each merged pair
    # saves one page and costs VMAs of its own, so the budget fills after a few.
    pages = [page_pattern(i // 4) if i % 2 == 0 else page_pattern(20_000 + i) for i in range(npages)]
    pairs = npages // 4
    with ksm.mmap(npages * PAGE) as m:
        fill(m, pages)
        ksm.ksmd.vma_reserve = limit - _vmas() - headroom
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(3)
        s = ksm.stats()
        merged = s["pages_sharing"]
        assert 0 < merged < pairs, s
        # Every pair that did not merge was put off at the latest full scan: one page
        # each that merging would have saved.
        assert s["vma_budget_bytes"] == (pairs - merged) * PAGE, s
        # Put off again at every full scan, counted once: the figure is replaced, not
        # added up, while vma_budget_skips goes on counting refusals.
        skips = s["vma_budget_skips"]
        ksm.scan(2)
        s = ksm.stats()
        assert s["pages_sharing"] == merged, s
        assert s["vma_budget_bytes"] == (pairs - merged) * PAGE, s
        assert s["vma_budget_skips"] >= skips + 2 * (pairs - merged), s
        # With the reserve back at its default everything merges: nothing put off.
        ksm.ksmd.vma_reserve = limit // 2
        ksm.scan(2)
        s = ksm.stats()
        assert s["pages_sharing"] == pairs, s
        assert s["vma_budget_bytes"] == 0, s
        assert m[:] == b"".join(pages)


def test_vmas_per_merged_page() -> None:
    assert ksm.vmas_per_merged_page() is None  # nothing saved
    assert ksm.vmas_per_merged_page({"pages_sharing": 0, "vmas_added": 3}) is None
    assert ksm.vmas_per_merged_page({"pages_sharing": 200, "vmas_added": 3}) == 0.015
    with ksm.mmap(64 * PAGE) as a, ksm.mmap(64 * PAGE) as b:
        data = [page_pattern(i) for i in range(64)]
        fill(a, data)
        fill(b, data)  # a copied run: one mapping per side
        a.madvise(ksm.MADV_MERGEABLE)
        b.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        s = ksm.stats()
        assert s["pages_sharing"] == 64
        ratio = ksm.vmas_per_merged_page(s)
        assert ratio == s["vmas_added"] / 64
        assert ratio is not None and ratio <= 2 / 64
