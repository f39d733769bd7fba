use super::domain::PUBLISH_WAIT_BATCHES;
use super::fake::FakeMem;
use super::runs::MAX_TILE;
use super::*;

const PG: usize = 4096;
const BASE: usize = 0x10_0000;

fn core_with(npages: usize) -> Core<FakeMem> {
    let mut c = Core::new(FakeMem::new(PG), 1 << 20);
    c.add_region(Region::new(
        BASE,
        npages,
        true,
        libc::PROT_READ | libc::PROT_WRITE,
    ));
    c
}

/// A page numbered `i` (its first 8 bytes), the rest `i % 251`.
fn page_of(i: usize) -> Vec<u8> {
    let mut p = vec![(i % 251) as u8; PG];
    p[..8].copy_from_slice(&(i as u64).to_le_bytes());
    p
}

/// Two copies of `n` numbered pages (page `i` of each holds `page_of(i)`), advised,
/// not scanned yet.
fn two_copies(n: usize) -> Core<FakeMem> {
    let mut c = core_with(2 * n);
    for i in 0..2 * n {
        c.mem.write(BASE + i * PG, &page_of(i % n));
    }
    c.advise(BASE, BASE + 2 * n * PG);
    c
}

/// Two copies of `n` numbered pages, advised, written under tracking, scanned once
/// (smart scan off), hashed on `threads`.
fn two_tracked_copies(n: usize, threads: usize) -> Core<FakeMem> {
    let mut c = core_with(2 * n);
    c.hash_threads = threads;
    c.mem.tracking = true;
    c.smart_scan = false;
    for i in 0..n {
        c.mem.write(BASE + i * PG, &page_of(i));
        c.mem.write(BASE + (n + i) * PG, &page_of(i));
    }
    c.advise(BASE, BASE + 2 * n * PG);
    c.scan_full(1);
    c
}

fn fill(c: &mut Core<FakeMem>, i: usize, byte: u8) {
    c.mem.write(BASE + i * PG, &vec![byte; PG]);
}

/// The selftest formula for N identical pages with max_page_sharing m.
fn expected(n: u64, m: u64) -> (u64, u64) {
    if n % m <= 1 {
        (n / m, n / m * (m - 1))
    } else {
        let shared = n / m + 1;
        (shared, n - shared)
    }
}

#[test]
fn identical_pages_follow_the_kernel_formula() {
    for n in [2usize, 10, 257, 1000] {
        let mut c = core_with(n);
        for i in 0..n {
            fill(&mut c, i, 0x5a);
        }
        c.advise(BASE, BASE + n * PG);
        c.scan_full(2);
        let k = c.counters();
        assert_eq!(
            (k.pages_shared, k.pages_sharing),
            expected(n as u64, 256),
            "n = {n}"
        );
        c.check_invariants();
        for i in 0..n {
            assert_eq!(c.mem.read_page(BASE + i * PG), vec![0x5a; PG]);
        }
    }
}

#[test]
fn a_page_merges_on_its_second_visit_not_its_first() {
    let mut c = core_with(2);
    fill(&mut c, 0, 1);
    fill(&mut c, 1, 1);
    c.advise(BASE, BASE + 2 * PG);
    c.scan_full(1);
    assert_eq!(c.counters().pages_shared, 0);
    assert_eq!(c.counters().pages_volatile(), 2);
    c.scan_full(1);
    assert_eq!(
        (c.counters().pages_shared, c.counters().pages_sharing),
        (1, 1)
    );
}

#[test]
fn written_merged_pages_unmerge_and_free_the_frame() {
    let mut c = core_with(2);
    fill(&mut c, 0, 7);
    fill(&mut c, 1, 7);
    c.advise(BASE, BASE + 2 * PG);
    c.scan_full(2);
    assert_eq!(c.mem.frames_held(), 1);
    c.mem.write(BASE, &[1]);
    c.mem.write(BASE + PG, &[2]);
    c.scan_full(1);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (0, 0));
    assert_eq!(c.mem.frames_held(), 0, "frame punched");
    c.check_invariants();
}

#[test]
fn a_written_merged_page_stays_in_place_and_its_writes_are_tracked_once_it_holds_still() {
    let n = 8;
    let mut c = core_with(2 * n);
    c.mem.tracking = true;
    c.smart_scan = false; // every page visited at every scan
    for i in 0..n {
        fill(&mut c, i, 50 + i as u8);
        fill(&mut c, n + i, 50 + i as u8);
    }
    c.advise(BASE, BASE + 2 * n * PG);
    c.scan_full(3);
    assert_eq!(c.counters().pages_sharing, n as u64);
    let frames = c.mem.frames_held();
    // Copied away by a write: the copy stays inside the mapping (no mapping changes).
    let x = BASE + 2 * PG;
    c.mem.write(x, &[1]);
    c.scan_full(1);
    assert_eq!(c.mem.unmerged, 0, "no page given a mapping of its own");
    assert!(c.rec(x).unwrap().covered());
    assert_eq!(c.counters().pages_sharing, n as u64 - 1);
    assert_eq!(c.counters().cows, 1);
    // Held still: after one more visit it is write-protected, after another its
    // checksum is taken under protection; from then on it is not hashed again.
    c.scan_full(2);
    let hashed = c.counters().pages_hashed;
    c.scan_full(2);
    assert_eq!(
        c.counters().pages_hashed,
        hashed,
        "a covered page that holds still"
    );
    // Written again: seen at the next scan.
    c.mem.write(x + 1, &[2]);
    c.scan_full(1);
    assert_eq!(c.counters().pages_hashed, hashed + 1);
    // The other copy written too: the frame has no page left and is freed.
    c.mem.write(BASE + (n + 2) * PG, &[3]);
    c.scan_full(1);
    assert_eq!(c.mem.frames_held(), frames - 1, "frame punched");
    // Made equal to another page, the covered copy merges with it.
    let sharing = c.counters().pages_sharing;
    c.mem.write(x, &vec![50 + 5; PG]);
    c.scan_full(3);
    assert_eq!(c.counters().pages_sharing, sharing + 1);
    c.check_invariants();
    for i in 0..2 * n {
        let mut want = vec![50 + (i % n) as u8; PG];
        match i {
            2 => want = vec![55; PG],
            _ if i == n + 2 => want[0] = 3,
            _ => {}
        }
        assert_eq!(c.mem.read_page(BASE + i * PG), want, "page {i}");
    }
}

#[test]
fn unique_pages_never_merge_and_stay_unshared() {
    let mut c = core_with(8);
    for i in 0..8 {
        fill(&mut c, i, i as u8 + 1);
    }
    c.advise(BASE, BASE + 8 * PG);
    c.scan_full(4);
    let k = c.counters();
    assert_eq!(
        (k.pages_shared, k.pages_sharing, k.pages_unshared),
        (0, 0, 8)
    );
    assert!(c.settled());
}

#[test]
fn untouched_pages_are_not_tracked() {
    let mut c = core_with(16);
    fill(&mut c, 3, 9);
    c.advise(BASE, BASE + 16 * PG);
    c.scan_full(2);
    assert_eq!(c.counters().rmap_items, 1);
}

#[test]
fn unadvise_unmerges_and_clears_advice() {
    let mut c = core_with(4);
    for i in 0..4 {
        fill(&mut c, i, 3);
    }
    c.advise(BASE, BASE + 4 * PG);
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, 3);
    c.unadvise(BASE, BASE + 4 * PG).unwrap();
    for i in 0..4 {
        assert!(!c.mem.maps_frame(BASE + i * PG));
    }
    assert_eq!(
        c.counters(),
        Counters {
            full_scans: 2,
            pages_scanned: c.counters().pages_scanned,
            pages_hashed: c.counters().pages_hashed,
            merges: 4,
            ..Counters::default()
        }
    );
    c.scan_full(2);
    assert_eq!(c.counters().pages_shared, 0, "no longer advised");
    c.check_invariants();
}

#[test]
fn frames_freed_by_one_unmerge_are_punched_together() {
    // A copied run of 4 pages: consecutive frames, freed by one unmerge, punched with
    // one call once no page maps them (FakeMem asserts that).
    let mut c = core_with(8);
    for i in 0..4 {
        fill(&mut c, i, 10 + i as u8);
        fill(&mut c, 4 + i, 10 + i as u8);
    }
    c.advise(BASE, BASE + 8 * PG);
    c.scan_full(2);
    assert_eq!(c.counters().pages_shared, 4);
    assert_eq!(c.mem.frames_held(), 4);
    c.unadvise(BASE, BASE + 8 * PG).unwrap();
    assert_eq!(c.mem.frames_held(), 0);
    assert_eq!(c.mem.punched, 4);
    assert_eq!(c.mem.punch_runs.len(), 1, "{:?}", c.mem.punch_runs);
    assert_eq!(c.mem.punch_runs[0].1, 4);
    for i in 0..8 {
        assert_eq!(c.mem.read_page(BASE + i * PG), vec![10 + (i % 4) as u8; PG]);
    }
    // A failed unmerge punches nothing: every frame is still mapped.
    c.advise(BASE, BASE + 8 * PG);
    c.scan_full(2);
    let held = c.mem.frames_held();
    c.mem.fail_unmerge = true;
    assert!(c.unadvise(BASE, BASE + 8 * PG).is_err());
    assert_eq!(c.mem.frames_held(), held);
    assert_eq!(c.mem.punch_runs.len(), 1);
    c.check_invariants();
}

#[test]
fn failed_unmerge_keeps_advice_and_data() {
    let mut c = core_with(2);
    fill(&mut c, 0, 3);
    fill(&mut c, 1, 3);
    c.advise(BASE, BASE + 2 * PG);
    c.scan_full(2);
    c.mem.fail_unmerge = true;
    assert!(c.unadvise(BASE, BASE + 2 * PG).is_err());
    assert_eq!(c.counters().pages_sharing, 1);
    assert!(c.region_at(BASE).unwrap().pages.iter().all(|p| p.advised()));
    c.check_invariants();
}

#[test]
fn failed_remap_leaves_pages_intact() {
    let mut c = core_with(2);
    fill(&mut c, 0, 3);
    fill(&mut c, 1, 3);
    c.advise(BASE, BASE + 2 * PG);
    c.mem.fail_map = true;
    c.scan_full(3);
    assert_eq!(c.counters().pages_shared, 0);
    assert!(c.counters().merge_failures > 0);
    assert_eq!(c.mem.frames_held(), 0);
    c.check_invariants();
}

#[test]
fn run_2_resets_full_scans_and_unmerges() {
    let mut c = core_with(3);
    for i in 0..3 {
        fill(&mut c, i, 4);
    }
    c.advise(BASE, BASE + 3 * PG);
    c.scan_full(2);
    c.unmerge_all().unwrap();
    let k = c.counters();
    assert_eq!(
        (k.full_scans, k.pages_shared, k.pages_sharing, k.rmap_items),
        (0, 0, 0, 0)
    );
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, 2, "still advised: merges again");
}

#[test]
fn frames_of_a_forked_pool_are_deferred_until_quiet() {
    let mut c = core_with(2);
    fill(&mut c, 0, 5);
    fill(&mut c, 1, 5);
    c.advise(BASE, BASE + 2 * PG);
    c.scan_full(2);
    c.frames_mut().on_fork();
    c.mem.write(BASE, &[0]);
    c.mem.write(BASE + PG, &[1]);
    c.scan_full(1);
    assert_eq!(c.mem.frames_held(), 1, "a child may map it");
    c.pool_quiet();
    assert_eq!(c.mem.frames_held(), 0);
    c.check_invariants();
}

#[test]
fn removing_a_region_releases_its_frames() {
    let mut c = core_with(2);
    c.add_region(Region::new(BASE + 64 * PG, 1, true, libc::PROT_READ));
    fill(&mut c, 0, 5);
    fill(&mut c, 1, 5);
    c.mem.write(BASE + 64 * PG, &vec![5; PG]);
    c.advise(BASE, BASE + 65 * PG);
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, 2);
    for i in 0..2 {
        c.mem.unmap(BASE + i * PG);
    }
    c.remove_region(BASE);
    assert_eq!(
        (c.counters().pages_shared, c.counters().pages_sharing),
        (1, 0)
    );
    c.check_invariants();
}

#[test]
fn vma_estimate_counts_pieces() {
    let mut c = core_with(4);
    for i in 0..4 {
        fill(&mut c, i, if i == 1 || i == 2 { 8 } else { i as u8 + 20 });
    }
    c.advise(BASE, BASE + 4 * PG);
    c.scan_full(2);
    // anon | frame f | frame f | anon: four pieces, three added.
    assert_eq!(c.vmas_added(), 3);
}

