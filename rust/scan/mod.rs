//! The merging algorithm of mm/ksm.c, over memory reached through [`Mem`].
//!
//! [`Core`] owns the regions and their page records, the frame table, the
//! stable index (content → frames) and the unstable index (content →
//! candidate pages, emptied at the start of every full scan), and the
//! statistics with the kernel's definitions (docs/kernel-contract.md,
//! “Statistics” and “Merging behaviour”). It calls no syscall itself: the
//! engine plugs in the real [`Mem`] (userfaultfd, memfd, mmap), tests and
//! fuzzers plug in [`fake::FakeMem`].
//!
//! This file holds the core: the [`Core`] struct and its [`Counters`], the
//! regions with their advice, the records' lookups, the statistics derived
//! from the records, and `check_invariants`. The algorithm is spread over
//! `impl Core` blocks by concern:
//! * `mem`: the [`Mem`] trait the algorithm reaches memory through, and [`Presence`];
//! * `batch`: the kernel's batch (`scan_batch`), stretches passed without a visit,
//!   checksums taken ahead on threads, the end of a full scan;
//! * `visit`: one page's visit (`cmp_and_merge_page`), smart scan, the index searches;
//! * `runs`: planning runs of pages that merge with one mapping, and tiles;
//! * `merge`: merging (a pair, with a frame, a tile, the zero page) and the VMA budget;
//! * `window`: the write-protect window around a merge, and write tracking;
//! * `unmerge`: giving merged pages private copies again;
//! * `refs`: frame references, forgetting records, suspect and held-back frames.
//!
//! Invariants kept by every method (checked by `check_invariants` in tests
//! and fuzzing):
//! * `pages_shared` = frames with ≥ 1 reference; `pages_sharing` = Σ(refs − 1);
//!   `pages_unshared` = records in state `Unstable`; `rmap_items` = records not
//!   `Untracked`; so `pages_volatile` = rmap_items − shared − sharing − unshared ≥ 0.
//! * A frame's reference count equals the number of `Stable` records naming it.
//! * A page is only remapped after it was write-protected and compared equal
//!   to the frame byte for byte (never on a hash alone).

#![forbid(unsafe_code)]

mod batch;
mod defer;
mod domain;
pub mod fake;
mod index;
mod mem;
mod merge;
mod refs;
mod runs;
mod sums;
mod unmerge;
mod visit;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::io;

use xxhash_rust::xxh3::xxh3_64;

use crate::pool::{self, FrameId, FrameTable};
use crate::region::{PageRec, Region, State, ADVISED, DEFERRED};
use batch::SumsAhead;
use domain::DomainState;
pub use domain::{DomainCounters, DomainOut, Queued};
use index::{FrameIndex, UnstableIndex};
pub use mem::{Mem, Presence};

/// Counters with the kernel's names (plus ours), one consistent snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub rmap_items: u64,
    pub full_scans: u64,
    pub pages_scanned: u64,
    /// Merges done (pages remapped onto a frame).
    pub merges: u64,
    /// Merges given up after write-protection (content changed, or a syscall failed).
    pub merge_failures: u64,
    /// Pages a visit read and hashed (not those write tracking vouched for).
    pub pages_hashed: u64,
    /// Merged pages found copied away by a write.
    pub cows: u64,
    /// Merges not attempted because they could have passed the VMA budget.
    pub vma_budget_skips: u64,
    /// Pages the latest complete full scan put off because of the VMA budget (before
    /// the first full scan completes, the scan in progress so far): each would have
    /// saved one page by merging. A page counts at most once per full scan, however
    /// many merges its visit had refused, and the figure is replaced at the end of
    /// every full scan, never added up across scans.
    pub vma_put_off_pages: u64,
    /// Pages skipped by smart scan (never reset).
    pub pages_skipped: u64,
    /// Pages we turned into the kernel's zero page (`use_zero_pages`) still reading it.
    pub ksm_zero_pages: u64,
}

impl Counters {
    pub fn pages_volatile(&self) -> u64 {
        self.rmap_items
            .saturating_sub(self.pages_shared + self.pages_sharing + self.pages_unshared)
    }
}

