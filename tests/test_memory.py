"""Merging really gives memory back: frames, pool bytes and PSS.

Measured in a fresh interpreter, so that the absolute numbers (frames, pool
bytes) are not disturbed by frames other tests left deferred (after a fork)
and PSS is not disturbed by pytest's own allocations.
"""

from __future__ import annotations

import json

from conftest import PAGE, run_python

N = 4096  # 16 MiB of identical pages
MAX_SHARING = 256
FRAMES = N // MAX_SHARING  # kernel formula: N % m == 0 → N/m KSM pages


def scenario() -> None:
    """Runs in the subprocess: merge, measure, unmerge, measure; prints JSON."""
    from conftest import page_pattern, pss_bytes

    import ksm

    pattern = page_pattern(12345)
    out: dict[str, object] = {}
    m = ksm.mmap(N * PAGE)
    for i in range(N):
        m[i * PAGE : (i + 1) * PAGE] = pattern

    def all_pages_intact() -> bool:
        # Reading every page also maps it (a merged page is mapped on first touch).
        with memoryview(m) as view:
            return all(view[i * PAGE : (i + 1) * PAGE] == pattern for i in range(N))

    out["intact_before"] = all_pages_intact()
    out["pss_before"] = pss_bytes()
    m.madvise(ksm.MADV_MERGEABLE)
    ksm.scan(2)
    out["intact_merged"] = all_pages_intact()
    out["pss_merged"] = pss_bytes()
    out["merged"] = ksm.stats()
    out["merged_states"] = sorted({m.page_state(i * PAGE) for i in range(N)})
    m.madvise(ksm.MADV_UNMERGEABLE)
    out["unmerged_now"] = ksm.stats()
    out["intact_unmerged"] = all_pages_intact()
    out["pss_unmerged"] = pss_bytes()
    out["unmerged_states"] = sorted({m.page_state(i * PAGE) for i in range(N)})
    ksm.scan(1)
    out["unmerged_scanned"] = ksm.stats()
    m.close()
    out["closed"] = ksm.stats()
    print(json.dumps(out))


def test_merging_gives_memory_back() -> None:
    out = json.loads(run_python("import test_memory\ntest_memory.scenario()"))
    merged = out["merged"]
    saved = (N - FRAMES) * PAGE

    assert out["intact_before"] and out["intact_merged"] and out["intact_unmerged"]
    assert out["merged_states"] == ["merged"]
    assert merged["pages_shared"] == FRAMES
    assert merged["pages_sharing"] == N - FRAMES
    assert merged["frames"] == FRAMES
    assert merged["pool_bytes"] == FRAMES * PAGE
    assert merged["general_profit"] > 0.9 * saved

    drop = out["pss_before"] - out["pss_merged"]
    assert 0.75 * saved <= drop <= 1.15 * saved, f"PSS dropped by {drop} bytes, merged {saved}"

    # MADV_UNMERGEABLE gives every page a private copy at once and frees the frames.
    now = out["unmerged_now"]
    assert out["unmerged_states"] == ["unmerged"]
    assert (now["frames"], now["pool_bytes"]) == (0, 0)
    assert (now["pages_shared"], now["pages_sharing"]) == (0, 0)
    assert now["advised_pages"] == 0
    grow = out["pss_unmerged"] - out["pss_merged"]
    assert 0.75 * saved <= grow <= 1.15 * saved, f"PSS grew by {grow} bytes, unmerged {saved}"

    assert out["unmerged_scanned"]["frames"] == 0
    closed = out["closed"]
    assert (closed["frames"], closed["pool_bytes"], closed["rmap_items"], closed["tracked_pages"]) == (
        0,
        0,
        0,
        0,
    )
    # Nothing tracked any more: none of the bookkeeping is kept either.
    assert merged["metadata_bytes"] > 0
    assert closed["metadata_bytes"] == 0, closed["metadata_bytes"]


MIXED = 16384  # 64 MiB: copies, pairs, unique and zero pages, some changed