#[test]
fn merges_stop_at_the_vma_budget() {
    let mut c = core_with(10);
    for i in 0..10 {
        fill(&mut c, i, 6);
    }
    c.advise(BASE, BASE + 10 * PG);
    // Pages of distinct contents, in pairs (no repeated content: no tiles).
    for i in 0..10 {
        fill(&mut c, i, 6 + (i / 2) as u8);
    }
    c.vma_allowance = 2 * 5;
    c.mem.vma_allowance = 0;
    c.scan_full(2);
    let k = c.counters();
    // A pair is charged 2 VMAs per side: a budget of 10 VMAs takes two pairs.
    assert_eq!(k.pages_shared + k.pages_sharing, 4, "budget of 10 VMAs");
    assert!(k.vma_budget_skips > 0);
    // The three pairs left were put off at the latest full scan: one page each.
    assert_eq!(k.vma_put_off_pages, 3);
    assert!(c.vmas_added() <= 10);
    for i in 0..10 {
        assert_eq!(c.mem.read_page(BASE + i * PG), vec![6 + (i / 2) as u8; PG]);
    }
    c.check_invariants();
    // Put off, not given up: once the budget has room again (the engine reads it
    // afresh at every full scan), the pairs put off merge.
    let skips = k.vma_budget_skips;
    c.scan_full(1);
    assert!(
        c.counters().vma_budget_skips > skips,
        "still at the budget: put off again"
    );
    assert_eq!(c.counters().vma_put_off_pages, 3, "replaced, not added up");
    c.mem.vma_allowance = 100;
    c.refresh_vma_allowance();
    c.scan_full(2);
    let k = c.counters();
    assert_eq!(k.pages_shared + k.pages_sharing, 10);
    assert_eq!(k.vma_put_off_pages, 0);
    for i in 0..10 {
        assert_eq!(c.mem.read_page(BASE + i * PG), vec![6 + (i / 2) as u8; PG]);
    }
    c.check_invariants();
}

#[test]
fn max_page_sharing_makes_chains_of_dups() {
    for (n, m, shared, sharing, dups) in [
        (1000usize, 256u32, 4, 996, 4),
        (2048, 128, 16, 2032, 16),
        (100, 256, 1, 99, 0),
    ] {
        let mut c = core_with(n);
        c.max_page_sharing = m;
        for i in 0..n {
            fill(&mut c, i, 0x77);
        }
        c.advise(BASE, BASE + n * PG);
        c.scan_full(2);
        let k = c.counters();
        assert_eq!(
            (k.pages_shared, k.pages_sharing),
            (shared, sharing),
            "n={n} m={m}"
        );
        let chains = u64::from(dups > 0);
        assert_eq!(c.stable_chains(), (chains, dups), "n={n} m={m}");
        c.check_invariants();
    }
}

#[test]
fn zero_pages_merge_with_each_other_or_become_the_zero_page() {
    for use_zero_pages in [false, true] {
        let mut c = core_with(12);
        c.use_zero_pages = use_zero_pages;
        for i in 0..10 {
            fill(&mut c, i, 0);
        }
        fill(&mut c, 10, 1);
        fill(&mut c, 11, 2);
        c.advise(BASE, BASE + 12 * PG);
        c.scan_full(2);
        let k = c.counters();
        let got = (k.pages_shared, k.pages_sharing, k.ksm_zero_pages);
        if use_zero_pages {
            assert_eq!(got, (0, 0, 10));
            assert_eq!(k.rmap_items, 2, "zero pages are no rmap_items");
            assert_eq!(
                c.page_state(BASE, Presence::Absent),
                Some("zero"),
                "reads the zero page"
            );
        } else {
            assert_eq!(got, (1, 9, 0));
        }
        c.check_invariants();
        // Written again: an ordinary page, counted out of ksm_zero_pages at the next visit.
        c.mem.write(BASE + 3 * PG, &[9]);
        c.scan_full(1);
        if use_zero_pages {
            assert_eq!(c.counters().ksm_zero_pages, 9);
        }
        // Unmerge: no zero page left counted, contents exact.
        c.unmerge_range(BASE, BASE + 12 * PG).unwrap();
        assert_eq!(c.counters().ksm_zero_pages, 0);
        let mut p3 = vec![0; PG];
        p3[0] = 9;
        for i in 0..10 {
            let want = if i == 3 { p3.clone() } else { vec![0; PG] };
            assert_eq!(c.mem.read_page(BASE + i * PG), want, "page {i}");
        }
        c.check_invariants();
    }
}

#[test]
fn smart_scan_skips_unique_pages_from_the_fifth_scan_like_the_kernel() {
    let n = 64;
    let mut c = core_with(n);
    c.smart_scan = true;
    for i in 0..n {
        fill(&mut c, i, i as u8 + 1);
    }
    c.advise(BASE, BASE + n * PG);
    let mut skipped = Vec::new();
    for _ in 0..12 {
        c.scan_full(1);
        skipped.push(c.counters().pages_skipped);
        c.check_invariants();
    }
    // Scans 1-4 look at every page; the 5th skips them all (docs/kernel-contract.md,
    // “Smart scan”), then looks are spaced out: every 2nd, 3rd, 5th, then 9th scan.
    assert_eq!(&skipped[..4], &[0, 0, 0, 0]);
    assert_eq!(skipped[4], n as u64);
    assert!(skipped[11] > skipped[4]);
    let scanned = c.counters().pages_scanned;
    assert!(
        scanned < 12 * n as u64,
        "skipped pages are not counted as scanned"
    );
    // Off: every page is looked at on every scan.
    c.smart_scan = false;
    let before = c.counters();
    c.scan_full(1);
    assert_eq!(c.counters().pages_skipped, before.pages_skipped);
    assert_eq!(c.counters().pages_scanned, before.pages_scanned + n as u64);
}

#[test]
fn a_copied_run_merges_as_one_run_on_consecutive_frames() {
    let n = 40;
    let mut c = core_with(2 * n + 3);
    for i in 0..n {
        fill(&mut c, i, 10 + i as u8);
        fill(&mut c, n + 3 + i, 10 + i as u8);
    }
    fill(&mut c, n, 1);
    fill(&mut c, n + 1, 2);
    fill(&mut c, n + 2, 3);
    c.advise(BASE, BASE + (2 * n + 3) * PG);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!(
        (k.pages_shared, k.pages_sharing),
        (n as u64, n as u64),
        "{k:?}"
    );
    // One mapping per copy: the two runs add at most 2 VMAs each.
    assert!(c.vmas_added() <= 4, "{} VMAs added", c.vmas_added());
    let frames: Vec<u32> = (0..n)
        .map(|i| c.region_at(BASE).unwrap().pages[i].frame())
        .collect();
    assert!(frames.windows(2).all(|w| w[1] == w[0] + 1), "{frames:?}");
    // A write inside the merged run: only that page changes.
    c.mem.write(BASE + 7 * PG + 5, &[0xEE]);
    c.scan_full(1);
    for i in 0..n {
        let mut want = vec![10 + i as u8; PG];
        if i == 7 {
            want[5] = 0xEE;
        }
        assert_eq!(c.mem.read_page(BASE + i * PG), want, "page {i}");
        assert_eq!(
            c.mem.read_page(BASE + (n + 3 + i) * PG),
            vec![10 + i as u8; PG]
        );
    }
    c.check_invariants();
}

#[test]
fn a_third_copy_maps_the_frames_of_the_first_two_as_one_run() {
    let n = 30;
    let mut c = core_with(3 * n + 2);
    for copy in 0..3 {
        for i in 0..n {
            fill(&mut c, copy * (n + 1) + i, 100 + i as u8);
        }
    }
    c.advise(BASE, BASE + (3 * n + 2) * PG);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!(
        (k.pages_shared, k.pages_sharing),
        (n as u64, 2 * n as u64),
        "{k:?}"
    );
    assert!(c.vmas_added() <= 6, "{} VMAs added", c.vmas_added());
    c.check_invariants();
    for copy in 0..3 {
        for i in 0..n {
            assert_eq!(
                c.mem.read_page(BASE + (copy * (n + 1) + i) * PG),
                vec![100 + i as u8; PG]
            );
        }
    }
}

#[test]
fn with_the_vma_budget_low_one_repeated_content_maps_tiles_of_frames() {
    let n = 4000;
    let mut c = core_with(n);
    for i in 0..n {
        fill(&mut c, i, 0x42);
    }
    c.advise(BASE, BASE + n * PG);
    c.mem.vma_allowance = 3_000; // under TILE_BELOW_ALLOWANCE: tiles
    c.refresh_vma_allowance();
    c.scan_full(3);
    let k = c.counters();
    // Far fewer VMAs than pages, and nearly every page saved.
    assert!(c.vmas_added() < 40, "{} VMAs added", c.vmas_added());
    assert!(k.pages_sharing + k.pages_shared == n as u64, "{k:?}");
    assert!(k.pages_shared <= 2 * MAX_TILE as u64, "{k:?}");
    c.check_invariants();
    for i in 0..n {
        assert_eq!(c.mem.read_page(BASE + i * PG), vec![0x42; PG]);
    }
    let max = c.max_page_sharing;
    for f in c.frames().referenced().collect::<Vec<_>>() {
        assert!(c.frames().refs(f) <= max);
    }
}

/// Frames of the pages `[first, first + n)`.
fn frames_of(c: &Core<FakeMem>, first: usize, n: usize) -> Vec<u32> {
    let r = c.region_at(BASE).unwrap();
    (first..first + n).map(|i| r.pages[i].frame()).collect()
}

#[test]
fn a_page_merged_alone_moves_into_a_copied_run() {
    // Copy A holds one content twice (pages 2 and 5): the first merging scan merges
    // them alone before copy B is reached. B's run over A takes both in: one mapping
    // per copy, the lone frame freed.
    let n = 8;
    let mut c = core_with(2 * n + 1);
    for copy in [0, n + 1] {
        for i in 0..n {
            let b = if i == 5 { 12 } else { 10 + i as u8 };
            fill(&mut c, copy + i, b);
        }
    }
    fill(&mut c, n, 1);
    c.advise(BASE, BASE + (2 * n + 1) * PG);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (8, 8), "{k:?}");
    let a = frames_of(&c, 0, n);
    assert!(a.windows(2).all(|w| w[1] == w[0] + 1), "{a:?}");
    assert_eq!(frames_of(&c, n + 1, n), a);
    assert_eq!(c.vmas_added(), 2);
    assert_eq!(c.mem.frames_held(), 8, "the lone frame is given back");
    c.check_invariants();
    for copy in [0, n + 1] {
        for i in 0..n {
            let b = if i == 5 { 12 } else { 10 + i as u8 };
            assert_eq!(c.mem.read_page(BASE + (copy + i) * PG), vec![b; PG]);
        }
    }
}

#[test]
fn a_content_repeated_inside_a_copy_is_left_to_the_copies_run() {
    // Page 9 repeats page 3 in both copies: in the first copy the two pair up before
    // the second copy's run reaches them. Put off to the end of the scan, that pair
    // makes no frame of its own (which the run would take the pages from, and free).
    let n = 16;
    let mut c = core_with(2 * (n + 1));
    for copy in 0..2 {
        for i in 0..n {
            let b = if i == 9 { 40 + 3 } else { 40 + i as u8 };
            fill(&mut c, copy * (n + 1) + i, b);
        }
        fill(&mut c, copy * (n + 1) + n, 1 + copy as u8);
    }
    c.advise(BASE, BASE + 2 * (n + 1) * PG);
    c.scan_full(2);
    assert_eq!(
        c.mem.punched, 0,
        "no frame made for the repeat and given up"
    );
    let a = frames_of(&c, 0, n);
    assert!(a.windows(2).all(|w| w[1] == w[0] + 1), "one run: {a:?}");
    assert_eq!(frames_of(&c, n + 1, n), a);
    let k = c.counters();
    assert_eq!(
        (k.pages_shared, k.pages_sharing),
        (n as u64, n as u64),
        "{k:?}"
    );
    c.scan_full(1);
    assert!(c.settled(), "nothing left for a later scan");
    c.check_invariants();
    for copy in 0..2 {
        for i in 0..n {
            let b = if i == 9 { 43 } else { 40 + i as u8 };
            assert_eq!(
                c.mem.read_page(BASE + (copy * (n + 1) + i) * PG),
                vec![b; PG]
            );
        }
    }
}

#[test]
fn pairs_put_off_merge_at_the_end_of_their_full_scan_within_the_batch_budget() {
    // Page i pairs with page 39 - i: lone pairs (one-page runs), put off to the end
    // of the scan, which works through them one page per batch here.
    let n = 40;
    let mut c = core_with(n);
    for i in 0..n {
        fill(&mut c, i, 1 + i.min(n - 1 - i) as u8);
    }
    c.advise(BASE, BASE + n * PG);
    let mut batches = 0;
    for _ in 0..2 {
        while !c.scan_batch(1) {
            batches += 1;
        }
    }
    let k = c.counters();
    assert_eq!(k.full_scans, 2);
    assert_eq!((k.pages_shared, k.pages_sharing), (20, 20), "{k:?}");
    assert!(
        batches > 2 * n,
        "the end of the scan took batches of its own: {batches}"
    );
    c.check_invariants();
    for i in 0..n {
        assert_eq!(
            c.mem.read_page(BASE + i * PG),
            vec![1 + i.min(n - 1 - i) as u8; PG]
        );
    }
}