/// The algorithm's state.
pub struct Core<M: Mem> {
    pub mem: M,
    page: usize,
    regions: BTreeMap<usize, Region>,
    frames: FrameTable,
    stable: FrameIndex,
    /// The unstable index: per hash, the pages entered this full scan (one 6-byte
    /// slot per page, the key on the page's record; see [`UnstableIndex`]).
    unstable: UnstableIndex,
    /// Next address to visit; `None` = at the start of a full scan.
    cursor: Option<usize>,
    counters: Counters,
    /// Merges, unmerges and checksum changes in the current full scan.
    changes: u64,
    /// Whether the last completed full scan changed nothing.
    settled: bool,
    /// Pages with the ADVISED flag (kept, so that ksmd can tell "nothing to do" cheaply).
    advised: u64,
    pub max_page_sharing: u32,
    /// `smart_scan`: skip pages that keep failing to merge (docs/kernel-contract.md,
    /// “Smart scan”).
    pub smart_scan: bool,
    /// `use_zero_pages`: all-zero pages become the kernel's zero page
    /// (docs/kernel-contract.md, "Zero pages").
    pub use_zero_pages: bool,
    /// The checksum of an all-zero page.
    zero_checksum: u32,
    /// VMAs merging may still add before the budget is reached (read afresh before
    /// the first merge of every full scan). Each merged page is charged 2,
    /// the most one remap can add, so the budget is never passed.
    pub vma_allowance: u64,
    charges_since_count: u64,
    /// The allowance is to be read afresh before the next charge (see
    /// `count_vmas_when_needed`).
    vma_count_due: bool,
    /// VMAs that moving pages off retired segments may still add past the budget
    /// (`Mem::move_allowance`), asked when first needed after each count.
    move_allowance: Option<u64>,
    /// Pages the full scan in progress put off because of the VMA budget, and the
    /// address of the last of them (a visit refused twice counts once).
    put_off_now: u64,
    /// Pages of this full scan whose pair merge was put off to its end (`DEFERRED`).
    deferred: usize,
    /// While the full scan's end works through them: the address to go on from.
    deferred_at: Option<usize>,
    put_off_last: Option<usize>,
    /// Frames freed while unmerging, punched together when it ends (see `unmerge_range`).
    punch_later: Option<Vec<FrameId>>,
    /// Threads a batch's checksums are taken on, ahead of the visits (the engine sets
    /// it from the `hash_threads` knob); 1: each page is hashed by its visit.
    pub hash_threads: usize,
    sums_ahead: SumsAhead,
    /// The budget the latest batch left, when it ended early to publish a full
    /// segment's worth of queued pages (see `take_publish_cut`).
    publish_cut: Option<u64>,
    /// The runs `record_run` mapped since the batch last took them (first page,
    /// pages): what a batch knows of its pages' presence after a visit merged (see
    /// `scan_batch`).
    mapped_runs: Vec<(usize, usize)>,
    buf: Vec<u8>,
    buf2: Vec<u8>,
    /// The merge domain joined, if any (see `domain.rs`).
    domain: Option<DomainState>,
    /// `metadata_bytes()` at the end of the last full scan, before its unstable index
    /// was given back: the most that scan held (its indexes only grow during it).
    scan_end_metadata: u64,
    /// Bookkeeping while this full scan's `PairFilter` was built (its transient table
    /// included): part of the scan's peak.
    filter_peak: u64,
}

/// The 32-bit checksum of a page, as visits take it (a domain's segments are
/// indexed by it).
pub fn page_checksum(buf: &[u8]) -> u32 {
    checksum(buf)
}

/// The index key and the 32-bit checksum (volatility check) of a page.
fn checksum_of(buf: &[u8]) -> (u64, u32) {
    let checksum = checksum(buf);
    (key_of(checksum), checksum)
}

/// The 32-bit checksum of a page's bytes (its 64-bit xxh3, folded).
fn checksum(buf: &[u8]) -> u32 {
    let hash = xxh3_64(buf);
    (hash ^ (hash >> 32)) as u32
}

/// The index key of a page with checksum `c`: the checksum itself, so that a page
/// known unchanged since its checksum was taken (write tracking) is looked up
/// without reading it. Bytes are compared on every hit, so its 32 bits are enough.
fn key_of(c: u32) -> u64 {
    u64::from(c)
}