def mixed_scenario() -> None:
    """Runs in the subprocess: the bench's kinds of content merged, then unmerged and
    closed, then the same again; prints JSON with the bookkeeping at each step."""
    import random

    import ksm

    rng = random.Random(7)
    block = [rng.randbytes(PAGE) for _ in range(MIXED // 4)]
    out: dict[str, object] = {}
    for round_ in range(2):
        m = ksm.mmap(MIXED * PAGE)
        for i in range(MIXED):
            kind = i % 8
            if kind < 4:  # four copies of a block, as the dataset workload
                page = bytearray(block[i // 4 % len(block) // 4 * 4 + kind])
            elif kind < 6:  # pairs
                page = bytearray(block[(i // 8) % len(block)])
            elif kind == 6:  # unique
                page = bytearray(rng.randbytes(PAGE))
            else:  # zero
                page = bytearray(PAGE)
            if i % 97 == 0:
                page[0] ^= 0xFF  # changed: inside a copied run, a covered page
            m[i * PAGE : (i + 1) * PAGE] = bytes(page)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(3)
        out[f"merged{round_}"] = ksm.stats()
        m.madvise(ksm.MADV_UNMERGEABLE)
        out[f"unmerged{round_}"] = ksm.stats()
        m.close()
        out[f"closed{round_}"] = ksm.stats()
    print(json.dumps(out))


def test_metadata_is_given_back_after_unmerge_and_close() -> None:
    # The bench's note: ksm kept 4.7 MB of bookkeeping from earlier workloads after
    # they were unmerged and closed (frame table and stable index never shrank).
    out = json.loads(run_python("import test_memory\ntest_memory.mixed_scenario()", timeout=120))
    for r in range(2):
        merged, unmerged, closed = out[f"merged{r}"], out[f"unmerged{r}"], out[f"closed{r}"]
        assert merged["pages_sharing"] > MIXED // 4, merged
        per_page = merged["metadata_bytes"] / merged["tracked_pages"]
        assert 8 <= per_page <= 16, per_page
        # The most a full scan held: its unstable index, fullest at its end, included.
        peak = merged["metadata_peak_bytes"] / merged["tracked_pages"]
        assert per_page <= peak <= 16, (per_page, peak)
        # Unadvised: its frames and index entries are gone; the records of the ksm.mmap
        # memory (8 bytes a page) stay until it is closed.
        assert (unmerged["frames"], unmerged["advised_pages"]) == (0, 0)
        assert unmerged["metadata_bytes"] == 8 * MIXED, unmerged["metadata_bytes"]
        assert unmerged["metadata_peak_bytes"] == 8 * MIXED, unmerged["metadata_peak_bytes"]
        assert (closed["tracked_pages"], closed["metadata_bytes"]) == (0, 0), closed
        assert closed["metadata_peak_bytes"] == 0, closed


UNIQUE = 8192  # 32 MiB of distinct pages


def unique_scenario() -> None:
    """Runs in the subprocess: unique pages scanned until they sit in the unstable
    index; prints the bookkeeping after the scans as JSON."""
    import random

    import ksm

    m = ksm.mmap(UNIQUE * PAGE)
    m[:] = random.Random(3).randbytes(UNIQUE * PAGE)
    m.madvise(ksm.MADV_MERGEABLE)
    ksm.scan(2)
    print(json.dumps(ksm.stats()))


def test_the_peak_of_bookkeeping_counts_what_the_scan_held_and_unique_pages_cost_no_index_slot() -> None:
    # After the second full scan every unique page was a candidate, and the scan's
    # unstable index and its filter of keys are freed when it ends: metadata_bytes is
    # then the records alone, metadata_peak_bytes what the scan held (records, the
    # filter of keys held twice, 0.5-1 byte a page, twice that while built, and the
    # unique pages its shared cells let into the index, an eighth to a quarter).
    # Every unique page in the index (7.5 bytes each) would peak above 15 bytes.
    s = json.loads(run_python("import test_memory\ntest_memory.unique_scenario()", timeout=120))
    assert (s["pages_sharing"], s["pages_unshared"]) == (0, UNIQUE), s
    assert s["metadata_bytes"] == 8 * UNIQUE, s["metadata_bytes"]
    peak = s["metadata_peak_bytes"] / UNIQUE
    assert 8.5 <= peak <= 8 + 2 + 0.25 * 7.5, peak