#[test]
fn a_pair_put_off_keeps_the_counters_whatever_the_end_of_the_scan_does_with_it() {
    // Two pages of zeros pair up (use_zero_pages off) and are put off; then
    // use_zero_pages is switched on, so the end of the scan drops them to the zero
    // page instead: counted out of the unstable index as at a visit.
    let n = 8;
    let mut c = core_with(n);
    for i in 0..n {
        fill(&mut c, i, if i == 1 || i == 6 { 0 } else { 10 + i as u8 });
    }
    c.advise(BASE, BASE + n * PG);
    c.scan_full(1);
    let end = BASE + n * PG;
    while c.cursor != Some(end) {
        assert!(!c.scan_batch(1), "the scan ended before its end phase");
    }
    assert!(c.deferred > 0, "the pair of zeros was put off");
    c.use_zero_pages = true;
    while !c.scan_batch(1) {}
    c.check_invariants();
    assert_eq!(c.counters().ksm_zero_pages, 2);
    for i in 0..n {
        let b = if i == 1 || i == 6 { 0 } else { 10 + i as u8 };
        assert_eq!(c.mem.read_page(BASE + i * PG), vec![b; PG]);
    }
}

#[test]
fn a_page_in_a_run_stays_there() {
    // A and B are merged as one run; C matches B's first half only, then its own
    // content, then B's second half again. C's runs must not pull B's pages out of
    // their run (which would split it and leave A alone on its frames).
    let n = 8;
    let mut c = core_with(3 * (n + 1));
    for copy in 0..3 {
        for i in 0..n {
            fill(&mut c, copy * (n + 1) + i, 10 + i as u8);
        }
        fill(&mut c, copy * (n + 1) + n, 1 + copy as u8);
    }
    fill(&mut c, 2 * (n + 1) + 4, 99);
    c.advise(BASE, BASE + 3 * (n + 1) * PG);
    c.scan_full(2);
    let a = frames_of(&c, 0, n);
    assert!(a.windows(2).all(|w| w[1] == w[0] + 1), "{a:?}");
    assert_eq!(frames_of(&c, n + 1, n), a, "B stays on A's frames");
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (8, 15), "{k:?}");
    c.check_invariants();
}

#[test]
fn a_page_that_differs_inside_a_copied_run_is_covered_and_keeps_its_bytes() {
    // B is A with page 7 changed: the run covers page 7 on both sides (each keeps
    // its own bytes, privately, inside the run's one mapping) instead of splitting.
    let n = 16;
    let mut c = core_with(2 * n + 1);
    let want = |copy: usize, i: usize| -> Vec<u8> {
        let mut v = vec![10 + i as u8; PG];
        if copy == 1 && i == 7 {
            v[100] = 0xEE;
        }
        v
    };
    for copy in 0..2 {
        for i in 0..n {
            c.mem
                .write(BASE + (copy * (n + 1) + i) * PG, &want(copy, i));
        }
    }
    fill(&mut c, n, 1);
    c.advise(BASE, BASE + (2 * n + 1) * PG);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (15, 15), "{k:?}");
    assert_eq!(c.vmas_added(), 2, "one mapping per copy");
    let r = c.region_at(BASE).unwrap();
    let f0 = r.pages[0].frame();
    for copy in 0..2 {
        let i = copy * (n + 1) + 7;
        assert_eq!(
            (r.pages[i].state(), r.covered_frame(i)),
            (State::Unstable, Some(f0 + 7))
        );
    }
    assert_eq!(c.mem.frames_held(), 15, "the covered offset holds no frame");
    c.check_invariants();
    let check = |c: &mut Core<FakeMem>, w: &dyn Fn(usize, usize) -> Vec<u8>| {
        for copy in 0..2 {
            for i in 0..n {
                assert_eq!(
                    c.mem.read_page(BASE + (copy * (n + 1) + i) * PG),
                    w(copy, i)
                );
            }
        }
    };
    check(&mut c, &want);
    // Writes into a covered page and a merged page, then more scans: still exact.
    c.mem.write(BASE + 7 * PG + 1, &[0x77]);
    c.mem.write(BASE + 3 * PG + 2, &[0x33]);
    c.scan_full(3);
    c.check_invariants();
    let want2 = |copy: usize, i: usize| {
        let mut v = want(copy, i);
        match (copy, i) {
            (0, 7) => v[1] = 0x77,
            (0, 3) => v[2] = 0x33,
            _ => {}
        }
        v
    };
    check(&mut c, &want2);
    // Unmerging leaves no page in a pool mapping.
    c.unadvise(BASE, BASE + (2 * n + 1) * PG).unwrap();
    check(&mut c, &want2);
    let r = c.region_at(BASE).unwrap();
    assert!((0..r.pages.len()).all(|i| r.covered_frame(i).is_none()));
    assert_eq!(r.covered_frames().count(), 0);
    assert_eq!(c.vmas_added(), 0);
    c.check_invariants();
}

#[test]
fn covered_pages_equal_to_each_other_merge_in_place() {
    // A's page 5 changed: B and C cover page 5 where A's run has no frame; a later
    // scan merges B5 and C5 onto that very frame offset, so no mapping splits.
    let n = 12;
    let mut c = core_with(3 * (n + 1));
    for copy in 0..3 {
        for i in 0..n {
            let mut v = vec![40 + i as u8; PG];
            if copy == 0 && i == 5 {
                v[9] = 0xAB;
            }
            c.mem.write(BASE + (copy * (n + 1) + i) * PG, &v);
        }
        fill(&mut c, copy * (n + 1) + n, 1 + copy as u8);
    }
    c.advise(BASE, BASE + 3 * (n + 1) * PG);
    c.scan_full(4);
    let k = c.counters();
    // Pages 0..n except 5 shared by 3 copies; page 5 by B and C.
    assert_eq!((k.pages_shared, k.pages_sharing), (12, 23), "{k:?}");
    assert_eq!(
        c.vmas_added(),
        5,
        "one mapping per copy (and one per separator)"
    );
    let r = c.region_at(BASE).unwrap();
    let f0 = r.pages[0].frame();
    assert_eq!(r.covered_frame(5), Some(f0 + 5), "A5 stays covered");
    for copy in 1..3 {
        let p = r.pages[copy * (n + 1) + 5];
        assert_eq!((p.state(), p.frame()), (State::Stable, f0 + 5));
    }
    c.check_invariants();
    for copy in 0..3 {
        for i in 0..n {
            let mut v = vec![40 + i as u8; PG];
            if copy == 0 && i == 5 {
                v[9] = 0xAB;
            }
            assert_eq!(c.mem.read_page(BASE + (copy * (n + 1) + i) * PG), v);
        }
    }
}

#[test]
fn with_write_tracking_a_settled_scan_hashes_only_written_pages() {
    let n = 64;
    let mut c = core_with(n);
    c.mem.tracking = true;
    c.smart_scan = false; // every page visited at every scan
    for i in 0..n {
        fill(&mut c, i, 100 + i as u8);
    }
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    let hashed = c.counters().pages_hashed;
    c.scan_full(2);
    let k = c.counters();
    assert_eq!(k.pages_hashed, hashed, "nothing written: nothing hashed");
    assert_eq!(
        k.pages_unshared, n as u64,
        "every page still in the unstable index"
    );
    assert!(c.settled);
    // A write is seen at the next scan: that page alone is hashed again.
    c.mem.write(BASE + 7 * PG, &[1]);
    c.scan_full(1);
    assert_eq!(c.counters().pages_hashed, hashed + 1);
    assert!(!c.settled);
    // A page made equal to another merges with it (bytes compared, as always).
    c.mem.write(BASE + 9 * PG, &vec![100 + 3; PG]);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (1, 1), "{k:?}");
    c.check_invariants();
    for i in 0..n {
        let b = match i {
            9 => 103,
            _ => 100 + i as u8,
        };
        let mut want = vec![b; PG];
        if i == 7 {
            want[0] = 1;
        }
        assert_eq!(c.mem.read_page(BASE + i * PG), want, "page {i}");
    }
}

#[test]
fn a_write_taken_by_a_probe_is_not_forgotten_when_the_batch_stops_before_the_page() {
    // Fuzzer finding: a batch probes up to 512 pages, which takes their written
    // state, but its budget may end before it visits them all. A page written then
    // must still be hashed again at its visit, not trusted on its old checksum.
    let n = 16;
    let mut c = core_with(n);
    c.mem.tracking = true;
    c.smart_scan = false;
    for i in 0..n {
        fill(&mut c, i, 50 + i as u8);
    }
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    fill(&mut c, 10, 52); // now equal to page 2
    while !c.scan_batch(4) {} // the first batch probes all 16, visits 4
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (1, 1), "{k:?}");
    assert_eq!(c.mem.read_page(BASE + 10 * PG), vec![52; PG]);
    c.check_invariants();
}

#[test]
fn a_full_scan_that_passed_a_new_region_by_does_not_settle() {
    // Settled memory, then a scan stopped halfway (ksmd stopped, or a budget).
    let mut c = core_with(64);
    for i in 0..64 {
        fill(&mut c, i, i as u8 + 1);
    }
    c.advise(BASE, BASE + 64 * PG);
    c.scan_full(3);
    assert!(c.settled());
    assert!(!c.scan_batch(32), "the scan stops halfway");
    // New memory behind the cursor: the rest of this scan never visits it.
    let below = BASE - 16 * PG;
    c.add_region(Region::new(
        below,
        16,
        true,
        libc::PROT_READ | libc::PROT_WRITE,
    ));
    for i in 0..16 {
        c.mem.write(below + i * PG, &vec![0xee; PG]);
    }
    c.advise(below, BASE);
    while !c.scan_batch(u64::MAX) {}
    assert!(!c.settled(), "settled before its pages were ever visited");
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, 15, "the new pages merged");
    c.scan_full(1);
    assert!(c.settled());
    c.check_invariants();
}

/// Fill copy `copy` (pages `copy * (n + 1) ..`, one separator page between copies)
/// with the pages `100 + i`.
fn fill_copies(c: &mut Core<FakeMem>, copies: usize, n: usize) {
    for copy in 0..copies {
        for i in 0..n {
            fill(c, copy * (n + 1) + i, 100 + i as u8);
        }
    }
    c.advise(BASE, BASE + (copies * (n + 1)) * PG);
}

#[test]
fn a_page_written_since_its_checksum_ends_a_pair_run_under_protection() {
    // Runs are planned by the checksums of the pages' last visits: a page written since
    // joins the plan and the merge, comparing under protection, ends the run there.
    let n = 10;
    let mut c = core_with(2 * (n + 1));
    fill_copies(&mut c, 2, n);
    c.scan_full(1);
    let b5 = BASE + (n + 1 + 5) * PG;
    c.mem.write(b5, &[7; 16]);
    c.scan_full(1);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (9, 9), "{k:?}");
    assert_eq!(k.merge_failures, 0, "{k:?}");
    assert!(c.mem.tails_released >= 2, "both windows shrink");
    assert!(!c.mem.maps_frame(b5) && !c.mem.maps_frame(BASE + 5 * PG));
    // Nothing stays protected (the fake asserts it on a write), and every byte holds.
    for copy in 0..2 {
        for i in 0..n {
            let a = BASE + (copy * (n + 1) + i) * PG;
            let mut want = vec![100 + i as u8; PG];
            if a == b5 {
                want[..16].fill(7);
            }
            assert_eq!(c.mem.read_page(a), want, "copy {copy} page {i}");
            c.mem.write(a + 100, &[want[100]]);
        }
    }
    c.check_invariants();
}

#[test]
fn a_pair_written_alike_since_its_checksum_ends_the_run_at_the_frame_check() {
    // Both pages of a pair written alike since their last visit compare equal under
    // protection, but the frame filled from them no longer has the checksum the run was
    // planned (and the frame allocated) with: the run ends before it, as the volatility
    // rule wants, and no frame is indexed under a key that is not its bytes'.
    let n = 10;
    let mut c = core_with(2 * (n + 1));
    fill_copies(&mut c, 2, n);
    c.scan_full(1);
    // The next scan visits the first copy, then both are written alike, then it goes on.
    assert!(!c.scan_batch(n as u64));
    let (a5, b5) = (BASE + 5 * PG, BASE + (n + 1 + 5) * PG);
    c.mem.write(a5, &[9; 32]);
    c.mem.write(b5, &[9; 32]);
    assert!(c.scan_batch(u64::MAX));
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (9, 9), "{k:?}");
    assert!(c.mem.tails_released >= 2);
    assert!(!c.mem.maps_frame(a5) && !c.mem.maps_frame(b5));
    c.check_invariants();
    // Unchanged from now on, they merge like any pair.
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (10, 10), "{k:?}");
    let mut want = vec![105u8; PG];
    want[..32].fill(9);
    assert_eq!(c.mem.read_page(a5), want);
    assert_eq!(c.mem.read_page(b5), want);
    c.check_invariants();
}