/// The key a page in the unstable index is under (its checksum), from its record; None
/// if it is not in the index any more (for [`UnstableIndex`], which keeps no keys).
fn unstable_key(regions: &BTreeMap<usize, Region>, page: usize, a: usize) -> Option<u32> {
    let (_, r) = regions.range(..=a).next_back()?;
    let i = (a - r.start) / page;
    let p = (i < r.pages.len()).then(|| r.pages[i])?;
    (p.state() == State::Unstable && p.advised()).then(|| p.checksum())
}

/// A page's identity in the scan: its address and its region's properties.
#[derive(Clone, Copy)]
struct Target {
    addr: usize,
    owned: bool,
    prot: i32,
}

impl<M: Mem> Core<M> {
    pub fn new(mem: M, frame_capacity: u32) -> Self {
        let page = mem.page_size();
        Core {
            mem,
            page,
            regions: BTreeMap::new(),
            frames: FrameTable::new(frame_capacity),
            stable: FrameIndex::default(),
            unstable: UnstableIndex::new(page),
            cursor: None,
            counters: Counters::default(),
            changes: 0,
            settled: false,
            advised: 0,
            max_page_sharing: 256,
            // The engine sets both from its knobs (kernel defaults: on, off).
            smart_scan: false,
            use_zero_pages: false,
            zero_checksum: checksum_of(&vec![0; page]).1,
            vma_allowance: u64::MAX,
            charges_since_count: 0,
            vma_count_due: false,
            move_allowance: None,
            put_off_now: 0,
            deferred: 0,
            deferred_at: None,
            put_off_last: None,
            punch_later: None,
            scan_end_metadata: 0,
            filter_peak: 0,
            hash_threads: 1,
            sums_ahead: SumsAhead::default(),
            publish_cut: None,
            mapped_runs: Vec::new(),
            buf: vec![0; page],
            buf2: vec![0; page],
            domain: None,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn frames(&self) -> &FrameTable {
        &self.frames
    }

    pub fn frames_mut(&mut self) -> &mut FrameTable {
        &mut self.frames
    }

    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Something changed outside a visit (regions, advice, an unmerge): not settled,
    /// and the full scan in progress cannot settle either — it may have passed the
    /// change by (a region added behind the cursor is first visited by the next one).
    fn unsettle(&mut self) {
        self.settled = false;
        self.changes += 1;
    }

    pub fn at_scan_start(&self) -> bool {
        self.cursor.is_none()
    }

    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.values()
    }

    pub fn regions_mut(&mut self) -> impl Iterator<Item = &mut Region> {
        self.regions.values_mut()
    }

    /// The region containing `addr`.
    pub fn region_at(&self, addr: usize) -> Option<&Region> {
        let page = self.page;
        self.regions
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end(page))
    }

    /// The page at `addr` with its region's properties (ownership, protection there).
    fn target_at(&self, addr: usize) -> Option<Target> {
        let r = self.region_at(addr)?;
        Some(Target {
            addr,
            owned: r.owned,
            prot: r.prot_of((addr - r.start) / self.page),
        })
    }

    fn region_at_mut(&mut self, addr: usize) -> Option<&mut Region> {
        let page = self.page;
        self.regions
            .range_mut(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end(page))
    }

    fn rec(&self, addr: usize) -> Option<PageRec> {
        let r = self.region_at(addr)?;
        Some(r.pages[(addr - r.start) / self.page])
    }

    fn rec_mut(&mut self, addr: usize) -> &mut PageRec {
        let page = self.page;
        let r = self.region_at_mut(addr).expect("record of a tracked page");
        &mut r.pages[(addr - r.start) / page]
    }

    /// The frame offset under the page at `addr` if it is in a pool mapping of ours:
    /// its frame if merged, the offset it covers if covered.
    fn pool_offset(&self, addr: usize) -> Option<FrameId> {
        let r = self.region_at(addr)?;
        let i = (addr - r.start) / self.page;
        match r.pages[i].state() {
            State::Stable => Some(r.pages[i].frame()),
            _ => r.covered_frame(i),
        }
    }