#[test]
fn a_page_written_since_its_checksum_ends_a_stable_run_under_protection() {
    // The third copy maps the frames of the first two by checksum plan; its page 5,
    // written since its last visit, differs from frame 5 under protection: the run
    // ends before it, the rest of the copy merges in a run of its own.
    let n = 10;
    let mut c = core_with(3 * (n + 1));
    fill_copies(&mut c, 3, n);
    c.scan_full(1);
    let c5 = BASE + (2 * (n + 1) + 5) * PG;
    c.mem.write(c5, &[3; 8]);
    let before = c.mem.tails_released;
    c.scan_full(1);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (10, 19), "{k:?}");
    assert_eq!(k.merge_failures, 0, "{k:?}");
    assert!(c.mem.tails_released > before);
    assert!(!c.mem.maps_frame(c5));
    let mut want = vec![105u8; PG];
    want[..8].fill(3);
    assert_eq!(c.mem.read_page(c5), want);
    c.mem.write(c5 + PG, &[1]);
    c.check_invariants();
}

/// Pages 0..n of the region: copies of a 64-page pattern (runs merge as copied runs),
/// every 10th page changed (covered pages inside the runs), every 7th page unique.
fn fill_mixed(c: &mut Core<FakeMem>, n: usize) {
    for i in 0..n {
        let byte = if i % 7 == 0 {
            (i % 251) as u8 ^ 0x80
        } else {
            (i % 64) as u8
        };
        let mut page = vec![byte; PG];
        if i % 10 == 3 {
            page[9] = (i / 10) as u8;
            page[10] = (i / 2560) as u8;
        }
        c.mem.write(BASE + i * PG, &page);
    }
}

#[test]
fn metadata_is_given_back_when_the_merged_memory_is_unadvised() {
    let n = 4096;
    let mut c = core_with(n);
    fill_mixed(&mut c, n);
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    assert!(c.counters().pages_sharing > 1000, "{:?}", c.counters());
    // Half a scan: the unstable index holds part of this scan's pages.
    c.scan_batch(n as u64 / 2);
    let merged = c.metadata_bytes();
    assert!(merged >= 8 * n as u64, "{merged}");
    c.unadvise(BASE, BASE + n * PG).unwrap();
    c.check_invariants();
    assert_eq!(c.frames().live(), 0);
    // What stays is the records of ksm's own memory, held until it is unmapped.
    let records = (n * std::mem::size_of::<PageRec>()) as u64;
    assert_eq!(c.metadata_bytes(), records, "from {merged} bytes");
}

#[test]
fn metadata_is_given_back_when_the_merged_region_goes() {
    let n = 4096;
    let mut c = core_with(n);
    fill_mixed(&mut c, n);
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    c.scan_batch(n as u64 / 3);
    let merged = c.metadata_bytes();
    for i in 0..n {
        c.mem.unmap(BASE + i * PG);
    }
    c.remove_region(BASE);
    c.check_invariants();
    assert_eq!(c.metadata_bytes(), 0, "from {merged} bytes");
    // And it comes back as it was for the next workload.
    c.add_region(Region::new(
        BASE,
        n,
        true,
        libc::PROT_READ | libc::PROT_WRITE,
    ));
    fill_mixed(&mut c, n);
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    assert!(c.counters().pages_sharing > 1000);
    c.check_invariants();
}

#[test]
fn metadata_of_a_merged_region_stays_within_16_bytes_a_page_between_scans() {
    let n = 4096;
    let mut c = core_with(n);
    fill_mixed(&mut c, n);
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    let per_page = c.metadata_bytes() as f64 / n as f64;
    assert!(per_page <= 16.0, "{per_page} bytes per page");
}

#[test]
fn unique_pages_stay_out_of_the_unstable_index_and_pairs_still_merge() {
    // 4,096 unique pages and 64 pairs: the unstable index of a scan holds the pages
    // whose checksum another page held when it began (and the few whose filter cell
    // another key shares), not all 4,224 candidates: 7.5 bytes per page less.
    let (n, pairs) = (4096, 64);
    let total = n + 2 * pairs;
    let mut c = core_with(total);
    for i in 0..n {
        c.mem.write(BASE + i * PG, &page_of(i));
    }
    for k in 0..pairs {
        let p = page_of(1_000_000 + k);
        c.mem.write(BASE + (n + 2 * k) * PG, &p);
        c.mem.write(BASE + (n + 2 * k + 1) * PG, &p);
    }
    c.advise(BASE, BASE + total * PG);
    c.scan_full(1);
    // The second scan: every page a candidate; the pairs merge as before.
    c.scan_full(1);
    let k = c.counters();
    assert_eq!(
        (k.pages_shared, k.pages_sharing),
        (pairs as u64, pairs as u64)
    );
    assert_eq!(k.pages_unshared, n as u64);
    // Most of a third: the index holds at most a quarter of the unique pages (let
    // through by filter cells another key shares), where it held all of them.
    assert!(!c.scan_batch((total - 8) as u64), "the scan goes on");
    let held = c.unstable.len();
    assert!(
        held < n / 4,
        "{held} of {n} unique pages in the unstable index"
    );
    c.scan_full(1);
    let per_page = c.metadata_peak_bytes() as f64 / total as f64;
    assert!(per_page < 12.0, "{per_page} bytes per page");
    c.check_invariants();
}

#[test]
fn a_write_before_a_merge_window_that_ends_short_is_not_forgotten() {
    // Two copies of 2048 pages; after the first scan, B[700] and B[1024..1536) are
    // written. The run planned through B from the recorded checksums is cut at 700:
    // the pages past the cut leave write tracking and come back without the writes
    // the tracker had not reported (as the kernel does), so their checksums must not
    // be trusted any more.
    let n = 2048;
    let mut c = two_tracked_copies(n, 1);
    c.mem.write(BASE + (n + 700) * PG, &page_of(99_999));
    for i in 1024..1536 {
        c.mem.write(BASE + (n + i) * PG, &page_of(200_000 + i));
    }
    c.scan_full(1);
    for i in 1024..1536 {
        c.mem.write(BASE + i * PG, &page_of(200_000 + i)); // A[i] = B[i] now
    }
    c.scan_full(4);
    let k = c.counters();
    assert_eq!(k.pages_sharing, n as u64 - 1, "{k:?}");
    assert!(c.settled());
    c.check_invariants();
}

/// What a scan history leaves, to compare two runs of it: the counters, whether the
/// last full scan settled, the frames holding bytes, and every page's record and bytes.
type Outcome = (Counters, bool, usize, Vec<(PageRec, Vec<u8>)>);

fn outcome(c: &Core<FakeMem>) -> Outcome {
    let pages = c
        .regions()
        .flat_map(|r| (0..r.pages.len()).map(move |i| (r.pages[i], r.start + i * PG)))
        .map(|(rec, a)| (rec, c.mem.read_page(a)))
        .collect();
    (c.counters(), c.settled(), c.mem.frames_held(), pages)
}

/// A scan history over copies, runs with a differing page, zero pages, unique pages and
/// memory ksm does not own, written between batches (ahead of the cursor and behind
/// it, merged pages too), on `threads` hash threads: the outcome after each step.
fn hash_threads_history(threads: usize, tracking: bool) -> (Vec<Outcome>, u64, u64, usize) {
    let n = 700;
    let foreign = BASE + 0x1000_0000;
    let mut c = core_with(3 * (n + 1) + 300);
    c.add_region(Region::new(
        foreign,
        600,
        false,
        libc::PROT_READ | libc::PROT_WRITE,
    ));
    c.hash_threads = threads;
    c.mem.tracking = tracking;
    c.smart_scan = true;
    c.use_zero_pages = true;
    let unique = |i: usize| {
        let mut p = vec![(i % 251) as u8 + 1; PG];
        p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        p
    };
    for copy in 0..3 {
        for i in 0..n {
            c.mem
                .write(BASE + (copy * (n + 1) + i) * PG, &unique(50_000 + i));
        }
    }
    fill(&mut c, n + 1 + 5, 7); // copy 1 differs at page 5: covered in the run
    for i in 0..200 {
        c.mem.write(BASE + (3 * (n + 1) + i) * PG, &unique(i));
    }
    // 100 pages of zeros (use_zero_pages). Foreign memory: a copy of the first 300
    // pages of copy 0, then unique pages.
    for i in 200..300 {
        fill(&mut c, 3 * (n + 1) + i, 0);
    }
    for i in 0..600 {
        let p = if i < 300 {
            unique(50_000 + i)
        } else {
            unique(10_000 + i)
        };
        c.mem.write(foreign + i * PG, &p);
    }
    c.advise(BASE, BASE + (3 * (n + 1) + 300) * PG);
    c.advise(foreign, foreign + 600 * PG);
    let mut out = Vec::new();
    c.scan_full(1);
    out.push(outcome(&c));
    // Batches of a second scan, with writes between them, and one racing with the
    // first merge window (copy 1 is written again, so that it is hashed again).
    for i in 0..n {
        c.mem.write(
            BASE + (n + 1 + i) * PG,
            &c.mem.read_page(BASE + (n + 1 + i) * PG),
        );
    }
    c.mem.writes_at_protect = vec![(BASE + (n + 1 + 100) * PG, unique(7))];
    for (step, &(page, like)) in [(20, 1), (1500, 2), (n + 1 + 30, 40)].iter().enumerate() {
        c.scan_batch(900);
        c.mem.write(BASE + page * PG, &unique(50_000 + like));
        c.mem
            .write(foreign + (310 + step) * PG, &unique(50_000 + 3));
        out.push(outcome(&c));
    }
    c.scan_full(2);
    out.push(outcome(&c));
    // Merged pages written (copy on write), a merged run cut short.
    fill(&mut c, 3, 9);
    fill(&mut c, 2 * (n + 1) + 400, 9);
    c.mem.write(foreign + 100 * PG, &[1]);
    for i in 0..4 {
        c.scan_batch(1000);
        fill(&mut c, 600 + i, 0xee);
        out.push(outcome(&c));
    }
    c.scan_full(6); // smart scan skips what never merges
    out.push(outcome(&c));
    c.check_invariants();
    (
        out,
        c.mem.sums_ahead,
        c.mem.owned_sums_ahead,
        c.mem.most_sum_threads,
    )
}

#[test]
fn checksums_taken_ahead_on_several_threads_change_nothing() {
    for tracking in [false, true] {
        let (one, ahead, owned, _) = hash_threads_history(1, tracking);
        // One hash thread: each visit hashes its page of ksm's own memory; other
        // memory is read (many pages per call) ahead of the visits.
        assert_eq!(
            owned, 0,
            "one hash thread: ksm's own pages hashed at their visits"
        );
        assert!(ahead > 0, "one hash thread: foreign pages read ahead");
        let (three, ahead, _, most) = hash_threads_history(3, tracking);
        assert!(
            ahead > 0 && most == 3,
            "{ahead} checksums ahead, {most} threads"
        );
        assert_eq!(one.len(), three.len());
        for (step, (a, b)) in one.iter().zip(&three).enumerate() {
            assert_eq!(a.0, b.0, "counters after step {step} (tracking {tracking})");
            assert_eq!((a.1, a.2), (b.1, b.2), "settled, frames after step {step}");
            for (i, (pa, pb)) in a.3.iter().zip(&b.3).enumerate() {
                assert!(
                    pa.0 == pb.0 && pa.1 == pb.1,
                    "page {i} after step {step} (tracking {tracking}): {:?} vs {:?}",
                    (pa.0.state(), pa.0.flags(), pa.0.age(), pa.0.skips()),
                    (pb.0.state(), pb.0.flags(), pb.0.age(), pb.0.skips()),
                );
            }
        }
        let last = &one.last().unwrap().0;
        assert!(
            last.pages_sharing > 1000 && last.ksm_zero_pages > 0,
            "{last:?}"
        );
    }
}

#[test]
fn a_checksum_taken_ahead_is_not_used_after_a_merge_window_took_the_page() {
    // Two copies of 64 pages, write-tracked, B written (the same bytes) after the first
    // scan, so that the second hashes it. There, B[0]'s visit merges B with A as a run;
    // the application writes B[10] just before the window protects it (after the batch
    // took its checksum ahead), so the run ends at 10 and B[10..] come back to the
    // tracker, which forgets that write (as the kernel's does). B[10]'s visit must hash
    // it again, not use the checksum taken before the write: the tracker vouches for
    // it from then on, and later scans would trust the old content's checksum.
    let n = 64;
    for threads in [1, 3] {
        let mut c = two_tracked_copies(n, threads);
        for i in 0..n {
            c.mem.write(BASE + (n + i) * PG, &page_of(i)); // B written again: hashed again
        }
        c.mem.writes_at_protect = vec![(BASE + (n + 10) * PG, page_of(1_000))];
        c.scan_full(1);
        assert_eq!(
            c.counters().pages_sharing,
            n as u64 - 1,
            "threads {threads}"
        );
        let b10 = c.rec(BASE + (n + 10) * PG).unwrap();
        assert!(b10.sum_tracked(), "threads {threads}: hashed while tracked");
        assert_eq!(
            b10.checksum(),
            checksum(&page_of(1_000)),
            "threads {threads}"
        );
        c.mem.write(BASE + 10 * PG, &page_of(1_000)); // A[10] = B[10] now
        c.scan_full(3);
        let k = c.counters();
        assert_eq!(k.pages_sharing, n as u64, "threads {threads}: {k:?}");
        assert!(c.settled());
        c.check_invariants();
    }
}