    /// The frame offset the mapping of a covered page covers (see `IN_POOL`).
    fn in_pool(&self, addr: usize) -> Option<FrameId> {
        let r = self.region_at(addr)?;
        r.covered_frame((addr - r.start) / self.page)
    }

    /// The page at `addr` is a private copy inside a pool mapping at offset `g`.
    fn cover(&mut self, addr: usize, g: FrameId) {
        let page = self.page;
        let r = self.region_at_mut(addr).expect("record of a tracked page");
        r.cover((addr - r.start) / page, g);
    }

    /// The page at `addr` is not (or no longer) a covered page.
    fn uncover(&mut self, addr: usize) {
        let page = self.page;
        let r = self.region_at_mut(addr).expect("record of a tracked page");
        r.uncover((addr - r.start) / page);
    }

    /// Start tracking `[start, start+npages)`. The range must not overlap a tracked one.
    pub fn add_region(&mut self, region: Region) {
        let end = region.end(self.page);
        assert!(
            self.regions.range(region.start..end).next().is_none()
                && self.region_at(region.start).is_none(),
            "overlapping regions"
        );
        self.unsettle();
        self.advised += region.pages.count(PageRec::advised) as u64;
        self.counters.ksm_zero_pages += region.pages.count(|p| p.state() == State::Zero) as u64;
        self.regions.insert(region.start, region);
    }

    /// Stop tracking the region starting at `start` (its memory is about to be
    /// unmapped): every frame reference it held is dropped.
    pub fn remove_region(&mut self, start: usize) -> Option<Region> {
        let r = self.regions.get(&start)?;
        let n = r.pages.len();
        self.advised -= r.pages.count(PageRec::advised) as u64;
        // Records never created (nothing visited there) hold nothing to release.
        if r.pages
            .uniform()
            .is_none_or(|p| p.state() != State::Untracked)
        {
            for i in 0..n {
                self.forget(start + i * self.page);
            }
        }
        if self
            .cursor
            .is_some_and(|c| c >= start && c < start + n * self.page)
        {
            self.cursor = Some(start + n * self.page);
        }
        self.frames.trim();
        let r = self.regions.remove(&start);
        self.release_if_idle();
        r
    }

    /// Take every region out (a forked child rebuilds its engine from them).
    pub fn take_regions(&mut self) -> Vec<Region> {
        self.advised = 0;
        std::mem::take(&mut self.regions).into_values().collect()
    }