#[test]
fn merged_pages_moved_over_owned_memory_keep_their_frames_until_unmapped() {
    // Review finding: an application `mremap` onto memory ksm owns (which it must not
    // do) made `relocate` forget the moved records as unmapped, which freed the frames
    // the destination still maps: punched, then filled with other bytes. (The fake
    // panics on a punch or rewrite of a mapped frame; the bytes are checked as well.)
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // (the other copy lets go of the frames first, ksm's pages moved over were merged
    // on the same frames)
    for (other_first, dest_merged) in [(false, false), (true, false), (false, true)] {
        let mut c = core_with(8);
        let (f, g, to) = (BASE + 16 * PG, BASE + 32 * PG, BASE + PG);
        for start in [f, g, to] {
            if start != to {
                c.add_region(Region::new(start, 2, false, rw));
            }
            for i in 0..2 {
                let b = if start == to && !dest_merged {
                    0x50
                } else {
                    0x60
                };
                c.mem.write(start + i * PG, &vec![b + i as u8; PG]);
            }
            c.advise(start, start + 2 * PG);
        }
        c.scan_full(2);
        let k = c.counters();
        let sharing = if dest_merged { 4 } else { 2 };
        assert_eq!((k.pages_shared, k.pages_sharing), (2, sharing), "{k:?}");
        if other_first {
            // g's pages copy away: the moved ones hold the frames' last references.
            for i in 0..2 {
                c.mem.write(g + i * PG, &[1]);
            }
            c.scan_full(1);
        }
        // f moves over pages 1 and 2 of the owned region.
        c.mem.mremap(f, to, 2 * PG);
        c.relocate(f, to, 2 * PG);
        c.check_invariants();
        for i in 0..2 {
            c.mem.write(g + i * PG, &[2]);
        }
        // Other pages merge meanwhile: frames freed would be taken for them.
        for i in 4..8 {
            fill(&mut c, i, 0x70 + (i % 2) as u8);
        }
        c.advise(BASE + 4 * PG, BASE + 8 * PG);
        c.scan_full(3);
        c.check_invariants();
        assert_eq!(c.counters().pages_sharing, 2);
        for i in 0..2 {
            assert_eq!(c.mem.read_page(to + i * PG), vec![0x60 + i as u8; PG]);
        }
        assert_eq!(
            c.frames().suspects(),
            2,
            "held until no mapping of them is left"
        );
        assert!(c.region_at(f).is_none(), "the moved records are forgotten");
        assert!(!c.rec(to).unwrap().advised(), "and ksm's pages moved over");
        // Still mapped: kept.
        let mapped = c.mem.mapped_frames();
        c.free_unmapped_suspects(|x| mapped.contains(&x));
        assert_eq!(c.frames().suspects(), 2);
        // ksm unmaps its memory (with what was moved there): they go.
        for i in 0..8 {
            c.mem.unmap(BASE + i * PG);
        }
        c.remove_region(BASE);
        let mapped = c.mem.mapped_frames();
        c.free_unmapped_suspects(|x| mapped.contains(&x));
        assert_eq!(c.frames().suspects(), 0);
        assert_eq!(c.mem.frames_held(), c.frames().live() as usize);
        c.check_invariants();
    }
}

#[test]
fn write_tracking_switched_off_and_on_tracks_registered_memory_again() {
    // Review finding: switching `write_tracking` back on tracked only memory
    // registered from then on, so every later scan hashed the rest again.
    let n = 32;
    let mut c = core_with(n);
    c.regions_mut().for_each(|r| r.registered = true);
    c.mem.tracking = true;
    c.smart_scan = false;
    for i in 0..n {
        fill(&mut c, i, 100 + i as u8);
    }
    c.advise(BASE, BASE + n * PG);
    c.scan_full(3);
    let h = c.counters().pages_hashed;
    c.scan_full(1);
    assert_eq!(c.counters().pages_hashed, h, "tracked: nothing hashed");
    c.set_write_tracking(false);
    // Written while untracked: the tracker, given the page back, reports no write,
    // but its old checksum must not be trusted.
    fill(&mut c, 9, 7);
    c.set_write_tracking(true);
    c.scan_full(2);
    let h = c.counters().pages_hashed;
    c.scan_full(1);
    assert_eq!(
        c.counters().pages_hashed,
        h,
        "unchanged memory tracked again: nothing hashed"
    );
    // Page 9 is indexed under its new bytes: a page made equal to it merges with it.
    fill(&mut c, 20, 7);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (1, 1), "{k:?}");
    assert_eq!(c.mem.read_page(BASE + 9 * PG), vec![7; PG]);
    c.check_invariants();
}