    /// Mark `[start, end)` of tracked regions mergeable. Returns the pages newly advised.
    pub fn advise(&mut self, start: usize, end: usize) -> usize {
        let page = self.page;
        let mut n = 0;
        for r in self.regions.values_mut() {
            let (s, e) = (start.max(r.start), end.min(r.end(page)));
            if s >= e {
                continue;
            }
            if (s, e) == (r.start, r.end(page)) {
                // The whole region: its shared record, while there is one.
                if let Some(fill) = r.pages.uniform() {
                    if !fill.advised() {
                        r.pages.update_all(|p| p.set(ADVISED));
                        n += r.pages.len();
                    }
                    continue;
                }
            }
            for p in r
                .pages
                .iter_mut()
                .take(e.saturating_sub(r.start) / page)
                .skip(s.saturating_sub(r.start) / page)
            {
                if !p.advised() {
                    p.set(ADVISED);
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.unsettle();
        }
        self.advised += n as u64;
        n
    }

    /// Give every merged page in `[start, end)` a private copy and clear the advice.
    /// On failure (EAGAIN-class) the advice stays; pages already unmerged stay private
    /// (indistinguishable to the application), nothing is lost.
    pub fn unadvise(&mut self, start: usize, end: usize) -> io::Result<()> {
        self.unmerge_range(start, end)?;
        let addrs: Vec<usize> = self
            .pages_in(start, end)
            .filter(|&(_, rec)| rec.advised())
            .map(|(a, _)| a)
            .collect();
        self.advised -= addrs.len() as u64;
        for a in addrs {
            self.forget(a);
            self.rec_mut(a).clear(ADVISED);
        }
        self.release_if_idle();
        Ok(())
    }

    /// With no page advised any more, ksmd stops scanning before this full scan ends:
    /// give back the unstable index it was building rather than keep it meanwhile
    /// (its pages are all out of it, unadvised or gone).
    fn release_if_idle(&mut self) {
        if self.advised == 0 {
            self.unstable.reset(0);
            self.scan_end_metadata = 0;
        }
    }

    /// Whether any page is advised (ksmd has nothing to do otherwise, as the kernel's
    /// has no registered mm).
    pub fn any_advised(&self) -> bool {
        self.advised > 0
    }

    /// Pages advised mergeable.
    pub fn advised_pages(&self) -> u64 {
        self.advised
    }

    /// The pages of `[start, end)` in a mapping of the pool: merged, inherited or covered.
    pub fn pool_pages_in(&self, start: usize, end: usize) -> Vec<usize> {
        self.pages_in(start, end)
            .filter(|(_, r)| r.in_pool_mapping())
            .map(|(a, _)| a)
            .collect()
    }

    /// The ranges of `[start, end)` whose pages are covered (see `IN_POOL`), merged.
    pub fn covered_ranges(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let page = self.page;
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (a, _) in self.pages_in(start, end).filter(|(_, r)| r.covered()) {
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = a + page,
                _ => out.push((a, a + page)),
            }
        }
        out
    }

    /// Whether any page of `[start, end)` maps a frame (ours or, in a child, the
    /// parent's), or sits in a mapping of one as a covered page.
    pub fn has_merged_pages(&self, start: usize, end: usize) -> bool {
        let page = self.page;
        let first = self.first_region_key(start);
        self.regions.range(first..end).any(|(_, r)| {
            let (s, e) = (start.max(r.start), end.min(r.end(page)));
            s < e
                && r.pages.any_in(
                    (s - r.start) / page..(e - r.start) / page,
                    PageRec::in_pool_mapping,
                )
        })
    }

    /// Where the regions that may overlap `[start, ...)` begin in `regions`: the key of
    /// the region at or before `start` (or `start` itself).
    fn first_region_key(&self, start: usize) -> usize {
        self.regions
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s)
    }