/// A page of bytes no other page of these tests has (its number in the first 8).
fn page_numbered(i: usize) -> Vec<u8> {
    let mut p = vec![0x77; PG];
    p[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    p
}

#[test]
fn checksums_ahead_go_no_further_than_the_batch_reaches() {
    // (review) With pages_to_scan 100, checksums taken for pages the batch never
    // visited were taken again by the next batch: 4,980 read for 1,000 hashed.
    for (threads, foreign) in [(1, true), (2, false)] {
        let n = 5000;
        let mut c = core_with(if foreign { 1 } else { n });
        let base = if foreign { BASE + 0x1000_0000 } else { BASE };
        if foreign {
            c.add_region(Region::new(
                base,
                n,
                false,
                libc::PROT_READ | libc::PROT_WRITE,
            ));
        }
        c.hash_threads = threads;
        c.smart_scan = false;
        for i in 0..n {
            let p = if i % 10 == 0 {
                page_numbered(i)
            } else {
                vec![0x5a; PG]
            };
            c.mem.write(base + i * PG, &p);
        }
        c.advise(base, base + n * PG);
        c.scan_full(3);
        let (read0, hashed0) = (c.mem.sums_ahead, c.counters().pages_hashed);
        while !c.scan_batch(100) {}
        while !c.scan_batch(100) {}
        let read = c.mem.sums_ahead - read0;
        let hashed = c.counters().pages_hashed - hashed0;
        assert!(
            read <= hashed + hashed / 4,
            "threads {threads}, foreign {foreign}: {read} pages read ahead for {hashed} hashed"
        );
    }
}

#[test]
fn a_write_after_a_checksum_taken_ahead_is_seen_as_with_one_thread() {
    // (review) A page written between its checksum taken ahead and its visit, with a
    // candidate in an index, is found changed (volatile) as a read at the visit finds it.
    let n = 1100;
    let (u, p1, p2, x) = (0, 10, 500, 1000);
    let mut outcomes = Vec::new();
    for threads in [1, 3] {
        let mut c = core_with(n);
        c.hash_threads = threads;
        c.smart_scan = false;
        for i in 0..n {
            c.mem.write(BASE + i * PG, &page_numbered(i));
        }
        c.mem.write(BASE + x * PG, &page_numbered(u));
        c.mem.write(BASE + p2 * PG, &page_numbered(p1));
        c.advise(BASE, BASE + n * PG);
        c.scan_full(1);
        c.mem.writes_at_protect = vec![
            (BASE + u * PG, page_numbered(9_999)),
            (BASE + x * PG, page_numbered(9_999)),
        ];
        let before = c.counters();
        c.scan_full(1);
        let k = c.counters();
        c.check_invariants();
        let rx = c.rec(BASE + x * PG).unwrap();
        outcomes.push((
            k.merge_failures - before.merge_failures,
            k.pages_unshared,
            k.pages_volatile(),
            rx.state(),
            rx.checksum() == checksum(&page_numbered(9_999)),
        ));
    }
    assert_eq!(outcomes[0], outcomes[1], "hash_threads 1 vs 3");
}

#[test]
fn at_the_budget_a_stale_unstable_entry_puts_off_no_merge() {
    // (review) The budget pre-check counted a put-off merge for an index entry whose
    // page had left the index.
    let n = 20;
    let mut c = core_with(n);
    c.smart_scan = false;
    for i in 0..n {
        c.mem.write(BASE + i * PG, &page_numbered(i));
    }
    c.mem.write(BASE + 5 * PG, &page_numbered(0));
    c.advise(BASE, BASE + n * PG);
    c.mem.vma_allowance = 0;
    c.refresh_vma_allowance();
    c.scan_full(1);
    c.scan_batch(3); // page 0 into the unstable index
    c.unadvise(BASE, BASE + PG).unwrap(); // and out of it, its entry left behind
    while !c.scan_batch(1000) {}
    assert_eq!(
        c.counters().vma_budget_skips,
        0,
        "no page was left to pair with"
    );
    // Whereas a page still in the index is put off (and counted).
    c.scan_full(1);
    c.advise(BASE, BASE + PG);
    c.scan_full(2);
    assert!(c.counters().vma_budget_skips > 0);
}

/// `n` numbered pages advised in a core that joined a domain, scanned twice (so
/// every page is a candidate announced to the domain).
fn domain_member(n: usize) -> Core<FakeMem> {
    let mut c = joined(n, false, |i| i);
    c.scan_full(2);
    c
}

/// `n` pages, page `i` holding `page_of(content(i))`, in a domain, advised, not
/// scanned yet; smart scan as `smart` says.
fn joined(n: usize, smart: bool, content: impl Fn(usize) -> usize) -> Core<FakeMem> {
    let mut c = core_with(n);
    c.smart_scan = smart;
    for i in 0..n {
        c.mem.write(BASE + i * PG, &page_of(content(i)));
    }
    c.join_domain();
    c.advise(BASE, BASE + n * PG);
    c
}

#[test]
fn contents_nobody_else_holds_stay_announced_once_at_about_4_bytes_each() {
    let n = 20_000;
    let mut c = domain_member(n);
    assert_eq!(c.take_domain_out().announce.len(), n);
    // Settled: nothing is said again, and what the member remembers of it is a
    // sorted vector (a hash set of them took 6 to 11 bytes each, and kept the size
    // it had grown to).
    c.scan_full(2);
    assert!(c.take_domain_out().announce.is_empty(), "announced once");
    let d = c.domain.as_ref().expect("joined").metadata_bytes();
    assert!(d <= n * 4 + n / 2, "{d} bytes for {n} contents");
    // Half of the pages written: their new contents are announced once more, and
    // the old ones stay remembered (still held by nobody else, as far as we know).
    for i in (0..n).step_by(2) {
        c.mem.write(BASE + i * PG, &page_of(n + i));
    }
    c.scan_full(3);
    assert_eq!(c.take_domain_out().announce.len(), n / 2);
    c.scan_full(1);
    assert!(c.take_domain_out().announce.is_empty(), "announced once");
    let d = c.domain.as_ref().expect("joined").metadata_bytes();
    assert!(
        d <= (n + n / 2) * 4 + n / 2,
        "{d} bytes for {} contents",
        n + n / 2
    );
}

#[test]
fn a_domain_member_announces_candidates_once_and_publishes_what_it_is_asked_for() {
    let n = 8;
    let mut c = domain_member(n);
    let out = c.take_domain_out();
    let (announced, publish) = (out.announce, out.publish);
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    assert_eq!(announced, sums, "every candidate, in address order");
    assert!(publish.is_empty());
    c.scan_full(1);
    assert!(c.take_domain_out().announce.is_empty(), "announced once");
    // Asked for pages 2..6: the next visits queue them, in address order.
    c.domain_wants(2, &sums[2..6]);
    c.scan_full(1);
    let publish = c.take_domain_out().publish;
    let addrs: Vec<usize> = publish.iter().map(|p| p.0).collect();
    assert_eq!(addrs, (2..6).map(|i| BASE + i * PG).collect::<Vec<_>>());
    assert!(publish.iter().all(|p| p.1), "owned memory");
    // A new broker hears everything again.
    c.domain_connected();
    c.scan_full(1);
    assert_eq!(c.take_domain_out().announce.len(), n);
    c.check_invariants();
}

/// Contents of the pages of `repeats_*` tests: pages 4-5 repeat pages 1-2 (a run of 2
/// between pages published), pages 8-13 repeat pages 0-3 and 1-2 (a run of 6).
const WITH_REPEATS: [usize; 15] = [0, 1, 2, 3, 1, 2, 6, 7, 0, 1, 2, 3, 1, 2, 14];

#[test]
fn repeats_between_pages_a_member_publishes_are_held_again_in_place_in_a_large_domain() {
    let unique = [0usize, 1, 2, 3, 6, 7, 14];
    let sums: Vec<u32> = unique.iter().map(|&i| page_checksum(&page_of(i))).collect();
    let at = |i: usize| BASE + i * PG;
    for (members, twins) in [
        (2u32, vec![]),
        (16, vec![4, 5]),
        (40, vec![4, 5, 8, 9, 10, 11, 12, 13]),
    ] {
        let mut c = joined(WITH_REPEATS.len(), false, |i| WITH_REPEATS[i]);
        c.set_domain_connected(true);
        c.scan_full(2);
        let _ = c.take_domain_out();
        c.domain_wants(members, &sums);
        c.scan_full(1);
        let out = c.take_domain_out();
        let mut want: Vec<usize> = [0, 1, 2, 3, 6, 7, 14].into_iter().chain(twins).collect();
        want.sort_unstable();
        let addrs: Vec<usize> = out.publish.iter().map(|p| p.0).collect();
        assert_eq!(
            addrs,
            want.iter().map(|&i| at(i)).collect::<Vec<_>>(),
            "{members} members"
        );
        // Each page under its own bytes' checksum; only the pages asked for are `asked`.
        for &(a, _, c) in &out.publish {
            assert_eq!(c, page_checksum(&page_of(WITH_REPEATS[(a - BASE) / PG])));
        }
        assert_eq!(out.asked, sums, "{members} members");
        c.check_invariants();
    }
}

#[test]
fn repeats_are_held_in_place_in_a_full_segment_and_what_no_longer_fits_goes_into_the_next() {
    // Every tenth page repeats the page before it; more unique contents are asked for
    // than a segment holds, so the queue is full.
    let most = crate::pool::BLOCK_FRAMES as usize;
    let n = most + most / 8;
    let content = |i: usize| if i % 10 == 5 { i - 1 } else { i };
    let sums: Vec<u32> = (0..n)
        .filter(|i| i % 10 != 5)
        .map(|i| page_checksum(&page_of(i)))
        .collect();
    let mut c = joined(n, false, content);
    c.set_domain_connected(true);
    c.scan_full(2);
    let _ = c.take_domain_out();
    c.domain_wants(16, &sums);
    c.scan_full(1);
    let first = c.take_domain_out();
    // A full segment of pages 0, 1, 2, ... in order, the repeats among them.
    let pages: Vec<usize> = first.publish.iter().map(|p| (p.0 - BASE) / PG).collect();
    let odd = pages.iter().enumerate().find(|&(i, &p)| i != p);
    assert_eq!(
        (pages.len(), odd),
        (most, None),
        "{:?}",
        &pages[..pages.len().min(40)]
    );
    let repeats = (0..most).filter(|i| i % 10 == 5).count();
    // Asked: the pages queued that it holds, not the repeats, nor what did not fit.
    assert_eq!(first.asked.len(), most - repeats);
    assert_eq!(first.asked[..], sums[..most - repeats]);
    // The pages that did not fit go into the next segment, with their repeats.
    let next = c.take_domain_out();
    let queued = most; // the queue held a segment's worth of pages
    let last = (0..n).filter(|i| i % 10 != 5).nth(queued - 1).unwrap();
    let pages: Vec<usize> = next.publish.iter().map(|p| (p.0 - BASE) / PG).collect();
    let odd = pages.iter().enumerate().find(|&(i, &p)| most + i != p);
    assert_eq!((pages.len(), odd), (last + 1 - most, None));
    assert_eq!(next.asked[..], sums[most - repeats..queued]);
    c.check_invariants();
}

#[test]
fn a_batch_ends_when_a_segment_is_queued_so_that_the_rest_is_queued_in_the_same_scan() {
    let most = crate::pool::BLOCK_FRAMES as usize;
    let n = most + most / 2;
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    let mut c = joined(n, false, |i| i);
    c.set_domain_connected(true);
    // Asked for before the pages are candidates (one full scan hashed them): the next
    // full scan's visits queue them.
    c.scan_full(1);
    let _ = c.take_domain_out();
    c.domain_wants(2, &sums);
    // The batch stops at the page that filled the queue, with the budget it left.
    assert!(!c.scan_batch(u64::MAX), "the batch ended early");
    assert!(c.take_publish_cut().is_some_and(|left| left > 0));
    assert!(c.take_publish_cut().is_none(), "taken once");
    let first = c.take_domain_out();
    let pages: Vec<usize> = first.publish.iter().map(|p| (p.0 - BASE) / PG).collect();
    assert_eq!(pages, (0..most).collect::<Vec<_>>());
    // The rest of the same full scan queues the rest.
    assert!(c.scan_batch(u64::MAX), "the full scan ended");
    assert!(c.take_publish_cut().is_none());
    let next = c.take_domain_out();
    let pages: Vec<usize> = next.publish.iter().map(|p| (p.0 - BASE) / PG).collect();
    assert_eq!(pages, (most..n).collect::<Vec<_>>());
    assert!(first.decline.is_empty() && next.decline.is_empty());
    c.check_invariants();
}

#[test]
fn a_checksum_asked_for_is_not_declined_while_its_page_waits_for_room_in_the_queue() {
    // Asked for during a full scan, after its pages were visited: those pages are in
    // the scan's unstable index, and are queued at once, as many as the queue holds (a
    // segment's worth). Nothing takes the queue out during the scan (a core driven
    // without an engine), so the others wait for room: they still hold their
    // checksums, and are not declined at that scan's end; the next full scan queues
    // them.
    let most = crate::pool::BLOCK_FRAMES as usize;
    let n = most + 64;
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    let mut c = joined(n, false, |i| i);
    c.set_domain_connected(true);
    c.scan_full(2);
    let _ = c.take_domain_out();
    assert!(
        !c.scan_batch(n as u64 - 1),
        "the last page is left, the scan goes on"
    );
    c.domain_wants(2, &sums[..n - 1]);
    assert!(c.publish_queue_full(), "queued at the ask");
    while !c.scan_batch(1) {}
    let out = c.take_domain_out();
    assert!(out.decline.is_empty(), "{} declined", out.decline.len());
    assert_eq!(out.publish.len(), most);
    let queued: std::collections::HashSet<u32> = out.publish.iter().map(|p| p.2).collect();
    // The next full scan queues the rest.
    c.scan_full(1);
    let out = c.take_domain_out();
    assert!(out.decline.is_empty(), "{} declined", out.decline.len());
    let rest: Vec<u32> = out.publish.iter().map(|p| p.2).collect();
    let want: Vec<u32> = sums[..n - 1]
        .iter()
        .copied()
        .filter(|s| !queued.contains(s))
        .collect();
    assert_eq!(want.len(), n - 1 - most);
    assert_eq!(rest, want);
    c.check_invariants();
}

#[test]
fn a_segment_holding_repeats_in_place_is_mapped_in_one_run() {
    // Another member's segment of pages 0-7, pages 4-5 held again in place: pages 0-7
    // of ours map frames f0.. f0 + 7 in order (without the repeats, pages 4-5 would map
    // the frames of pages 1-2: two more mappings).
    let mut c = joined(WITH_REPEATS.len(), false, |i| WITH_REPEATS[i]);
    c.scan_full(2);
    let frames: Vec<Vec<u8>> = (0..8).map(|i| page_of(WITH_REPEATS[i])).collect();
    let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    let f0 = c.add_segment(3, &sums).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(2);
    for i in 0..8 {
        let r = c.rec(BASE + i * PG).unwrap();
        assert_eq!(
            (r.state(), r.frame()),
            (State::Stable, f0 + i as FrameId),
            "page {i}"
        );
    }
    c.check_invariants();
}

#[test]
fn a_domain_member_at_its_vma_budget_announces_and_claims_nothing_until_it_has_room() {
    let n = 8;
    // Pages 0-5 unique, 6 and 7 the bytes of page 0 (a content held twice).
    let mut c = joined(n, false, |i| if i >= 6 { 0 } else { i });
    c.mem.vma_allowance = 0;
    c.refresh_vma_allowance();
    c.scan_full(3);
    let out = c.take_domain_out();
    assert!(out.announce.is_empty(), "announced {:?}", out.announce);
    assert!(out.claim.is_empty(), "claimed {:?}", out.claim);
    // Room again (the engine has the budget counted afresh at each full scan): it
    // announces.
    c.mem.vma_allowance = 1000;
    c.count_vmas_when_needed();
    c.scan_full(2);
    let out = c.take_domain_out();
    assert!(!out.announce.is_empty() || !out.claim.is_empty());
    c.check_invariants();
}

#[test]
fn pages_merge_onto_a_domain_segment_as_one_run_and_count_as_saved() {
    let n = 8;
    let mut c = domain_member(n);
    // A segment another member published: the bytes of pages 1..7 (one differs).
    let mut frames: Vec<Vec<u8>> = (1..7).map(page_of).collect();
    frames[3][100] ^= 1; // page 4's bytes differ: same checksum claimed, other bytes
    let mut sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    sums[3] = page_checksum(&page_of(4)); // a lie (or a collision): bytes decide
    let f0 = c.add_segment(42, &sums).unwrap();
    assert!(crate::pool::is_domain(f0));
    c.mem.add_segment(f0, &frames);
    assert!(c.add_segment(42, &sums).is_none(), "taken once");
    c.scan_full(1);
    let k = c.counters();
    // Pages 1,2,3 and 5,6 map frames 0,1,2 and 4,5; page 4 stays its own.
    assert_eq!((k.pages_shared, k.pages_sharing), (0, 5));
    for i in [1, 2, 3, 5, 6] {
        assert!(c.mem.maps_frame(BASE + i * PG), "page {i}");
    }
    assert!(
        !c.mem.maps_frame(BASE + 4 * PG),
        "bytes differ: never mapped"
    );
    for i in 0..n {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i), "page {i}");
    }
    assert_eq!(
        frames_of(&c, 1, 3),
        vec![f0, f0 + 1, f0 + 2],
        "consecutive frames of one segment"
    );
    c.check_invariants();
    // A write copies the page away; the segment's frame is never punched.
    c.mem.write(BASE + PG, &page_of(100));
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 4);
    assert_eq!(c.frames().refs(f0), 0);
    assert!(c.frames().exists(f0), "offered still");
    // Retired: out of the index, kept while mapped; gone once nothing maps it.
    c.retire_segment(42, false);
    assert!(c.drop_unmapped_segments().is_empty());
    c.unadvise(BASE, BASE + n * PG).unwrap();
    assert_eq!(c.drop_unmapped_segments(), vec![(42, f0)]);
    assert_eq!(c.counters().pages_sharing, 0);
    for i in 2..n {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i), "page {i}");
    }
    c.check_invariants();
}

#[test]
fn leaving_the_domain_keeps_merged_pages_and_stops_new_merges() {
    let n = 4;
    let mut c = domain_member(n);
    let frames: Vec<Vec<u8>> = (0..n).map(page_of).collect();
    let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    let f0 = c.add_segment(7, &sums[..2]).unwrap();
    c.mem.add_segment(f0, &frames[..2]);
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 2);
    c.leave_domain();
    assert!(!c.in_domain());
    assert!(
        c.add_segment(8, &sums[2..]).is_none(),
        "no domain, no segment"
    );
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, 2, "merged pages stay merged");
    for i in 0..n {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i));
    }
    c.check_invariants();
}

#[test]
fn in_a_domain_two_equal_pages_of_one_process_are_published_not_pooled() {
    let mut c = joined(4, false, |i| i % 2);
    c.scan_full(2);
    // No broker answers: contents held twice are published at once.
    let publish = c.take_domain_out().publish;
    // Pages 2 and 3 found pages 0 and 1: one page of each content is queued, once.
    let sums: Vec<u32> = publish.iter().map(|p| p.2).collect();
    assert_eq!(
        sums,
        vec![page_checksum(&page_of(0)), page_checksum(&page_of(1))]
    );
    assert_eq!(
        c.counters().pages_shared,
        0,
        "no frame of the process's own pool"
    );
    assert_eq!(c.frames().live(), 0);
    // The segment comes back: all four pages merge onto its two frames.
    let frames = vec![page_of(0), page_of(1)];
    let f0 = c.add_segment(9, &sums).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 4);
    for i in 0..4 {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i % 2));
    }
    c.check_invariants();
}

#[test]
fn announced_contents_stay_out_of_the_unstable_index_unless_they_may_pair_or_are_asked_for() {
    let n = 4096;
    let mut c = domain_member(n);
    c.set_domain_connected(true);
    assert_eq!(c.take_domain_out().announce.len(), n);
    // Half a full scan: every page visited is a candidate the domain has heard of,
    // unique here: it stays out of the index (each took a slot before), but where the
    // scan's filter lets its key through (a cell another key shares: an eighth to a
    // quarter of unique keys).
    c.scan_batch((n / 2) as u64);
    assert!(
        c.unstable.len() < n / 2 / 3,
        "{} of {} in the index",
        c.unstable.len(),
        n / 2
    );
    c.scan_full(1);
    // Page 7 written with page 3's bytes: held twice, the next scans find the pair
    // (and claim the content, as a member does) though both were announced.
    c.mem.write(BASE + 7 * PG, &page_of(3));
    c.scan_full(3);
    let sum3 = page_checksum(&page_of(3));
    assert_eq!(c.take_domain_out().claim, vec![sum3]);
    // Asked for an announced content later: its page is found all the same (by the
    // records) and published.
    let sum5 = page_checksum(&page_of(5));
    c.domain_wants(2, &[sum5]);
    c.scan_full(1);
    let publish = c.take_domain_out().publish;
    assert!(
        publish.iter().any(|p| p.0 == BASE + 5 * PG && p.2 == sum5),
        "{publish:?}"
    );
    c.check_invariants();
}

#[test]
fn with_a_broker_contents_held_twice_are_claimed_and_published_when_granted() {
    let mut c = joined(4, false, |i| i % 2);
    c.set_domain_connected(true);
    c.scan_full(2);
    let out = c.take_domain_out();
    let sums = vec![page_checksum(&page_of(0)), page_checksum(&page_of(1))];
    assert_eq!(out.claim, sums);
    assert!(out.publish.is_empty(), "waits for the broker");
    c.scan_full(1);
    assert!(c.take_domain_out().claim.is_empty(), "claimed once");
    // Granted for the first content only.
    c.domain_wants(2, &sums[..1]);
    c.scan_full(1);
    let publish = c.take_domain_out().publish;
    assert_eq!(
        publish.iter().map(|p| p.2).collect::<Vec<_>>(),
        sums[..1].to_vec()
    );
    c.check_invariants();
}

/// A domain member (see `domain_member`) whose `n` pages are merged onto segment `id`
/// of another member, holding their bytes: the core, the frames' bytes and checksums,
/// and the segment's first frame.
fn member_on_segment(n: usize, id: u64) -> (Core<FakeMem>, Vec<Vec<u8>>, Vec<u32>, FrameId) {
    let mut c = domain_member(n);
    let frames: Vec<Vec<u8>> = (0..n).map(page_of).collect();
    let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    let f0 = c.add_segment(id, &sums).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, n as u64);
    (c, frames, sums, f0)
}

#[test]
fn a_segment_the_domain_retires_gives_its_pages_back_and_they_merge_again() {
    let n = 4;
    let (mut c, frames, sums, f0) = member_on_segment(n, 5);
    // Retired with pages on it: they get private copies at the end of the first full
    // scan begun after it (writes found by then are counted in the VMA budget), and
    // the block goes.
    c.retire_segment(5, true);
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, n as u64, "not yet");
    assert_eq!(c.domain_counters().evicted, 0);
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 0);
    assert_eq!(c.domain_counters().evicted, n as u64);
    assert_eq!(c.drop_unmapped_segments(), vec![(5, f0)]);
    for i in 0..n {
        assert!(!c.mem.maps_frame(BASE + i * PG));
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i));
    }
    // A new segment of the same bytes: they merge onto it.
    let g0 = c.add_segment(6, &sums).unwrap();
    c.mem.add_segment(g0, &frames);
    c.scan_full(2);
    assert_eq!(c.counters().pages_sharing, n as u64);
    c.check_invariants();
}

#[test]
fn a_pending_eviction_spares_a_new_segment_that_reuses_the_retired_ones_frame_ids() {
    let n = 4;
    let mut c = domain_member(n);
    // A segment none of our pages maps, retired and dropped at once.
    let other: Vec<Vec<u8>> = (100..100 + n).map(page_of).collect();
    let other_sums: Vec<u32> = other.iter().map(|f| page_checksum(f)).collect();
    let f0 = c.add_segment(5, &other_sums).unwrap();
    c.mem.add_segment(f0, &other);
    c.retire_segment(5, true);
    assert_eq!(c.drop_unmapped_segments(), vec![(5, f0)]);
    // A new segment, of our pages' bytes, in the same block: our pages merge onto it.
    let frames: Vec<Vec<u8>> = (0..n).map(page_of).collect();
    let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    let g0 = c.add_segment(6, &sums).unwrap();
    assert_eq!(g0, f0, "the block is reused");
    c.mem.add_segment(g0, &frames);
    c.scan_full(3);
    assert_eq!(c.domain_counters().evicted, 0);
    assert_eq!(c.counters().pages_sharing, n as u64);
    c.check_invariants();
}

#[test]
fn pages_on_a_retired_segment_move_onto_a_new_one_with_no_vma_to_spare() {
    let n = 4;
    let (mut c, frames, sums, f0) = member_on_segment(n, 5);
    c.take_domain_out();
    // The VMA budget is spent: nothing can get a private copy first.
    c.mem.vma_allowance = 0;
    c.refresh_vma_allowance();
    c.retire_segment(5, true);
    c.scan_full(2);
    assert_eq!(c.domain_counters().evicted, 0);
    assert_eq!(
        c.counters().pages_sharing,
        n as u64,
        "still on the retired segment"
    );
    // Its contents are told to the domain all the same (moving costs no VMA).
    assert_eq!(c.take_domain_out().announce, sums);
    // Another member publishes them. With no room past the budget either, the pages
    // wait; with room for a move (2 VMAs at most), they move over, one run onto one.
    let g0 = c.add_segment(6, &sums).unwrap();
    c.mem.add_segment(g0, &frames);
    c.scan_full(1);
    assert_eq!(c.rec(BASE).unwrap().frame(), f0, "no room: waits");
    c.mem.move_allowance = 2;
    c.count_vmas_when_needed();
    c.scan_full(1);
    for i in 0..n {
        assert_eq!(c.rec(BASE + i * PG).unwrap().frame(), g0 + i as FrameId);
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i));
    }
    assert_eq!(c.counters().pages_sharing, n as u64);
    assert_eq!(c.drop_unmapped_segments(), vec![(5, f0)]);
    c.check_invariants();
}

#[test]
fn a_segment_that_could_not_be_built_is_asked_for_again_and_a_changed_page_declined() {
    let n = 4;
    let mut c = domain_member(n);
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    c.take_domain_out();
    c.domain_wants(2, &sums[..2]);
    c.scan_full(1);
    let asked: Vec<u32> = c.take_domain_out().publish.iter().map(|p| p.2).collect();
    assert_eq!(asked, sums[..2].to_vec());
    // The build failed: both are queued again at their next visits.
    assert!(c.domain_published(&asked, None).is_empty());
    c.scan_full(1);
    let again: Vec<u32> = c.take_domain_out().publish.iter().map(|p| p.2).collect();
    assert_eq!(again, asked);
    // Built, but the second page had changed: its checksum is declined.
    assert_eq!(
        c.domain_published(&again, Some(&again[..1])),
        vec![again[1]]
    );
    c.scan_full(1);
    assert!(
        c.take_domain_out().publish.is_empty(),
        "nothing left to publish"
    );
    c.check_invariants();
}

#[test]
fn what_the_domain_asks_for_and_no_page_holds_for_a_full_scan_is_declined() {
    let n = 2;
    let mut c = domain_member(n);
    c.take_domain_out();
    let gone = page_checksum(&page_of(100));
    c.domain_wants(2, &[gone]);
    c.scan_full(1);
    assert!(
        c.take_domain_out().decline.is_empty(),
        "asked in the middle of a scan: one more"
    );
    c.scan_full(1);
    assert_eq!(c.take_domain_out().decline, vec![gone]);
    c.scan_full(1);
    assert!(c.take_domain_out().decline.is_empty(), "declined once");
}

#[test]
fn a_page_covered_on_a_retired_segment_gets_its_own_mapping_before_the_segment_goes() {
    // A segment of pages 0, 1, (another content), 3: page 2 merges covered, its own
    // copy inside the run's mapping of the segment's file.
    let n = 4;
    let mut c = domain_member(n);
    let mut frames: Vec<Vec<u8>> = (0..n).map(page_of).collect();
    frames[2] = page_of(100);
    let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
    let f0 = c.add_segment(5, &sums).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(1);
    assert_eq!(
        covered_offsets(&c),
        vec![f0 + 2],
        "page 2 covered in the run"
    );
    // Retired; the merged pages are written and leave it: no page maps the segment,
    // but page 2's mapping still maps its file. It gets a mapping of its own first.
    c.retire_segment(5, true);
    for i in [0, 1, 3] {
        c.mem.write(BASE + i * PG, &page_of(200 + i));
    }
    c.scan_full(1);
    assert_eq!(c.drop_unmapped_segments(), vec![(5, f0)]);
    assert!(covered_offsets(&c).is_empty());
    assert!(!c.mem.maps_frame(BASE + 2 * PG));
    assert_eq!(c.mem.read_page(BASE + 2 * PG), page_of(2));
    c.check_invariants();
}

/// A domain member of 8 pages: pages 0..4 merged onto segment 5, pages 4..8 onto
/// segment 6, each run covering one page whose bytes differ (2 and 5); segment 7
/// holds nothing of ours. The core and the segments' (id, first frame id).
fn member_on_three_segments() -> (Core<FakeMem>, Vec<(u64, FrameId)>) {
    let mut c = domain_member(8);
    let mut segs = Vec::new();
    for (id, pages, odd) in [(5, 0..4, 2), (6, 4..8, 5), (7, 100..104, 0)] {
        let frames: Vec<Vec<u8>> = pages
            .map(|i| page_of(if i == odd { 300 + i } else { i }))
            .collect();
        let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
        let f0 = c.add_segment(id, &sums).unwrap();
        c.mem.add_segment(f0, &frames);
        segs.push((id, f0));
    }
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 6);
    assert_eq!(covered_offsets(&c), vec![segs[0].1 + 2, segs[1].1 + 1]);
    (c, segs)
}

/// Every frame offset under a covered page, sorted.
fn covered_offsets(c: &Core<FakeMem>) -> Vec<FrameId> {
    let mut v: Vec<FrameId> = c
        .regions
        .values()
        .flat_map(|r| r.covered_frames())
        .collect();
    v.sort_unstable();
    v
}

/// Each of the 8 pages of `member_on_three_segments` maps no frame and holds its bytes.
fn check_given_back(c: &Core<FakeMem>) {
    assert!(covered_offsets(c).is_empty());
    for i in 0..8 {
        assert!(!c.mem.maps_frame(BASE + i * PG), "page {i}");
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i), "page {i}");
    }
}

#[test]
fn segments_retired_together_are_given_back_and_dropped_together() {
    let (mut c, segs) = member_on_three_segments();
    // All three retired for compaction: the pages of both runs (covered ones too) move
    // off at the end of the first full scan begun after, in one go, and the segments
    // are dropped together.
    for (id, _) in &segs {
        c.retire_segment(*id, true);
    }
    assert_eq!(
        c.drop_unmapped_segments(),
        vec![segs[2]],
        "nothing of ours on 7"
    );
    c.scan_full(2);
    assert_eq!(c.domain_counters().evicted, 8);
    assert_eq!(c.counters().pages_sharing, 0);
    let mut gone = c.drop_unmapped_segments();
    gone.sort_unstable();
    assert_eq!(gone, vec![segs[0], segs[1]]);
    check_given_back(&c);
    assert!(c.drop_unmapped_segments().is_empty());
    c.check_invariants();
}

#[test]
fn covered_pages_on_several_unmapped_segments_get_their_own_mappings_together() {
    let (mut c, segs) = member_on_three_segments();
    // Retired without eviction (as on leaving), then every merged page written: no
    // page is merged onto 5 or 6, but all 8 sit in mappings of their files (a write
    // leaves a merged page covered in place). They get mappings of their own and both
    // segments go, in one call.
    for (id, _) in &segs {
        c.retire_segment(*id, false);
    }
    for i in [0, 1, 3, 4, 6, 7] {
        c.mem.write(BASE + i * PG, &page_of(i));
    }
    c.scan_full(1);
    assert_eq!(c.counters().pages_sharing, 0);
    let mut all: Vec<FrameId> = (0..4)
        .flat_map(|k| [segs[0].1 + k, segs[1].1 + k])
        .collect();
    all.sort_unstable();
    assert_eq!(covered_offsets(&c), all);
    let mut gone = c.drop_unmapped_segments();
    gone.sort_unstable();
    assert_eq!(gone, segs);
    check_given_back(&c);
    c.check_invariants();
}

/// Two copies of 8 pages (page `i` and `8 + i` hold `page_of(i)`) merged onto frames
/// of the process's own pool, then the domain joined: the core and the 8 checksums.
fn merged_before_joining() -> (Core<FakeMem>, Vec<u32>) {
    let mut c = core_with(16);
    for i in 0..16 {
        c.mem.write(BASE + i * PG, &page_of(i % 8));
    }
    c.advise(BASE, BASE + 16 * PG);
    c.scan_full(2);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (8, 8));
    assert!(frames_of(&c, 0, 16)
        .iter()
        .all(|&f| !crate::pool::is_domain(f)));
    c.join_domain();
    let sums = (0..8).map(|i| page_checksum(&page_of(i))).collect();
    (c, sums)
}