    /// Every (address, record) of tracked pages in `[start, end)`.
    fn pages_in(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, PageRec)> + '_ {
        let page = self.page;
        let first = self.first_region_key(start);
        self.regions.range(first..end).flat_map(move |(_, r)| {
            let s = start.max(r.start);
            let e = end.min(r.end(page));
            (s..e.max(s))
                .step_by(page)
                .map(move |a| (a, r.pages[(a - r.start) / page]))
        })
    }

    /// Split the region of memory ksm does not own that contains `addr` (strictly
    /// inside) into two at `addr`, so that events can act on whole regions.
    fn split_at(&mut self, addr: usize) {
        let page = self.page;
        let Some(r) = self.region_at_mut(addr) else {
            return;
        };
        if r.owned || r.start == addr {
            return;
        }
        let tail = r.split_off((addr - r.start) / page, page);
        self.regions.insert(addr, tail);
    }

    /// The starts of the regions of memory ksm does not own inside `[s, e)`, after
    /// splitting at both ends.
    fn foreign_regions_in(&mut self, s: usize, e: usize) -> Vec<usize> {
        self.split_at(s);
        self.split_at(e);
        let page = self.page;
        self.regions
            .range(s..e)
            .filter(|(_, r)| !r.owned && r.end(page) <= e)
            .map(|(&start, _)| start)
            .collect()
    }

    /// The application unmapped `[s, e)` (a userfaultfd UNMAP event): forget what was
    /// tracked there, advice included. Its merged pages' mappings are gone with it, so
    /// their frames are released normally.
    pub fn forget_unmapped(&mut self, s: usize, e: usize) {
        for start in self.foreign_regions_in(s, e) {
            self.remove_region(start);
        }
        self.unsettle();
    }

    /// The application moved `[from, from+len)` to `to` (`mremap`, a userfaultfd REMAP
    /// event; the moved VMAs stay registered): the records move with the memory, and
    /// merged pages keep their frames.
    pub fn relocate(&mut self, from: usize, to: usize, len: usize) {
        // What was at the destination is gone: the kernel unmapped it first.
        self.forget_unmapped(to, to + len);
        let overrun: Vec<usize> = self.pages_in(to, to + len).map(|(a, _)| a).collect();
        if !overrun.is_empty() {
            // Moved over memory ksm owns (which the application must not do): the records
            // cannot follow. The moved pages still map their frames at `to`, so they are
            // forgotten as vanished: their frames wait as suspects until no mapping of
            // them is left (`forget_unmapped` would free them under the destination).
            // So are ksm's own pages there, replaced behind its back: their records and
            // advice go, as the kernel's advice goes with a VMA mapped over.
            for start in self.foreign_regions_in(from, from + len) {
                self.remove_vanished_region(start);
            }
            for a in overrun {
                self.forget_vanished(a);
                self.uncover(a);
            }
            return;
        }
        for start in self.foreign_regions_in(from, from + len) {
            let mut r = self.regions.remove(&start).expect("listed");
            for p in &mut r.pages {
                // The unstable index knows pages by address: out of it until revisited.
                if p.state() == State::Unstable {
                    p.set_state(State::Volatile);
                    self.counters.pages_unshared -= 1;
                }
                // Nor is a pair put off to the end of the scan one any more (the end,
                // which goes by address, may be past where the page lands).
                p.clear(DEFERRED);
            }
            r.start = to + (start - from);
            self.regions.insert(r.start, r);
        }
        self.unsettle();
    }

    /// What `page_state()` reports for a tracked page, given its presence now.
    pub fn page_state(&self, addr: usize, pres: Presence) -> Option<&'static str> {
        let rec = self.rec(addr)?;
        Some(match rec.state() {
            State::Stable | State::Inherited if pres != Presence::Anon => "merged",
            State::Zero if pres != Presence::Anon => "zero",
            State::Volatile => "volatile",
            State::Unstable => "unshared",
            State::Stable | State::Inherited | State::Zero | State::Untracked => "unmerged",
        })
    }

    /// VMAs that merging added: per region, runs of merged pages on consecutive
    /// frames are one VMA each, and each gap between them another.
    pub fn vmas_added(&self) -> u64 {
        let mut total = 0u64;
        for r in self.regions.values() {
            if r.pages.uniform().is_some_and(|p| !p.in_pool_mapping()) {
                // One piece: nothing merged, nothing covered.
                continue;
            }
            let mut pieces = 0u64;
            let mut prev: Option<Option<u32>> = None;
            for (i, p) in r.pages.iter().enumerate() {
                // The frame offset its mapping covers, if it is in a pool mapping.
                let cur = match p.state() {
                    State::Stable => Some(p.frame()),
                    _ => r.covered_frame(i),
                };
                let same_piece = match prev {
                    None => false,
                    Some(None) => cur.is_none(),
                    // One mapping maps one file: two segments' frames are two pieces.
                    Some(Some(f)) => {
                        let g = f.wrapping_add(1);
                        cur == Some(g)
                            && pool::is_domain(f) == pool::is_domain(g)
                            && (!pool::is_domain(f) || pool::same_block(f, g))
                    }
                };
                if !same_piece {
                    pieces += 1;
                }
                prev = Some(cur);
            }
            total += pieces.saturating_sub(1);
        }
        total
    }

    /// `(stable_node_chains, stable_node_dups)`: contents that needed more than one
    /// frame because they have more than `max_page_sharing` users (the pages mapping
    /// their frames, all frames together), and the frames holding them. A content can
    /// have several frames for other reasons: a repeat held in place in a run, a tile,
    /// a merge domain's twins. The kernel keeps one page for such a content, and counts
    /// no chain: neither does this (4 copies of 256 MiB of real data, as `ksm bench`'s,
    /// counted 4,199 chains of 10,016 frames; the kernel's KSM, 3 of 8, the contents
    /// that more than 256 pages hold, as this now).
    pub fn stable_chains(&self) -> (u64, u64) {
        let (mut chains, mut dups) = (0, 0);
        let key_of = |f| self.frames.hash(f);
        for frames in self.stable.groups(&key_of) {
            // One bucket per 64-bit hash: group its frames by content (almost always
            // one group; a hash collision would make two): a frame of it, how many
            // frames, and their users.
            let mut groups: Vec<(FrameId, u64, u64)> = Vec::new();
            for f in frames {
                let users = u64::from(self.frames.refs(f));
                match groups
                    .iter_mut()
                    .find(|(g, _, _)| self.mem.frame(*g) == self.mem.frame(f))
                {
                    Some((_, n, u)) => {
                        *n += 1;
                        *u += users;
                    }
                    None => groups.push((f, 1, users)),
                }
            }
            let limit = u64::from(self.max_page_sharing);
            for (_, n, _) in groups.into_iter().filter(|&(_, n, u)| n > 1 && u > limit) {
                chains += 1;
                dups += n;
            }
        }
        (chains, dups)
    }

    /// Bytes of our own bookkeeping (records of every region, frame table, indexes,
    /// and in a merge domain the checksums announced and asked for).
    /// A region's records count from when they are created (see `Recs`: the first
    /// change to one page); unlike the kernel's, those of ksm's own memory (`ksm.mmap`)
    /// then stay, advised or not (8 bytes a page); the application's memory has none
    /// once unadvised.
    pub fn metadata_bytes(&self) -> u64 {
        let recs: usize = self.regions.values().map(Region::metadata_bytes).sum();
        (recs
            + self.frames.metadata_bytes()
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()
            + self.domain.as_ref().map_or(0, DomainState::metadata_bytes)) as u64
    }

    /// The most bookkeeping a full scan needs: `metadata_bytes()` now, or at the end
    /// of the last full scan (when its unstable index was fullest) if that was more.
    /// The figure held to the target of 16 bytes per tracked page: `metadata_bytes()`
    /// alone, taken between two scans, would leave the unstable index out.
    pub fn metadata_peak_bytes(&self) -> u64 {
        self.metadata_bytes().max(self.scan_end_metadata)
    }

    /// Panics if the counters disagree with the records (tests and fuzzing).
    pub fn check_invariants(&self) {
        let mut c = Counters::default();
        let mut refs: HashMap<FrameId, u32> = HashMap::new();
        let advised: usize = self
            .regions
            .values()
            .map(|r| r.pages.iter().filter(|p| p.advised()).count())
            .sum();
        assert_eq!(advised as u64, self.advised, "advised pages");
        let mut zero = 0u64;
        for r in self.regions.values() {
            for p in &r.pages {
                assert!(
                    self.deferred > 0 || !p.has(DEFERRED),
                    "a page marked DEFERRED with no pair put off"
                );
                match p.state() {
                    State::Untracked | State::Inherited => continue,
                    State::Zero => {
                        zero += 1;
                        continue;
                    }
                    State::Unstable => c.pages_unshared += 1,
                    State::Stable => *refs.entry(p.frame()).or_default() += 1,
                    State::Volatile => {}
                }
                c.rmap_items += 1;
            }
        }
        for (&f, &n) in &refs {
            assert_eq!(self.frames.refs(f), n, "frame {f} refcount");
            if pool::is_domain(f) {
                c.pages_sharing += u64::from(n);
            } else {
                c.pages_shared += 1;
                c.pages_sharing += u64::from(n - 1);
            }
        }
        let (_, domain_pages) = self.frames.domain_totals();
        let counted: u64 = refs
            .iter()
            .filter(|(&f, _)| pool::is_domain(f))
            .map(|(_, &n)| u64::from(n))
            .sum();
        assert_eq!(domain_pages, counted, "pages on domain frames");
        let k = self.counters;
        assert_eq!(k.ksm_zero_pages, zero, "ksm_zero_pages");
        assert_eq!(
            (
                k.pages_shared,
                k.pages_sharing,
                k.pages_unshared,
                k.rmap_items
            ),
            (
                c.pages_shared,
                c.pages_sharing,
                c.pages_unshared,
                c.rmap_items
            )
        );
        assert_eq!(
            self.frames.live() as usize,
            refs.keys().filter(|&&f| !pool::is_domain(f)).count()
                + self.frames.deferred()
                + self.frames.suspects(),
            "live frames"
        );
    }
}

#[cfg(test)]
mod tests;