#[test]
fn pages_merged_before_joining_move_onto_a_segment_of_their_bytes() {
    let (mut c, sums) = merged_before_joining();
    // The first full scan in the domain announces their contents.
    c.scan_full(1);
    let mut announced = c.take_domain_out().announce;
    announced.sort_unstable();
    let mut want = sums.clone();
    want.sort_unstable();
    assert_eq!(announced, want);
    // Another member publishes them: both copies move onto its frames, a run each,
    // and our pool's frames are freed.
    let own = frames_of(&c, 0, 8);
    let punched = c.mem.punched;
    let frames: Vec<Vec<u8>> = (0..8).map(page_of).collect();
    let f0 = c.add_segment(5, &sums).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(1);
    let on: Vec<FrameId> = (0..8).map(|i| f0 + i).collect();
    assert_eq!(frames_of(&c, 0, 8), on);
    assert_eq!(frames_of(&c, 8, 8), on);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (0, 16));
    assert!(own.iter().all(|&f| !c.frames().is_live(f)));
    assert_eq!(c.mem.punched - punched, 8, "our pool's frames given back");
    assert_eq!(c.mem.frames_held(), 8, "the segment's alone");
    for i in 0..16 {
        assert!(c.mem.maps_frame(BASE + i * PG), "page {i}");
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i % 8), "page {i}");
    }
    c.scan_full(2);
    assert!(c.settled());
    c.check_invariants();
}

#[test]
fn a_content_merged_before_joining_is_published_when_the_domain_asks_for_it() {
    let (mut c, sums) = merged_before_joining();
    c.scan_full(1);
    c.take_domain_out();
    // Settled, nothing new: the pages on our own frames are not visited; nor after a
    // segment of other contents, or a request for them.
    c.scan_full(1);
    assert!(!c.domain.as_ref().unwrap().private_now);
    let other: Vec<Vec<u8>> = (50..54).map(page_of).collect();
    let other_sums: Vec<u32> = other.iter().map(|f| page_checksum(f)).collect();
    let g0 = c.add_segment(8, &other_sums).unwrap();
    c.mem.add_segment(g0, &other);
    c.domain_wants(2, &other_sums);
    c.scan_full(1);
    assert!(!c.domain.as_ref().unwrap().private_now);
    c.take_domain_out();
    // Asked for the first four: the next full scan visits them and queues pages of
    // the first copy to be copied into a segment.
    c.domain_wants(2, &sums[..4]);
    c.scan_full(1);
    let mut published: Vec<(usize, u32)> = c
        .take_domain_out()
        .publish
        .into_iter()
        .map(|(a, _, sum)| (a, sum))
        .collect();
    published.sort_unstable();
    let want: Vec<(usize, u32)> = (0..4).map(|i| (BASE + i * PG, sums[i])).collect();
    assert_eq!(published, want);
    // The segment made of them comes back: both copies' first four pages move onto
    // it, the other four stay on our own frames.
    let frames: Vec<Vec<u8>> = (0..4).map(page_of).collect();
    let f0 = c.add_segment(9, &sums[..4]).unwrap();
    c.mem.add_segment(f0, &frames);
    c.scan_full(1);
    let on: Vec<FrameId> = (0..4).map(|i| f0 + i).collect();
    assert_eq!(frames_of(&c, 0, 4), on);
    assert_eq!(frames_of(&c, 8, 4), on);
    assert!(frames_of(&c, 4, 4)
        .iter()
        .all(|&f| !crate::pool::is_domain(f)));
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (4, 12));
    for i in 0..16 {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i % 8), "page {i}");
    }
    c.check_invariants();
}

#[test]
fn pages_moving_run_by_run_are_probed_again_only_where_a_run_moved() {
    // 2 copies of 1,024 pages merged before joining (one batch), then the domain
    // offers their contents in segments of 4 frames: the pages move 4 at a time
    // (a run never crosses segments), 512 moves in the batch. After each, the batch
    // goes on over the pages it remapped (known to map their frames, not probed
    // again), and probes nothing else again: 34,816 pages probed in the moving scan
    // (most of them the block of 64 that planning each run probes); 36,352 when the
    // pages each move remapped were probed again, 559,616 when the rest of the
    // batch was.
    let n = 1024;
    let mut c = two_copies(n);
    c.scan_full(2);
    assert_eq!(c.counters().pages_shared, n as u64);
    c.join_domain();
    c.scan_full(1);
    for s in 0..n / 4 {
        let frames: Vec<Vec<u8>> = (4 * s..4 * s + 4).map(page_of).collect();
        let sums: Vec<u32> = frames.iter().map(|f| page_checksum(f)).collect();
        let f0 = c.add_segment(100 + s as u64, &sums).unwrap();
        c.mem.add_segment(f0, &frames);
    }
    let probed = c.mem.probed;
    c.scan_full(1);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (0, 2 * n as u64));
    assert!(
        c.mem.probed - probed < 64 * n as u64,
        "{} pages probed",
        c.mem.probed - probed
    );
    for i in 0..2 * n {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i % n), "page {i}");
    }
    c.check_invariants();
}

#[test]
fn a_tile_of_our_own_pool_stays_in_a_domain() {
    use super::domain::private_movable;
    use super::runs::MIN_TILE;
    let mut t = crate::pool::FrameTable::new(64);
    let lone = t.alloc(7).unwrap();
    let tile = t.alloc_run(&[9; MIN_TILE]).unwrap();
    // One content on a few consecutive frames (a run over repeated pages) is no tile.
    let run = t.alloc_run(&[10, 11, 11, 12]).unwrap();
    assert!(private_movable(&t, lone));
    assert!((tile..tile + MIN_TILE as FrameId).all(|f| !private_movable(&t, f)));
    assert!((run..run + 4).all(|f| private_movable(&t, f)));
}

#[test]
fn a_segment_held_since_leaving_is_used_again_when_offered_on_joining_again() {
    let n = 4;
    let (mut c, _, sums, f0) = member_on_segment(n, 5);
    c.leave_domain();
    assert!(
        c.frames.retired(f0),
        "left: out of the index, pages stay merged"
    );
    assert_eq!(c.counters().pages_sharing, n as u64);
    c.join_domain();
    assert_eq!(c.add_segment(5, &sums), None, "held already");
    assert!(!c.frames.retired(f0), "offered again: in use again");
    // Not moved off, nor announced again: its frames are in the index.
    c.scan_full(2);
    assert!(c.take_domain_out().announce.is_empty());
    assert_eq!(c.rec(BASE).unwrap().frame(), f0);
    c.check_invariants();
}

#[test]
fn a_segment_retired_when_leaving_and_then_by_the_domain_gives_its_pages_back() {
    let n = 4;
    let (mut c, _, _, f0) = member_on_segment(n, 5);
    c.leave_domain();
    c.join_domain();
    // The domain no longer holds it: it says so (a report of it), and our pages go.
    c.retire_segment(5, true);
    c.scan_full(2);
    assert_eq!(c.domain_counters().evicted, n as u64);
    assert_eq!(c.counters().pages_sharing, 0);
    assert_eq!(c.drop_unmapped_segments(), vec![(5, f0)]);
    c.check_invariants();
}

#[test]
fn pages_to_publish_wait_a_few_batches_for_more_and_go_together() {
    // Asked for before the pages are candidates (one full scan hashed them): the next
    // full scan's visits queue them, one a batch here.
    let n = 64;
    let mut c = joined(n, false, |i| i);
    c.scan_full(1);
    c.set_domain_connected(true);
    c.take_domain_out();
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    c.domain_wants(2, &sums);
    // One page a batch: each is queued, none is published before the queue has
    // waited `PUBLISH_WAIT_BATCHES` batches.
    let mut batches = 0;
    let publish = loop {
        assert!(!c.scan_batch(1), "the scan ended first");
        batches += 1;
        let p = c.take_domain_out().publish;
        if !p.is_empty() {
            break p;
        }
    };
    assert_eq!(batches, PUBLISH_WAIT_BATCHES as usize + 1);
    assert_eq!(
        publish.len(),
        batches,
        "every page queued so far, in one segment"
    );
    // The end of a full scan publishes what waits, however little.
    c.scan_batch(1);
    assert!(c.take_domain_out().publish.is_empty());
    while !c.scan_batch(1) {}
    assert_eq!(c.take_domain_out().publish.len(), n - batches);
}

#[test]
fn a_page_let_go_while_waiting_to_be_published_is_not_read_and_is_asked_for_again() {
    let n = 4;
    let mut c = domain_member(n);
    c.set_domain_connected(true);
    c.take_domain_out();
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    c.domain_wants(2, &sums[..2]);
    c.scan_batch(2);
    assert!(c.take_domain_out().publish.is_empty(), "waits");
    // The application lets page 0 go (no longer mergeable) before the segment is built.
    c.unadvise(BASE, BASE + PG).unwrap();
    while !c.scan_batch(1) {}
    let publish = c.take_domain_out().publish;
    assert_eq!(
        publish.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![BASE + PG]
    );
    // Asked for again: no page holds it through a whole full scan, so it is
    // declined (the domain asks another member).
    let mut declined = Vec::new();
    for _ in 0..2 {
        c.scan_full(1);
        declined.extend(c.take_domain_out().decline);
    }
    assert_eq!(declined, vec![sums[0]]);
    c.check_invariants();
}

#[test]
fn a_member_at_its_vma_budget_skips_pages_it_cannot_announce_as_smart_scan_does() {
    let n = 8;
    let mut c = joined(n, true, |i| i);
    // No VMA to spare: nothing is announced, so nothing can merge through the domain.
    c.mem.vma_allowance = 0;
    c.refresh_vma_allowance();
    c.scan_full(8);
    assert!(c.take_domain_out().announce.is_empty());
    assert!(
        c.counters().pages_skipped > 0,
        "unique pages the domain cannot hear of are skipped, as in no domain"
    );
    // With room again, they are announced at their next visits.
    c.mem.vma_allowance = 1 << 20;
    c.refresh_vma_allowance();
    c.scan_full(8);
    assert_eq!(c.take_domain_out().announce.len(), n);
    c.check_invariants();
}

#[test]
fn a_member_back_under_its_vma_budget_announces_again() {
    let n = 64;
    let mut c = core_with(n);
    c.mem.tracking = true;
    c.smart_scan = false;
    for i in 0..n {
        c.mem.write(BASE + i * PG, &page_of(i));
    }
    c.join_domain();
    c.advise(BASE, BASE + n * PG);
    for _ in 0..2 {
        c.count_vmas_when_needed();
        c.scan_full(1);
    }
    assert_eq!(c.take_domain_out().announce.len(), n);
    // At its budget; the second half is written (new contents, unannounced).
    c.mem.vma_allowance = 0;
    c.refresh_vma_allowance();
    for i in n / 2..n {
        c.mem.write(BASE + i * PG, &page_of(1000 + i));
    }
    for _ in 0..4 {
        c.count_vmas_when_needed();
        c.scan_full(1);
    }
    assert!(c.take_domain_out().announce.is_empty());
    // VMAs freed elsewhere: the engine marks the count due at each full scan's start.
    c.mem.vma_allowance = 1 << 20;
    let mut announced = 0;
    for _ in 0..6 {
        c.count_vmas_when_needed();
        c.scan_full(1);
        announced += c.take_domain_out().announce.len();
    }
    assert_eq!(announced, n / 2, "stale allowance {}", c.vma_allowance);
}

#[test]
fn a_run_just_mapped_is_not_probed_again() {
    // Two copies of 1,024 numbered pages in one batch: the merging scan maps them as
    // one run. The pages after the visit that merged are known to map their frames:
    // the batch goes on over them without probing them again. Probed: the batch's
    // 2,048 pages and the blocks of 64 that planning the run probes on both sides
    // (2,048); 5,119 when the run was probed again after its first page.
    let n = 1024;
    let mut c = two_copies(n);
    c.scan_full(1);
    let probed = c.mem.probed;
    c.scan_full(1);
    let k = c.counters();
    assert_eq!((k.pages_shared, k.pages_sharing), (n as u64, n as u64));
    let now = c.mem.probed - probed;
    assert!(now <= 4 * n as u64, "{now} pages probed");
    c.scan_full(1);
    assert_eq!(
        (c.counters().pages_shared, c.counters().pages_sharing),
        (n as u64, n as u64)
    );
    for i in 0..2 * n {
        assert_eq!(c.mem.read_page(BASE + i * PG), page_of(i % n), "page {i}");
    }
    c.check_invariants();
}

#[test]
fn pages_asked_for_just_after_a_full_scan_began_are_queued_at_once() {
    // The ask comes once the next full scan has begun (its unstable index emptied, one
    // page visited again): the records still say which pages were candidates under
    // those checksums, and they are queued now, not at their visits later in the scan.
    let n = 8;
    let mut c = domain_member(n);
    let _ = c.take_domain_out();
    let sums: Vec<u32> = (0..n).map(|i| page_checksum(&page_of(i))).collect();
    assert!(!c.scan_batch(1), "the full scan goes on");
    c.domain_wants(2, &sums[2..6]);
    // No broker to wait for: what is queued goes out at once.
    c.set_domain_connected(false);
    let publish: Vec<u32> = c.take_domain_out().publish.iter().map(|p| p.2).collect();
    assert_eq!(publish, sums[2..6]);
    c.check_invariants();
}
