//! The merging algorithm of mm/ksm.c, over memory reached through [`Mem`].
//!
//! [`Core`] owns the regions and their page records, the frame table, the
//! stable index (content → frames) and the unstable index (content →
//! candidate pages, emptied at the start of every full scan), and the
//! statistics with the kernel's definitions (KERNEL-KSM.md §4, §5). It calls
//! no syscall itself: the engine plugs in the real [`Mem`] (userfaultfd,
//! memfd, mmap), tests and fuzzers plug in [`fake::FakeMem`].
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

pub mod fake;

use std::collections::{BTreeMap, HashMap};

mod index;
use index::{AddrChains, AddrIndex, MultiIndex};
use std::io;

use xxhash_rust::xxh3::xxh3_64;

use crate::pool::{FrameId, FrameTable, Release};
use crate::region::{PageRec, Region, State, ADVISED, SUM_TRACKED};

/// What pagemap says about a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// No PTE (never touched, or a merged page not yet read again).
    Absent,
    /// Present, anonymous (a private page: unmerged, or a merged page copied by a write).
    Anon,
    /// Present, file-backed (a merged page mapping its frame).
    File,
}

/// The memory operations the algorithm needs. The real implementation is
/// `merge::Os`; every method that changes a mapping is only called inside the
/// protect … release window for that page.
pub trait Mem {
    fn page_size(&self) -> usize;
    /// Presence of `out.len()` pages from `addr`.
    fn probe(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()>;
    /// `probe` for pages known to be in anonymous mappings (ksm's own memory where no
    /// page is merged or covered): any present page is anonymous, which the Os can
    /// tell far more cheaply.
    fn probe_anonymous(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.probe(addr, out)
    }
    /// `probe_anonymous` with write tracking: per page whether it is tracked (its
    /// writes are recorded) and, if so, whether it is unchanged since the previous
    /// call for it (and from now on, until the next call, every write is recorded).
    /// Without write tracking nothing is tracked.
    fn probe_tracked(
        &mut self,
        addr: usize,
        out: &mut [Presence],
        tracked: &mut [bool],
        unchanged: &mut [bool],
    ) -> io::Result<()> {
        tracked.fill(false);
        unchanged.fill(false);
        self.probe_anonymous(addr, out)
    }
    /// Stop tracking writes to `[addr, addr+len)`, anonymous pages about to be
    /// write-protected for a merge (which needs the synchronous userfaultfd).
    fn untrack(&mut self, _addr: usize, _len: usize) -> io::Result<()> {
        Ok(())
    }
    /// `untrack` for a merge about to write-protect the range through the synchronous
    /// userfaultfd: the Os may register it there at once (else `protect` does).
    fn untrack_for_merge(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.untrack(addr, len)
    }
    /// Track writes to `[addr, addr+len)` again: anonymous pages a merge protected
    /// and left anonymous (it failed, or dropped them to the zero page), or memory
    /// already registered when the `write_tracking` knob is switched back on.
    fn retrack(&mut self, _addr: usize, _len: usize) {}
    /// Whether write tracking is wanted (the `write_tracking` knob).
    fn write_tracking(&self) -> bool {
        false
    }
    fn set_write_tracking(&mut self, _on: bool) {}
    /// Copy `buf.len()` bytes from `addr` (a page, or a run inside one region),
    /// fault-safely unless `owned`.
    fn read(&mut self, addr: usize, owned: bool, buf: &mut [u8]) -> io::Result<()>;
    /// `sum` of the bytes of each page of `addrs` (pages of one region, which ksm owns
    /// or not as `owned` says), each read now as `read` would, on up to `threads`
    /// threads; `None` where a page could not be read. One by one here; the Os and the
    /// fake spread the pages over threads.
    fn checksums(
        &mut self,
        addrs: &[usize],
        owned: bool,
        threads: usize,
        sum: fn(&[u8]) -> u32,
        out: &mut [Option<u32>],
    ) {
        let _ = threads;
        let mut buf = vec![0u8; self.page_size()];
        for (&a, o) in addrs.iter().zip(out) {
            *o = self.read(a, owned, &mut buf).is_ok().then(|| sum(&buf));
        }
    }
    fn frame(&self, f: FrameId) -> &[u8];
    /// Whether the page at `addr` holds `data` (`read` and compare; the Os compares
    /// memory ksm owns in place, without a copy).
    fn equals(&mut self, addr: usize, owned: bool, data: &[u8]) -> io::Result<bool> {
        let mut buf = vec![0u8; data.len()];
        self.read(addr, owned, &mut buf)?;
        Ok(buf == data)
    }
    /// Whether the page at `addr` holds the bytes of frame `f` (see `equals`).
    fn equals_frame(&mut self, addr: usize, owned: bool, f: FrameId) -> io::Result<bool> {
        let data = self.frame(f).to_vec();
        self.equals(addr, owned, &data)
    }
    /// Whether the pages at `a` and `b` hold the same bytes (see `equals`).
    fn same_pages(&mut self, a: usize, a_owned: bool, b: usize, b_owned: bool) -> io::Result<bool> {
        let mut buf = vec![0u8; self.page_size()];
        self.read(a, a_owned, &mut buf)?;
        self.equals(b, b_owned, &buf)
    }
    fn write_frame(&mut self, f: FrameId, data: &[u8]) -> io::Result<()>;
    /// Write frames `f0, f0+1, …` with the bytes of the `n` pages from `addr` (pages a
    /// merge window protects): `read` and `write_frame` page by page; the Os writes
    /// memory ksm owns into the pool straight from its pages, with one call.
    fn fill_frames(&mut self, f0: FrameId, addr: usize, owned: bool, n: usize) -> io::Result<()> {
        let page = self.page_size();
        let mut buf = vec![0u8; page];
        for i in 0..n {
            self.read(addr + i * page, owned, &mut buf)?;
            self.write_frame(f0 + i as FrameId, &buf)?;
        }
        Ok(())
    }
    fn punch(&mut self, f: FrameId) -> io::Result<()>;
    /// Punch the `n` consecutive frames from `f0` (one call where the pool allows it).
    fn punch_run(&mut self, f0: FrameId, n: u32) -> io::Result<()> {
        // Every frame is tried, whatever the others give; the first error is returned.
        let mut r = Ok(());
        for f in f0..f0 + n {
            r = r.and(self.punch(f));
        }
        r
    }
    /// VMAs merging may still add before the budget (`vm.max_map_count` minus the
    /// `vma_reserve` knob minus what the process uses now); `u64::MAX` when there is
    /// no limit.
    fn vma_allowance(&mut self) -> u64;
    /// Start the merge window: write-protect (writers block until `release`).
    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()>;
    /// End the merge window: unprotect (if `unprotect`) and always wake waiters.
    fn release(&mut self, addr: usize, len: usize, unprotect: bool);
    /// Shrink the merge window `[addr, addr+len)` to its first `keep` bytes (a whole
    /// number of pages, at least one): the rest leaves the window, unprotected and
    /// woken; the first `keep` bytes stay protected, for `map_frames` or `release`.
    fn release_tail(&mut self, addr: usize, len: usize, keep: usize);
    /// Map frames `f0..f0+npages` privately over the (protected) pages from `addr`,
    /// with one mapping (so a run of merged pages is one VMA). The pages `covered`
    /// names (index in the run, and their bytes now) keep their own bytes as private
    /// copies inside that mapping.
    fn map_frames(
        &mut self,
        addr: usize,
        npages: usize,
        prot: i32,
        f0: FrameId,
        covered: &[(usize, Vec<u8>)],
    ) -> io::Result<()>;
    /// Drop the (protected, anonymous, all-zero) page at `addr` (`MADV_DONTNEED`):
    /// it reads zeros from the kernel's zero page afterwards, holding no memory.
    fn zap(&mut self, addr: usize) -> io::Result<()>;
    /// Give `[addr, addr+len)` private anonymous pages with the same bytes
    /// (write-protect, copy, move over, wake). Nothing changes on error.
    fn unmerge_run(&mut self, addr: usize, len: usize, prot: i32, owned: bool) -> io::Result<()>;
}

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

/// Result of looking a content up in the stable index.
enum StableHit {
    Room(FrameId),
    Full,
    Miss,
}

/// The algorithm's state.
pub struct Core<M: Mem> {
    pub mem: M,
    page: usize,
    regions: BTreeMap<usize, Region>,
    frames: FrameTable,
    stable: MultiIndex<FrameId>,
    /// The unstable index: per hash, the first page entered this full scan, and in
    /// `unstable_more` the others (a content seen again that could not merge, or a
    /// hash shared by other bytes): one packed slot per page, no allocation per page.
    unstable: AddrIndex,
    unstable_more: AddrChains,
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
    /// `smart_scan`: skip pages that keep failing to merge (KERNEL-KSM.md §5.6).
    pub smart_scan: bool,
    /// `use_zero_pages`: all-zero pages become the kernel's zero page (§5.5).
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
    /// Frames freed while unmerging, punched together when it ends (see `unmerge_range`).
    punch_later: Option<Vec<FrameId>>,
    /// Threads a batch's checksums are taken on, ahead of the visits (the engine sets
    /// it from the `hash_threads` knob); 1: each page is hashed by its visit.
    pub hash_threads: usize,
    sums_ahead: SumsAhead,
    buf: Vec<u8>,
    buf2: Vec<u8>,
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

/// Whether the visit of a page with record `p`, probed `pres` (and `unchanged` under
/// write tracking), would read and hash it (see `Core::visit`): an advised, present,
/// unmerged page whose checksum is not trusted, unless smart scan skips it
/// (`Core::should_skip`, which ages pages the same way whatever their state).
fn hashed_by_visit(p: PageRec, pres: Presence, unchanged: bool, smart: bool) -> bool {
    let unmerged = match p.state() {
        State::Untracked => true,
        State::Volatile | State::Unstable => !(unchanged && p.sum_tracked()),
        State::Stable | State::Inherited | State::Zero => false,
    };
    p.advised() && pres == Presence::Anon && unmerged && !(smart && p.age() >= 3 && p.skips() > 0)
}

/// The kernel's `skip_age`: how many visits a page that failed to merge `age`
/// times may be skipped.
fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => 8,
    }
}

/// Most pages merged as one run (one mapping per side).
const MAX_RUN: usize = 2048;
/// Most frames in a tile (see `merge_tile`): a tile's first run saves nothing, so
/// tiles stay short of `MAX_RUN`.
const MAX_TILE: usize = 512;
/// Pages merged in runs shorter than this move into a longer run that reaches them.
const MAX_REHOME: usize = 512;
/// Most consecutive pages a run covers (see `Slot::Cover`); a run never ends with one.
const MAX_COVER: usize = 2;
/// Fewest pages of one repeated content worth a tile of frames of their own.
const MIN_TILE: usize = 8;
/// Tiles are used once fewer VMAs than this are left in the budget (an eighth of
/// the default budget of `vm.max_map_count` 65530 / 2).
const TILE_BELOW_ALLOWANCE: u64 = 4096;

/// A page's identity in the scan: its address and its region's properties.
#[derive(Clone, Copy)]
struct Target {
    addr: usize,
    owned: bool,
    prot: i32,
}

/// One page of a run that merges with one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// It maps the run's frame; the frame it maps now if it is merged already.
    Join(Option<FrameId>),
    /// Its bytes differ from the frame's: it keeps them, as a private copy inside the
    /// run's mapping (`IN_POOL`), so that the run stays one mapping.
    Cover,
}

/// Pairs of pages that merge as one run (see `Core::run_of`): per pair, the index
/// hash of its bytes (unused where covered) and each side's slot.
struct PairRun {
    hashes: Vec<u64>,
    t: Vec<Slot>,
    o: Vec<Slot>,
}

impl PairRun {
    fn len(&self) -> usize {
        self.hashes.len()
    }

    fn push(&mut self, hash: u64, t: Slot, o: Slot) {
        self.hashes.push(hash);
        self.t.push(t);
        self.o.push(o);
    }

    fn truncate(&mut self, n: usize) {
        self.hashes.truncate(n);
        self.t.truncate(n);
        self.o.truncate(n);
    }
}

/// How many of the first `k` slots of `run` stay in it: up to the last joined page
/// (a run never ends with a covered page).
fn joined_prefix(run: &[Slot], k: usize) -> usize {
    run[..k]
        .iter()
        .rposition(|&s| s != Slot::Cover)
        .map_or(0, |i| i + 1)
}

/// Fewest pages a batch probes at a time (unless the region ends first).
const PROBE_BATCH: usize = 512;

/// Most pages a batch probes at a time, budget allowing: enough for checksums taken
/// ahead of the visits to be shared between threads (see `Core::sum_ahead`).
const PROBE_BATCH_MAX: usize = 4096;

/// Most checksums taken ahead of the visits at once: enough for threads to start at a
/// negligible cost (see `merge::Os::checksums`: each takes 1,024 at least, so at most
/// 4 threads hash at once).
const SUMS_AHEAD: usize = PROBE_BATCH_MAX;

/// Fewest checksums taken ahead at once. A merge makes those of the pages it remaps
/// useless (a run extends forward from the page visited, over pages whose checksums
/// were taken): after one, the next takes this few, doubling while no merge wastes
/// them, so that scans that merge much waste little and scans that merge nothing
/// soon take `SUMS_AHEAD` at a time.
const SUMS_AHEAD_MIN: usize = 64;

/// Checksums taken ahead of the visits of one batch (see `Core::sum_ahead`): per page
/// from `start`, the checksum its visit is to use instead of reading and hashing it.
struct SumsAhead {
    start: usize,
    sums: Vec<Option<u32>>,
    /// How many to take next time.
    window: usize,
    /// Whether a merge window took some of these away unused.
    wasted: bool,
}

impl Default for SumsAhead {
    fn default() -> Self {
        SumsAhead {
            start: 0,
            sums: Vec::new(),
            window: SUMS_AHEAD,
            wasted: false,
        }
    }
}

impl SumsAhead {
    /// Start over for `pages` pages from `start`; returns how many checksums to take.
    fn reset(&mut self, start: usize, pages: usize) -> usize {
        self.window = if self.wasted {
            SUMS_AHEAD_MIN
        } else {
            (self.window * 2).min(SUMS_AHEAD)
        };
        self.wasted = false;
        self.start = start;
        self.sums.clear();
        self.sums.resize(pages, None);
        self.window
    }

    /// Those of a batch serve the batch only; how many to take is kept.
    fn clear(&mut self) {
        self.sums = Vec::new();
    }

    /// The checksum taken ahead for the page at `addr`, if any (at most once).
    fn take(&mut self, addr: usize, page: usize) -> Option<u32> {
        let i = addr.checked_sub(self.start)? / page;
        self.sums.get_mut(i)?.take()
    }

    /// Forget those of `[addr, addr+len)` (pages a merge window takes).
    fn forget(&mut self, addr: usize, len: usize, page: usize) {
        let end = self.start + self.sums.len() * page;
        let (s, e) = (addr.max(self.start), (addr + len).min(end));
        if s < e {
            for c in &mut self.sums[(s - self.start) / page..(e - self.start).div_ceil(page)] {
                self.wasted |= c.take().is_some();
            }
        }
    }
}

/// Pages probed at a time while a run is extended.
const AHEAD: usize = 64;

/// Presence of the pages a run is being extended over, probed `AHEAD` at a time
/// (one block per side of a pair run): valid while that one run is planned.
struct Ahead {
    blocks: [(usize, [Presence; AHEAD]); 2],
    next: usize,
}

impl Ahead {
    fn new() -> Self {
        Ahead {
            blocks: [(usize::MAX, [Presence::Absent; AHEAD]); 2],
            next: 0,
        }
    }
}

/// What the batch's probe said of one page.
#[derive(Clone, Copy)]
struct Seen {
    pres: Presence,
    /// Its writes are tracked (see `Mem::probe_tracked`).
    tracked: bool,
    /// Tracked, and not written since the previous probe.
    unchanged: bool,
}

impl<M: Mem> Core<M> {
    pub fn new(mem: M, frame_capacity: u32) -> Self {
        let page = mem.page_size();
        Core {
            mem,
            page,
            regions: BTreeMap::new(),
            frames: FrameTable::new(frame_capacity),
            stable: MultiIndex::default(),
            unstable: AddrIndex::new(page),
            unstable_more: AddrChains::new(page),
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
            punch_later: None,
            hash_threads: 1,
            sums_ahead: SumsAhead::default(),
            buf: vec![0; page],
            buf2: vec![0; page],
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
        self.advised += region.pages.iter().filter(|p| p.advised()).count() as u64;
        self.counters.ksm_zero_pages += region
            .pages
            .iter()
            .filter(|p| p.state() == State::Zero)
            .count() as u64;
        self.regions.insert(region.start, region);
    }

    /// Stop tracking the region starting at `start` (its memory is about to be
    /// unmapped): every frame reference it held is dropped.
    pub fn remove_region(&mut self, start: usize) -> Option<Region> {
        let r = self.regions.get(&start)?;
        let n = r.pages.len();
        self.advised -= r.pages.iter().filter(|p| p.advised()).count() as u64;
        for i in 0..n {
            self.forget(start + i * self.page);
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
            self.unstable = AddrIndex::new(self.page);
            self.unstable_more = AddrChains::new(self.page);
        }
    }

    /// Unmerge every merged page of `[start, end)`, keeping the advice (`run = 2` does
    /// this everywhere). Covered pages (see `IN_POOL`) move to anonymous memory too, so
    /// that unmerged memory maps no frame pool at all.
    pub fn unmerge_range(&mut self, start: usize, end: usize) -> io::Result<()> {
        self.unmerge_pages(start, end, true)
    }

    /// Unmerge the merged pages of `[start, end)` after the application discarded the
    /// range (`MADV_DONTNEED`), once the discard has zapped them. Covered pages stay:
    /// whether one was zapped yet cannot be told from whether it was written since,
    /// and in place it reads right either way (zeros through the fault thread, or what
    /// was written).
    pub fn unmerge_discarded(&mut self, start: usize, end: usize) -> io::Result<()> {
        self.unmerge_pages(start, end, false)
    }

    /// The frames an unmerge frees are punched together at the end, consecutive ones
    /// with one call (a frame is punched only once no page maps it, and none is reused
    /// before: unmerging allocates no frame).
    fn unmerge_pages(&mut self, start: usize, end: usize, covered: bool) -> io::Result<()> {
        let outer = self.punch_later.is_none();
        if outer {
            self.punch_later = Some(Vec::new());
        }
        let r = self.unmerge_runs(start, end, covered);
        if outer {
            let mut freed = self.punch_later.take().unwrap_or_default();
            freed.sort_unstable();
            let mut i = 0;
            while i < freed.len() {
                let mut n = 1;
                while i + n < freed.len() && freed[i + n] == freed[i] + n as FrameId {
                    n += 1;
                }
                // A failed punch leaks the frames' bytes but never corrupts data.
                let _ = self.mem.punch_run(freed[i], n as u32);
                i += n;
            }
            self.frames.trim();
        }
        r
    }

    fn unmerge_runs(&mut self, start: usize, end: usize, covered: bool) -> io::Result<()> {
        let page = self.page;
        // Zero pages read the kernel's zero page, as never-written anonymous memory
        // does: a private page of zeros in every way that matters, with nothing to copy.
        let zeros: Vec<usize> = self
            .pages_in(start, end)
            .filter(|(_, r)| r.state() == State::Zero)
            .map(|(a, _)| a)
            .collect();
        for a in zeros {
            self.forget(a);
            self.unsettle();
        }
        let mut runs: Vec<(usize, usize, i32, bool)> = Vec::new();
        for (addr, rec) in self.pages_in(start, end) {
            let merged = matches!(rec.state(), State::Stable | State::Inherited);
            let in_pool = covered && rec.covered();
            if !(merged || in_pool) {
                continue;
            }
            let r = self.region_at(addr).expect("tracked");
            let prot = r.prot_of((addr - r.start) / page);
            match runs.last_mut() {
                Some(last)
                    if last.0 + last.1 == addr
                        && last.2 == prot
                        && self.region_at(last.0).map(|x| x.start) == Some(r.start) =>
                {
                    last.1 += page
                }
                _ => runs.push((addr, page, prot, r.owned)),
            }
        }
        for (addr, len, prot, owned) in runs {
            self.mem.unmerge_run(addr, len, prot, owned)?;
            for a in (addr..addr + len).step_by(page) {
                self.forget(a);
                self.uncover(a);
            }
            self.unsettle();
        }
        Ok(())
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

    /// At fork: the free frames that covered pages sit over stay out of use until no
    /// child maps the pool (a child discarding such a page reads that frame; it must
    /// never hold bytes the parent wrote after the fork).
    pub fn reserve_covered_frames(&mut self) {
        let offsets: Vec<FrameId> = self
            .regions
            .values()
            .flat_map(Region::covered_frames)
            .collect();
        for g in offsets {
            self.frames.reserve_until_quiet(g);
        }
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
        self.pages_in(start, end).any(|(_, r)| r.in_pool_mapping())
    }

    /// `run = 2`: unmerge everything, forget every record, reset `full_scans`.
    pub fn unmerge_all(&mut self) -> io::Result<()> {
        let bounds: Vec<(usize, usize)> = self
            .regions
            .values()
            .map(|r| (r.start, r.end(self.page)))
            .collect();
        for (s, e) in bounds {
            self.unmerge_range(s, e)?;
            for a in (s..e).step_by(self.page) {
                self.forget(a);
            }
        }
        self.unstable.clear();
        self.unstable_more.clear();
        self.cursor = None;
        self.counters.full_scans = 0;
        self.unsettle();
        Ok(())
    }

    /// Every (address, record) of tracked pages in `[start, end)`.
    fn pages_in(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, PageRec)> + '_ {
        let page = self.page;
        let first = self
            .regions
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.regions.range(first..end).flat_map(move |(_, r)| {
            let s = start.max(r.start);
            let e = end.min(r.end(page));
            (s..e.max(s))
                .step_by(page)
                .map(move |a| (a, r.pages[(a - r.start) / page]))
        })
    }

    /// Drop the record of `addr` back to `Untracked`, releasing what it held.
    fn forget(&mut self, addr: usize) {
        self.forget_as(addr, false);
    }

    /// `forget`; `vanished`: the page's memory disappeared behind our back, so a frame
    /// it held becomes a suspect instead of being freed (see `forget_vanished`).
    fn forget_as(&mut self, addr: usize, vanished: bool) {
        let rec = *self.rec_mut(addr);
        match rec.state() {
            State::Untracked => return,
            // Not an rmap_item (see `State::Zero`): only its own counter.
            State::Zero => {
                self.counters.ksm_zero_pages -= 1;
                self.rec_mut(addr).set_state(State::Untracked);
                return;
            }
            State::Inherited => {
                let r = self.rec_mut(addr);
                r.set_state(State::Untracked);
                return;
            }
            State::Unstable => self.counters.pages_unshared -= 1,
            State::Stable if vanished => {
                self.frames.decref_suspect(rec.frame());
                self.frame_ref_dropped(rec.frame());
            }
            State::Stable => self.drop_frame_ref(rec.frame()),
            State::Volatile => {}
        }
        self.counters.rmap_items -= 1;
        let r = self.rec_mut(addr);
        // Its mapping may still cover a frame offset (see `IN_POOL`): kept by the region.
        *r = PageRec::fresh(State::Untracked, r.flags());
    }

    fn add_frame_ref(&mut self, f: FrameId) {
        if self.frames.incref(f) == 1 {
            self.counters.pages_shared += 1;
        } else {
            self.counters.pages_sharing += 1;
        }
    }

    fn drop_frame_ref(&mut self, f: FrameId) {
        let release = self.frames.decref(f);
        self.frame_ref_dropped(f);
        if let Release::Free(f) = release {
            match &mut self.punch_later {
                Some(later) => later.push(f),
                // A failed punch leaks the frame's bytes but never corrupts data.
                None => {
                    let _ = self.mem.punch(f);
                }
            }
        }
    }

    /// Counters and stable index after a frame lost a reference.
    fn frame_ref_dropped(&mut self, f: FrameId) {
        if self.frames.refs(f) == 0 {
            self.counters.pages_shared -= 1;
            let h = self.frames.hash(f);
            self.stable.remove(h, f);
        } else {
            self.counters.pages_sharing -= 1;
        }
    }

    /// The memory of `addr` vanished (the application unmapped it, or mapped something
    /// else there): forget the page and its advice, as the kernel forgets a VMA's. A
    /// frame it held is not freed blindly, since an `mremap` may have moved the mapping
    /// elsewhere: it waits as a suspect until `free_unmapped_suspects`.
    pub fn forget_vanished(&mut self, addr: usize) {
        self.forget_as(addr, true);
        let r = self.rec_mut(addr);
        let was_advised = r.advised();
        r.clear(ADVISED);
        self.advised -= u64::from(was_advised);
        self.unsettle();
    }

    /// Forget a whole region whose memory vanished (see `forget_vanished`).
    pub fn remove_vanished_region(&mut self, start: usize) {
        let n = self.regions.get(&start).map_or(0, |r| r.pages.len());
        for i in 0..n {
            self.forget_vanished(start + i * self.page);
        }
        self.remove_region(start);
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
            }
            r.start = to + (start - from);
            self.regions.insert(r.start, r);
        }
        self.unsettle();
    }

    /// Whether a page of `[s, e)` recorded as merged still maps its frame (a
    /// file-backed PTE: not yet discarded by the application's MADV_DONTNEED).
    pub fn frame_mapped_in(&mut self, s: usize, e: usize) -> bool {
        let merged: Vec<usize> = self
            .pages_in(s, e)
            .filter(|(_, r)| matches!(r.state(), State::Stable | State::Inherited))
            .map(|(a, _)| a)
            .collect();
        merged.into_iter().any(|a| {
            let mut p = [Presence::Absent];
            self.mem.probe(a, &mut p).is_ok() && p[0] == Presence::File
        })
    }

    /// Punch the suspect frames that `mapped` says no mapping of this process holds.
    pub fn free_unmapped_suspects(&mut self, mapped: impl Fn(FrameId) -> bool) {
        for f in self.frames.clear_suspects(mapped) {
            let _ = self.mem.punch(f);
        }
        self.frames.trim();
    }

    /// Punch the frames held back since a fork, now that no other process maps the pool.
    pub fn pool_quiet(&mut self) {
        for f in self.frames.quiet() {
            let _ = self.mem.punch(f);
        }
        self.frames.trim();
    }

    /// Visit up to `budget` pages (the kernel's batch). Returns `true` when a full
    /// scan completed during this call (a batch never runs past the end of a scan).
    pub fn scan_batch(&mut self, budget: u64) -> bool {
        let page = self.page;
        if self.cursor.is_none() {
            self.unstable.clear();
            self.unstable_more.clear();
            self.cursor = Some(0);
        }
        let mut scanned = 0u64;
        // Whatever a batch that ended early (a panic) left is no snapshot of this one's.
        self.sums_ahead.clear();
        // With more than one hash thread, checksums are taken ahead of the visits; for
        // memory ksm does not own always (it is read many pages per system call then).
        let threads = self.hash_threads > 1;
        let mut pres = vec![Presence::Absent; PROBE_BATCH_MAX];
        let (mut tracked, mut unchanged) =
            (vec![false; PROBE_BATCH_MAX], vec![false; PROBE_BATCH_MAX]);
        while scanned < budget {
            let cur = self.cursor.expect("set above");
            // The next region at or after the cursor.
            let next = self
                .regions
                .range(..=cur)
                .next_back()
                .filter(|(_, r)| cur < r.end(page))
                .or_else(|| self.regions.range(cur..).next())
                .map(|(_, r)| (r.start, r.end(page)));
            let Some((rstart, rend)) = next else {
                self.sums_ahead.clear();
                self.end_full_scan();
                return true;
            };
            let from = cur.max(rstart);
            // As many pages as the budget lets visits reach, up to `PROBE_BATCH_MAX` (as
            // many whatever `hash_threads` says, so that it changes nothing else).
            let batch = (budget - scanned).clamp(PROBE_BATCH as u64, PROBE_BATCH_MAX as u64);
            let n = ((rend - from) / page).min(batch as usize);
            let probed = if self.only_anonymous(rstart, from, n) {
                self.mem
                    .probe_tracked(from, &mut pres[..n], &mut tracked[..n], &mut unchanged[..n])
            } else {
                tracked[..n].fill(false);
                unchanged[..n].fill(false);
                self.mem.probe(from, &mut pres[..n])
            };
            if probed.is_err() {
                pres[..n].fill(Presence::Absent);
                tracked[..n].fill(false);
                unchanged[..n].fill(false);
            }
            // The probe took the written state of these pages (the next one will not
            // report those writes again): whatever was not vouched for unchanged loses
            // its trust now, whether or not this batch gets to visit it.
            if let Some(r) = self.regions.get_mut(&rstart) {
                let base = (from - r.start) / page;
                for (p, &u) in r.pages[base..base + n].iter_mut().zip(&unchanged[..n]) {
                    if !u {
                        p.clear(SUM_TRACKED);
                    }
                }
            }
            let ahead = threads || self.regions.get(&rstart).is_some_and(|r| !r.owned);
            let mut i = 0;
            // Pages before this one had their checksums taken ahead (if they needed any).
            let mut summed = 0;
            while i < n && scanned < budget {
                if ahead && i >= summed {
                    summed = self.sum_ahead(
                        rstart,
                        from,
                        i,
                        (&pres[..n], &unchanged[..n]),
                        budget - scanned,
                    );
                }
                let (passed, counted) = self.pass_stretch(
                    rstart,
                    from,
                    i,
                    (&pres[..n], &unchanged[..n]),
                    budget - scanned,
                );
                i += passed;
                scanned += counted;
                if i == n || scanned >= budget {
                    break;
                }
                let addr = from + i * page;
                i += 1;
                if let Some(rec) = self.rec(addr) {
                    let seen = Seen {
                        pres: pres[i - 1],
                        tracked: tracked[i - 1],
                        unchanged: unchanged[i - 1],
                    };
                    let merges = self.counters.merges;
                    if rec.advised() && self.visit(addr, seen) {
                        scanned += 1;
                    }
                    // A merge remaps pages, often the run of pages after this one (a run
                    // only ever extends forward from the page visited): what the batch's
                    // probe said of them is stale. Probe them again at once (else `visit`
                    // would probe each on its own). Should that fail, the stale answers
                    // stay: `visit` looks again at a merged page.
                    if self.counters.merges != merges && i < n {
                        let j = (i..n)
                            .find(|&j| {
                                self.rec(from + j * page)
                                    .is_none_or(|r| !r.in_pool_mapping())
                            })
                            .unwrap_or(n);
                        let mut fresh = [Presence::Absent; PROBE_BATCH_MAX];
                        let fresh = &mut fresh[..j - i];
                        if j > i && self.mem.probe(from + i * page, fresh).is_ok() {
                            pres[i..j].copy_from_slice(fresh);
                        }
                    }
                }
            }
            self.cursor = Some(from + i * page);
        }
        self.sums_ahead.clear();
        false
    }

    /// Write-protect `[addr, addr+len)` for a merge (the synchronous userfaultfd). Its
    /// unmerged pages, in anonymous mappings whose writes may be tracked, are taken out
    /// of write tracking first (a mapping has one userfaultfd); merged and covered
    /// pages are in pool mappings, never tracked.
    ///
    /// What the tracker knew of their writes is lost with them (giving them back
    /// write-protects them afresh, see `release_failed`), and a write since their last
    /// probe may not have been taken yet: their checksums are not trusted any more (a
    /// page the window leaves unmerged is hashed again at its next visit).
    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.sums_ahead.forget(addr, len, self.page);
        let runs = self.unmerged_runs(addr, addr + len);
        // All distrusted first: should untracking fail halfway, a later run keeps no
        // trusted checksum that the tracker may no longer vouch for.
        for &(s, e) in &runs {
            self.distrust(s, e);
        }
        for (s, e) in runs {
            self.mem.untrack_for_merge(s, e - s)?;
        }
        self.mem.protect(addr, len)
    }

    /// End a merge window that changed nothing (unprotect, wake), and give its
    /// unmerged pages back to write tracking (see `Core::protect`).
    fn release_failed(&mut self, addr: usize, len: usize) {
        self.mem.release(addr, len, true);
        for (s, e) in self.unmerged_runs(addr, addr + len) {
            self.mem.retrack(s, e - s);
        }
    }

    /// Shrink the merge window `[addr, addr+len)` to its first `keep` bytes: the rest is
    /// released as by `release_failed` (unprotected, woken, tracked again).
    fn release_tail(&mut self, addr: usize, len: usize, keep: usize) {
        self.mem.release_tail(addr, len, keep);
        for (s, e) in self.unmerged_runs(addr + keep, addr + len) {
            self.mem.retrack(s, e - s);
        }
    }

    /// The runs of `[start, end)` whose pages are in anonymous mappings (not merged,
    /// inherited or covered), as `(start, end)`.
    fn unmerged_runs(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let page = self.page;
        let mut anon: Vec<(usize, usize)> = Vec::new();
        for (a, r) in self.pages_in(start, end) {
            if r.in_pool_mapping() {
                continue;
            }
            match anon.last_mut() {
                Some(last) if last.1 == a => last.1 = a + page,
                _ => anon.push((a, a + page)),
            }
        }
        anon
    }

    /// The algorithm's side of the `write_tracking` knob (see `Mem::set_write_tracking`):
    /// switched off, the unmerged pages of memory ksm owns leave the tracker at once
    /// (no write pays for tracking any more; a merge registers them as it needs);
    /// switched on, those of memory already registered (advised) are tracked again, so
    /// that scans stop rehashing them. Either way no checksum taken before is trusted
    /// any more: the writes made while nothing tracked them were never recorded.
    pub fn set_write_tracking(&mut self, on: bool) {
        self.mem.set_write_tracking(on);
        let page = self.page;
        let owned: Vec<(usize, usize)> = self
            .regions
            .values()
            .filter(|r| r.owned && (r.registered || !on))
            .map(|r| (r.start, r.end(page)))
            .collect();
        for (start, end) in owned {
            for (s, e) in self.unmerged_runs(start, end) {
                self.distrust(s, e);
                if on {
                    self.mem.retrack(s, e - s);
                } else {
                    // Best effort: what stays tracked is untracked by the merge that needs it.
                    let _ = self.mem.untrack(s, e - s);
                }
            }
        }
    }

    /// Clear `SUM_TRACKED` on every page of `[start, end)`: their checksums are not
    /// trusted any more (one pass over each region's slice of records).
    fn distrust(&mut self, start: usize, end: usize) {
        let page = self.page;
        let first = self
            .regions
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        for r in self.regions.range_mut(first..end).map(|(_, r)| r) {
            let (s, e) = (start.max(r.start), end.min(r.end(page)));
            if s < e {
                let slice = &mut r.pages[(s - r.start) / page..(e - r.start) / page];
                for p in slice {
                    p.clear(SUM_TRACKED);
                }
            }
        }
    }

    /// Whether the `n` pages from `from` (in the region at `rstart`) are all in
    /// anonymous mappings: ksm's own memory (which only ksm maps anything over) where
    /// no page is merged, inherited or covered.
    fn only_anonymous(&self, rstart: usize, from: usize, n: usize) -> bool {
        let Some(r) = self.regions.get(&rstart) else {
            return false;
        };
        let base = (from - r.start) / self.page;
        r.owned && r.pages[base..base + n].iter().all(|p| !p.in_pool_mapping())
    }

    /// From page `i` of the batch at `from` (in the region at `rstart`), the pages a
    /// visit would deal with without looking at their bytes, done here as `visit`
    /// would: not advised; merged and still mapping its frame (scanned, nothing to
    /// do); skipped by smart scan (present, unmerged, and
    /// `should_skip` would skip it); or unchanged since a checksum taken under write
    /// tracking, with no candidate in any index (it goes into the unstable index
    /// again). Returns how many pages, and how many of them count as scanned (at
    /// most `budget`). Once memory has settled this is most pages: no record read
    /// twice, no region looked up per page.
    fn pass_stretch(
        &mut self,
        rstart: usize,
        from: usize,
        i: usize,
        seen: (&[Presence], &[bool]),
        budget: u64,
    ) -> (usize, u64) {
        let (pres, unchanged) = seen;
        let page = self.page;
        let (smart, zero) = (
            self.smart_scan,
            self.use_zero_pages.then_some(self.zero_checksum),
        );
        let Core {
            regions,
            counters,
            stable,
            unstable,
            ..
        } = self;
        let Some(r) = regions.get_mut(&rstart) else {
            return (0, 0);
        };
        let base = (from - r.start) / page;
        let (mut k, mut scanned) = (i, 0);
        while k < pres.len() {
            let idx = base + k;
            let p = r.pages[idx];
            if !p.advised() {
                k += 1;
                continue;
            }
            if p.state() == State::Stable && pres[k] != Presence::Anon && scanned < budget {
                // `visit`: still maps its frame, a KSM page on its node; scanned.
                counters.pages_scanned += 1;
                scanned += 1;
                k += 1;
                continue;
            }
            if pres[k] != Presence::Anon || !matches!(p.state(), State::Volatile | State::Unstable)
            {
                break;
            }
            if smart && p.age() >= 3 && p.skips() > 0 {
                // `should_skip`: skipped.
                let q = &mut r.pages[idx];
                q.set_age(q.age().saturating_add(1));
                q.set_skips(q.skips() - 1);
                if q.state() == State::Unstable {
                    counters.pages_unshared -= 1;
                }
                q.set_state(State::Volatile);
                counters.pages_skipped += 1;
                k += 1;
                continue;
            }
            let key = key_of(p.checksum());
            let quiet = unchanged[k]
                && p.sum_tracked()
                && scanned < budget
                && zero != Some(p.checksum())
                && stable.get(key).next().is_none()
                && !unstable.contains_key(&key)
                && !(idx > 0 && r.pages[idx - 1].state() == State::Stable);
            if !quiet {
                break;
            }
            // `visit` with a trusted checksum and nothing to compare: `should_skip`
            // (not skipped), counted as scanned, back into the unstable index.
            let q = &mut r.pages[idx];
            if smart {
                let age = q.age();
                q.set_age(age.saturating_add(1));
                if age >= 3 && q.skips() == 0 {
                    q.set_skips(skip_age(age));
                }
            }
            if q.state() == State::Volatile {
                counters.pages_unshared += 1;
            }
            q.set_state(State::Unstable);
            unstable.insert(key, from + k * page);
            counters.pages_scanned += 1;
            scanned += 1;
            k += 1;
        }
        (k - i, scanned)
    }

    /// Take, on `hash_threads` threads, the checksums that the visits of the next pages
    /// of the batch at `from` (in the region at `rstart`), from its page `i` on, would
    /// take by reading and hashing each page: those of up to `SUMS_AHEAD` pages (fewer
    /// after a merge wasted some, see `SUMS_AHEAD_MIN`; at most `budget`), kept in
    /// `sums_ahead` for their visits. Returns the index past the pages looked at.
    ///
    /// Nothing changes but when the bytes are read: a checksum taken ahead is a
    /// snapshot of the page taken in this batch, after its probe, as the visit's read
    /// is; a visit still reads the bytes before it compares them with anything, and a
    /// merge compares them under write-protection. A merge window takes the
    /// checksums of its pages away (`Core::protect`): a page it remaps is no unmerged
    /// page any more, and one it gives back may have been written meanwhile without
    /// the write tracker's knowledge (see `protect`).
    fn sum_ahead(
        &mut self,
        rstart: usize,
        from: usize,
        i: usize,
        (pres, unchanged): (&[Presence], &[bool]),
        budget: u64,
    ) -> usize {
        let page = self.page;
        let smart = self.smart_scan;
        let Some(r) = self.regions.get(&rstart) else {
            return pres.len();
        };
        let (base, owned) = ((from - r.start) / page, r.owned);
        let window = self.sums_ahead.reset(from + i * page, pres.len() - i);
        let most = budget.min(window as u64) as usize;
        let mut addrs = Vec::with_capacity(most.min(pres.len() - i));
        let mut k = i;
        // No further than the batch's visits can reach (`budget` pages from here, at
        // most): a checksum its visit never takes is taken again by the next batch.
        while k < pres.len() && addrs.len() < most && ((k - i) as u64) < budget {
            if hashed_by_visit(r.pages[base + k], pres[k], unchanged[k], smart) {
                addrs.push(from + k * page);
            }
            k += 1;
        }
        self.sums_ahead.sums.truncate(k - i);
        if addrs.is_empty() {
            return k;
        }
        let mut sums = vec![None; addrs.len()];
        self.mem
            .checksums(&addrs, owned, self.hash_threads, checksum, &mut sums);
        for (a, c) in addrs.into_iter().zip(sums) {
            self.sums_ahead.sums[(a - self.sums_ahead.start) / page] = c;
        }
        k
    }

    /// Read the VMA budget afresh now (see `count_vmas_when_needed` for the lazy way).
    pub fn refresh_vma_allowance(&mut self) {
        let n = self.mem.vma_allowance();
        self.set_vma_allowance(n);
    }

    /// Read the VMA budget afresh before this full scan's first merge, not now: a
    /// scan that merges nothing (memory that has settled) then counts no VMA (the
    /// count reads /proc/self/maps, a quarter of such a scan's CPU with 15,000 VMAs).
    pub fn count_vmas_when_needed(&mut self) {
        self.vma_count_due = true;
    }

    /// Set the VMA budget from a count the caller already has.
    pub fn set_vma_allowance(&mut self, n: u64) {
        self.vma_allowance = n;
        self.charges_since_count = 0;
        self.vma_count_due = false;
    }

    /// Run until `n` full scans have completed (finishing a scan in progress first).
    pub fn scan_full(&mut self, n: u64) {
        if !self.at_scan_start() {
            while !self.scan_batch(u64::MAX) {}
        }
        for _ in 0..n {
            while !self.scan_batch(u64::MAX) {}
        }
    }

    fn end_full_scan(&mut self) {
        // The unstable index serves one full scan (a page's record says `Unstable`, but
        // not since which scan: entries must not outlive theirs), and its memory is
        // given back rather than kept between scans.
        self.unstable = AddrIndex::new(self.page);
        self.unstable_more = AddrChains::new(self.page);
        self.cursor = None;
        self.frames.trim();
        self.counters.full_scans += 1;
        self.settled = self.changes == 0;
        self.changes = 0;
    }

    /// `cmp_and_merge_page`: returns whether the page counted as scanned.
    fn visit(&mut self, addr: usize, seen: Seen) -> bool {
        let rec = self.rec(addr).expect("tracked");
        // Its recorded checksum still holds: taken while its writes were tracked, and
        // none since (an unmerged page only: any other state is looked at afresh).
        let trusted = seen.unchanged
            && rec.sum_tracked()
            && matches!(rec.state(), State::Volatile | State::Unstable);
        let pres = seen.pres;
        let (owned, prot) = {
            let r = self.region_at(addr).expect("tracked");
            (r.owned, r.prot_of((addr - r.start) / self.page))
        };
        let t = Target { addr, owned, prot };
        // The batch probed presence ahead of the cursor; a run merged since then made
        // later pages merged ones: look again before taking one for a written copy.
        let mut pres = pres;
        if rec.state() == State::Stable && pres == Presence::Anon {
            let mut p = [Presence::Anon];
            if self.mem.probe(addr, &mut p).is_ok() {
                pres = p[0];
            }
        }
        match pres {
            // Still maps its frame (PTE present and file-backed, or not faulted in yet):
            // already a KSM page hung on its node, nothing to do.
            Presence::Absent | Presence::File if rec.state() == State::Stable => {
                self.counters.pages_scanned += 1;
                return true;
            }
            // Still maps the parent's frame, or still the zero page: the kernel's page
            // walk passes over both (no normal page of this process there).
            Presence::Absent | Presence::File
                if matches!(rec.state(), State::Inherited | State::Zero) =>
            {
                return false
            }
            // Not present: the kernel frees rmap_items of pages it passes over.
            Presence::Absent | Presence::File => {
                if rec.state() != State::Untracked {
                    self.forget(addr);
                }
                return false;
            }
            Presence::Anon => {}
        }
        match rec.state() {
            State::Stable => {
                // Copied away by a write: leave the stable tree, the checksum starts over.
                // The private copy sits in a VMA that still maps the frame's offset
                // (MADV_DONTNEED would bring the frame back), so first give the page an
                // anonymous mapping of its own: only then can the frame be freed and
                // reused without this page ever seeing another page's bytes.
                if self.mem.unmerge_run(addr, self.page, prot, owned).is_err() {
                    self.counters.pages_scanned += 1;
                    return true; // retried at the next visit; nothing is lost meanwhile
                }
                self.counters.cows += 1;
                self.changes += 1;
                self.drop_frame_ref(rec.frame());
                *self.rec_mut(addr) = PageRec::fresh(State::Volatile, rec.flags());
            }
            State::Inherited => {
                // A forked child's copy of a merged page, written: it sits in a VMA mapping
                // the parent's pool, so it gets an anonymous mapping first (as above).
                if self.mem.unmerge_run(addr, self.page, prot, owned).is_err() {
                    return false;
                }
                self.counters.rmap_items += 1;
                self.rec_mut(addr).set_state(State::Volatile);
            }
            State::Zero => {
                // Written since it became the zero page: an ordinary page again.
                self.counters.ksm_zero_pages -= 1;
                self.counters.rmap_items += 1;
                *self.rec_mut(addr) = PageRec::fresh(State::Volatile, rec.flags());
            }
            State::Untracked => {
                self.counters.rmap_items += 1;
                self.rec_mut(addr).set_state(State::Volatile);
            }
            State::Unstable | State::Volatile => {}
        }
        if self.should_skip(addr) {
            return false;
        }
        self.counters.pages_scanned += 1;
        if self.rec(addr).expect("tracked").state() == State::Unstable {
            // Out of the unstable index until this visit puts it back.
            self.counters.pages_unshared -= 1;
            self.rec_mut(addr).set_state(State::Volatile);
        }
        let ahead = self.sums_ahead.take(addr, self.page);
        let mut buf = std::mem::take(&mut self.buf);
        self.visit_content(t, &mut buf, (trusted, ahead), seen.tracked);
        self.buf = buf;
        true
    }

    /// The kernel's `should_skip_rmap_item` (smart scan, KERNEL-KSM.md §5.6) for a page
    /// in no index or the unstable one: it ages at every visit; from its fourth visit on,
    /// a page that never merged is skipped for `skip_age(age)` visits between looks.
    /// A skipped page leaves the unstable index and is not counted as scanned.
    fn should_skip(&mut self, addr: usize) -> bool {
        if !self.smart_scan {
            return false;
        }
        let r = self.rec_mut(addr);
        let age = r.age();
        r.set_age(age.saturating_add(1));
        if age < 3 {
            return false;
        }
        if r.skips() == 0 {
            r.set_skips(skip_age(age));
            return false;
        }
        r.set_skips(r.skips() - 1);
        let was_unstable = r.state() == State::Unstable;
        r.set_state(State::Volatile);
        self.counters.pages_skipped += 1;
        if was_unstable {
            self.counters.pages_unshared -= 1;
        }
        true
    }

    /// The page's content step: volatility check, then the zero page, the stable
    /// index, the unstable index. With `trusted` (see `visit`), the checksum is not
    /// taken again, with `ahead` it was taken ahead of the visit in this batch (see
    /// `sum_ahead`); either way the bytes are read only if some index holds a
    /// candidate. `tracked` says whether a checksum taken now stays trustworthy.
    fn visit_content(
        &mut self,
        t: Target,
        buf: &mut [u8],
        (trusted, ahead): (bool, Option<u32>),
        tracked: bool,
    ) -> bool {
        let (hash, checksum) = if trusted {
            let c = self.rec(t.addr).expect("tracked").checksum();
            (key_of(c), c)
        } else {
            let (hash, checksum) = match ahead {
                Some(c) => (key_of(c), c),
                None => {
                    if self.mem.read(t.addr, t.owned, buf).is_err() {
                        self.forget(t.addr);
                        return false;
                    }
                    checksum_of(buf)
                }
            };
            self.counters.pages_hashed += 1;
            let rec = self.rec_mut(t.addr);
            if tracked {
                rec.set(SUM_TRACKED);
            } else {
                rec.clear(SUM_TRACKED);
            }
            if rec.checksum() != checksum {
                rec.set_checksum(checksum);
                self.changes += 1;
                return false;
            }
            (hash, checksum)
        };
        // The bytes, read the first time they are needed (a failed read forgets the
        // page). A checksum taken ahead is older than a read at the visit would be: the
        // bytes read must still have it, else the page changed since, as the volatility
        // check would have seen.
        let verify = ahead.is_some();
        let mut loaded = !trusted && !verify;
        let mut load = |core: &mut Self, buf: &mut [u8]| {
            if loaded {
                return true;
            }
            if core.mem.read(t.addr, t.owned, buf).is_err() {
                core.forget(t.addr);
                return false;
            }
            if verify {
                let now = checksum_of(buf).1;
                if now != checksum {
                    core.rec_mut(t.addr).set_checksum(now);
                    core.changes += 1;
                    return false;
                }
            }
            loaded = true;
            true
        };
        if self.use_zero_pages && checksum == self.zero_checksum {
            if !load(self, buf) {
                return false;
            }
            if buf.iter().all(|&b| b == 0) && self.merge_zero(t) {
                return true;
            }
        }
        if let Some(g) = self.continuing_frame(t, hash) {
            if !load(self, buf) {
                return false;
            }
            if self.mem.frame(g) == buf && self.merge_with_frame(t, g, hash) {
                return true;
            }
        }
        if self.stable.get(hash).next().is_some() {
            if !load(self, buf) {
                return false;
            }
            match self.stable_search(hash, buf) {
                // A failed merge (content changed under protection, or the VMA budget)
                // falls through to the unstable index, as the kernel's does.
                StableHit::Room(f) if self.merge_with_frame(t, f, hash) => return true,
                StableHit::Room(_) | StableHit::Full | StableHit::Miss => {}
            }
        }
        if self.has_unstable_candidate(hash, t.addr) && !self.vma_room(2) {
            // A pair merge needs VMAs the budget no longer has: it is put off before any
            // byte is read or compared (a process at its budget would otherwise read and
            // compare every such pair at every full scan, only to refuse the merge).
            // Counted on the checksum match, as `charge_vmas` counts a refused merge (a
            // checksum taken ahead is checked first, as where the bytes are needed).
            if verify && !load(self, buf) {
                return false;
            }
            self.counters.vma_budget_skips += 1;
        } else if self.unstable.contains_key(&hash) {
            if !load(self, buf) {
                return false;
            }
            if let Some(other) = self.unstable_search(hash, t.addr, buf) {
                if self.merge_pair(t, other, hash) {
                    return true;
                }
            }
        }
        let r = self.rec_mut(t.addr);
        if r.state() == State::Volatile {
            r.set_state(State::Unstable);
            self.counters.pages_unshared += 1;
            if !self.unstable.insert_first(hash, t.addr) {
                self.unstable_more.push(hash, t.addr);
            }
        }
        false
    }

    /// Frames holding exactly `buf`: one with room (the fullest), or whether all are full.
    ///
    /// Only frames with room are compared, fullest first, and the first equal one
    /// wins: a content with many users has many full frames (one per
    /// `max_page_sharing` users), which must not cost a comparison each per page.
    fn stable_search(&self, hash: u64, buf: &[u8]) -> StableHit {
        let max = self.max_page_sharing;
        let mut room: Vec<FrameId> = self
            .stable
            .get(hash)
            .filter(|&f| self.frames.refs(f) < max)
            .collect();
        room.sort_unstable_by_key(|&f| std::cmp::Reverse(self.frames.refs(f)));
        if let Some(f) = room.into_iter().find(|&f| self.mem.frame(f) == buf) {
            return StableHit::Room(f);
        }
        let full = self
            .stable
            .get(hash)
            .any(|f| self.frames.refs(f) >= max && self.mem.frame(f) == buf);
        if full {
            StableHit::Full
        } else {
            StableHit::Miss
        }
    }

    /// A page of this full scan's unstable index with the same bytes as `buf`.
    ///
    /// Entries that left the index (merged, revisited, forgotten) are dropped as they
    /// are met, so that a content many pages share costs one comparison per page,
    /// not one per page already seen.
    fn unstable_search(&mut self, hash: u64, addr: usize, buf: &[u8]) -> Option<usize> {
        let head = self.unstable.remove(&hash)?;
        let mut more = self.unstable_more.remove(&hash).unwrap_or_default();
        let mut other = std::mem::take(&mut self.buf2);
        let mut found = None;
        let kept = self.in_unstable(head, addr).then_some(head);
        if kept.is_some() && self.same_bytes(head, buf, &mut other) {
            found = kept;
        }
        let mut i = 0;
        while found.is_none() && i < more.len() {
            let c = more[i];
            if !self.in_unstable(c, addr) {
                more.swap_remove(i);
            } else if self.same_bytes(c, buf, &mut other) {
                found = Some(c);
            } else {
                i += 1;
            }
        }
        self.buf2 = other;
        if let Some(h) = kept.or_else(|| more.pop()) {
            self.unstable.insert(hash, h);
            if !more.is_empty() {
                self.unstable_more.insert(hash, more);
            }
        }
        found
    }

    /// Whether this scan's unstable index holds a page other than `addr` under `hash`
    /// that is still in it (records only, no byte read).
    fn has_unstable_candidate(&self, hash: u64, addr: usize) -> bool {
        self.unstable
            .get(&hash)
            .is_some_and(|h| self.in_unstable(h, addr))
            || self
                .unstable_more
                .iter(&hash)
                .any(|c| self.in_unstable(c, addr))
    }

    /// Whether page `c` (not `addr`, the page looking) is in this scan's unstable index.
    fn in_unstable(&self, c: usize, addr: usize) -> bool {
        c != addr
            && self
                .rec(c)
                .is_some_and(|r| r.state() == State::Unstable && r.advised())
    }

    /// Whether page `c` holds `buf` (read into `scratch`).
    fn same_bytes(&mut self, c: usize, buf: &[u8], scratch: &mut [u8]) -> bool {
        let owned = self.region_at(c).is_some_and(|r| r.owned);
        self.mem.read(c, owned, scratch).is_ok() && scratch == buf
    }

    /// Charge the VMA budget for `pages` remaps; false (and counted) if it would pass it.
    ///
    /// The charge (2 per page, the most a remap can add) is an upper bound: runs of
    /// pages on consecutive frames coalesce into one VMA. So when the allowance runs
    /// out, the real count is read again, at most once per 256 charges, so that a
    /// process really at its budget does not recount for every page.
    fn charge_vmas(&mut self, pages: u64) -> bool {
        if !self.vma_room(pages) {
            self.counters.vma_budget_skips += 1;
            return false;
        }
        let need = 2 * pages;
        self.charges_since_count += 1;
        self.vma_allowance -= need;
        true
    }

    /// Whether the VMA budget has room for `pages` remaps (as `charge_vmas` would
    /// charge them), the real count read again as `charge_vmas` says; nothing charged.
    fn vma_room(&mut self, pages: u64) -> bool {
        let need = 2 * pages;
        if self.vma_count_due || (self.vma_allowance < need && self.charges_since_count >= 256) {
            self.refresh_vma_allowance();
        }
        self.vma_allowance >= need
    }

    /// The page at `addr` maps frame `f` now: its record leaves whatever index it was
    /// in (smart-scan age reset, as the kernel's shared fields are) and counts.
    fn record_merged(&mut self, addr: usize, f: FrameId) {
        self.add_frame_ref(f);
        self.uncover(addr);
        let r = self.rec_mut(addr);
        let was_unstable = r.state() == State::Unstable;
        *r = PageRec::fresh(State::Stable, r.flags() & !SUM_TRACKED);
        r.set_stable(f);
        if was_unstable {
            self.counters.pages_unshared -= 1;
        }
        self.counters.merges += 1;
    }

    /// Whether the page at `x` can join a run that `want` starts (see `run_eligible`),
    /// with its bytes read into `buf` and, if unmerged, its checksum unchanged since its
    /// last visit (the kernel's volatility rule).
    fn run_candidate(
        &mut self,
        x: usize,
        want: Target,
        merged: bool,
        ahead: &mut Ahead,
        buf: &mut [u8],
    ) -> bool {
        match self.run_eligible(x, want, merged, ahead) {
            None => false,
            Some(None) => {
                self.mem.read(x, want.owned, buf).is_ok()
                    && self
                        .rec(x)
                        .is_some_and(|r| r.checksum() == checksum_of(buf).1)
            }
            // Its bytes are its frame's for as long as it maps it (a write would have
            // made it a private anonymous page); compared again under protection.
            Some(Some(g)) => {
                buf.copy_from_slice(self.mem.frame(g));
                true
            }
        }
    }

    /// `run_key`, and present as a page that joins a run must be (see `present_for_run`):
    /// None if the page cannot join a run, else the frame it maps now if it is merged.
    fn run_eligible(
        &mut self,
        x: usize,
        want: Target,
        merged: bool,
        ahead: &mut Ahead,
    ) -> Option<Option<FrameId>> {
        let (_, was) = self.run_key(x, want, merged)?;
        self.present_for_run(ahead, x, was).then_some(was)
    }

    /// By its record alone (no syscall, no byte read): whether the page at `x` may join
    /// a run that `want` starts (advised, with the run's protection, unmerged or, with
    /// `merged`, merged in a short run), with the index key of its bytes as last seen
    /// (its checksum at its last visit; its frame's if merged) and the frame it maps.
    fn run_key(&self, x: usize, want: Target, merged: bool) -> Option<(u64, Option<FrameId>)> {
        let rec = self.rec(x)?;
        let r = self.region_at(x)?;
        if !rec.advised() || r.prot_of((x - r.start) / self.page) != want.prot {
            return None;
        }
        match rec.state() {
            State::Volatile | State::Unstable => Some((key_of(rec.checksum()), None)),
            State::Stable if merged && self.in_short_run(x, rec.frame()) => {
                Some((self.frames.hash(rec.frame()), Some(rec.frame())))
            }
            _ => None,
        }
    }

    /// Presence of the page at `x`, probed with the pages after it (see `Ahead`).
    fn presence_ahead(&mut self, ahead: &mut Ahead, x: usize) -> Option<Presence> {
        let span = AHEAD * self.page;
        let start = x - x % span;
        let i = (x - start) / self.page;
        if let Some((_, p)) = ahead.blocks.iter().find(|(s, _)| *s == start) {
            return Some(p[i]);
        }
        // A block of ksm's own memory with no page in a pool mapping holds no page of
        // a file: the cheaper probe says as much.
        let anonymous = self
            .region_at(start)
            .filter(|r| start + span <= r.end(self.page))
            .is_some_and(|r| self.only_anonymous(r.start, start, AHEAD));
        let slot = &mut ahead.blocks[ahead.next];
        ahead.next ^= 1;
        slot.0 = usize::MAX;
        if anonymous {
            self.mem.probe_anonymous(start, &mut slot.1).ok()?;
        } else {
            self.mem.probe(start, &mut slot.1).ok()?;
        }
        slot.0 = start;
        Some(slot.1[i])
    }

    /// Whether the page at `x`, merged on frame `g`, is in a short run: fewer than
    /// `MAX_REHOME` pages around it map the frames around `g` (one mapping). Only such
    /// a page moves into another run: a longer run is worth more whole, and taking a
    /// page out of it would split it and leave its frames shared by fewer pages.
    fn in_short_run(&self, x: usize, g: FrameId) -> bool {
        let page = self.page;
        let Some(r) = self.region_at(x) else {
            return false;
        };
        let on = |a: usize, want: Option<FrameId>| {
            want.is_some_and(|w| {
                (r.start..r.end(page)).contains(&a)
                    && self
                        .rec(a)
                        .is_some_and(|p| p.state() == State::Stable && p.frame() == w)
            })
        };
        let mut len = 1;
        while len < MAX_REHOME && on(x.wrapping_sub(len * page), g.checked_sub(len as FrameId)) {
            len += 1;
        }
        let mut k = 1;
        while len < MAX_REHOME && on(x + k * page, g.checked_add(k as FrameId)) {
            len += 1;
            k += 1;
        }
        len < MAX_REHOME
    }

    /// The pages from `t` that can map frames `f, f+1, …` as one run (at least `t`,
    /// which matched `f`): the following pages qualify (see `run_key`) while their
    /// recorded checksum is the next frame's, which must be in use with room left; a
    /// page whose checksum differs between pages that qualify is covered (see
    /// `can_cover_page`).
    ///
    /// Planned from the records alone (no byte is read: the merge compares every page
    /// under protection and ends the run before the first that differs), so there is no
    /// volatility check either: the kernel's ksmd, too, looks for a page in the stable
    /// tree before it checks its checksum.
    fn stable_run_of(&mut self, t: Target, f: FrameId) -> Vec<Slot> {
        let page = self.page;
        let t_end = self.region_at(t.addr).map_or(t.addr, |r| r.end(page));
        let mut run = vec![Slot::Join(None)];
        let mut pending = 0;
        let mut ahead = Ahead::new();
        while run.len() < MAX_RUN {
            let n = run.len();
            let (x, g) = (t.addr + n * page, f + n as FrameId);
            if x >= t_end || !self.frames.exists(g) {
                break;
            }
            let Some((key, was)) = self.run_key(x, t, true) else {
                break;
            };
            // Already on this very frame (or on the run's own) is no move worth making.
            if was.is_some_and(|w| (f..=g).contains(&w)) {
                break;
            }
            let join = (1..self.max_page_sharing).contains(&self.frames.refs(g))
                && match was {
                    Some(w) => self.mem.frame(w) == self.mem.frame(g),
                    None => key == self.frames.hash(g),
                };
            if join && self.present_for_run(&mut ahead, x, was) {
                run.push(Slot::Join(was));
                pending = 0;
            } else if !join
                && was.is_none()
                && pending < MAX_COVER
                && self.can_cover_page(t, x)
                && self.present_for_run(&mut ahead, x, None)
            {
                run.push(Slot::Cover);
                pending += 1;
            } else {
                break;
            }
        }
        run.truncate(run.len() - pending);
        run
    }

    /// Whether the page at `x` is present as a page that can join a run must be: a
    /// private anonymous page if unmerged (`was` None), its frame's page if merged.
    fn present_for_run(&mut self, ahead: &mut Ahead, x: usize, was: Option<FrameId>) -> bool {
        let want = match was {
            None => Presence::Anon,
            Some(_) => Presence::File,
        };
        self.presence_ahead(ahead, x) == Some(want)
    }

    /// Whether the page at `x` of run `t` may be covered (see `Slot::Cover`): read-write
    /// memory only (a covered page's copy is written into the mapping before it is
    /// moved in place), and not a page of zeros (by its recorded checksum) that
    /// `use_zero_pages` would drop.
    fn can_cover_page(&self, t: Target, x: usize) -> bool {
        t.prot == libc::PROT_READ | libc::PROT_WRITE
            && !(self.use_zero_pages
                && self
                    .rec(x)
                    .is_some_and(|r| r.checksum() == self.zero_checksum))
    }

    /// How many pages from `t` (at least `t`, which matched) hold the bytes of frame
    /// `f` and could join a run (see `run_candidate`): one content repeated.
    fn same_content_run(&mut self, t: Target, f: FrameId) -> usize {
        let page = self.page;
        let t_end = self.region_at(t.addr).map_or(t.addr, |r| r.end(page));
        let mut a = vec![0u8; page];
        let mut n = 1;
        let mut ahead = Ahead::new();
        while n < MAX_TILE && t.addr + n * page < t_end {
            if !self.run_candidate(t.addr + n * page, t, false, &mut ahead, &mut a)
                || self.mem.frame(f) != &a[..]
            {
                break;
            }
            n += 1;
        }
        n
    }

    /// A tile of this content with room (frames `g, g+1, …` holding the same bytes)
    /// that a run of pages from `t` can map, with the run's length.
    fn tile_for(&mut self, t: Target, f: FrameId, hash: u64) -> Option<(FrameId, Vec<Slot>)> {
        let max = self.max_page_sharing;
        let room = |core: &Self, g: FrameId| {
            core.frames.exists(g)
                && (1..max).contains(&core.frames.refs(g))
                && core.frames.hash(g) == hash
        };
        let starts: Vec<FrameId> = self
            .stable
            .get(hash)
            .filter(|&g| g != f && room(self, g) && room(self, g + 1))
            .collect();
        for g in starts {
            if self.mem.frame(g) != self.mem.frame(f) {
                continue;
            }
            let run = self.stable_run_of(t, g);
            if run.len() >= 2 && run.iter().all(|&s| s != Slot::Cover) {
                return Some((g, run));
            }
        }
        None
    }

    /// Map `n` pages from `t`, all holding the bytes of frame `f`, onto a new tile of
    /// `n` consecutive frames with those bytes (one mapping): later runs of the same
    /// content map the tile too, so that one content repeated costs one VMA per run,
    /// not one per page (consecutive pages cannot share one frame in one mapping).
    fn merge_tile(&mut self, t: Target, f: FrameId, n: usize) -> bool {
        let page = self.page;
        let len = n * page;
        let hash = self.frames.hash(f);
        let Some(g0) = self.frames.alloc_run(&vec![hash; n]) else {
            return false;
        };
        let content = self.mem.frame(f).to_vec();
        let fail = |core: &mut Self, protected: bool| {
            if protected {
                core.release_failed(t.addr, len);
            }
            for g in g0..g0 + n as FrameId {
                let _ = core.mem.punch(g);
                core.frames.discard(g);
            }
            core.counters.merge_failures += 1;
            false
        };
        if (0..n).any(|i| self.mem.write_frame(g0 + i as FrameId, &content).is_err()) {
            return fail(self, false);
        }
        if self.protect(t.addr, len).is_err() {
            return fail(self, true);
        }
        let same = (0..n).all(|i| {
            matches!(
                self.mem.equals(t.addr + i * page, t.owned, &content),
                Ok(true)
            )
        });
        if !same || self.mem.map_frames(t.addr, n, t.prot, g0, &[]).is_err() {
            return fail(self, true);
        }
        self.mem.release(t.addr, len, false);
        for i in 0..n {
            let g = g0 + i as FrameId;
            self.stable.push(hash, g);
            self.record_merged(t.addr + i * page, g);
        }
        self.changes += 1;
        true
    }

    /// Write-protect `t` (and the run after it that matches the frames after `f`),
    /// compare again, remap with one mapping, wake.
    fn merge_with_frame(&mut self, t: Target, f: FrameId, hash: u64) -> bool {
        let page = self.page;
        if !self.charge_vmas(1) {
            return false;
        }
        let mut f = f;
        let mut run = self.stable_run_of(t, f);
        if run.len() == 1 && self.vma_allowance < TILE_BELOW_ALLOWANCE {
            // One content repeated, with the VMA budget running low: map a run of it
            // onto a tile of frames. (Not before: a tile's first run saves nothing, so
            // small counts of one content keep the kernel's figures exactly.)
            let same = self.same_content_run(t, f);
            if same >= MIN_TILE {
                match self.tile_for(t, f, hash) {
                    Some((g, r)) => (f, run) = (g, r),
                    None => return self.merge_tile(t, f, same),
                }
            }
        }
        let n = run.len();
        let len = n * page;
        if self.protect(t.addr, len).is_err() {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        }
        let mut cur = std::mem::take(&mut self.buf2);
        // Compared under protection: the run ends before the first page that differs
        // from its frame (it was planned by checksums, see `stable_run_of`).
        let mut k = n;
        let mut covered = Vec::new();
        for (i, &slot) in run.iter().enumerate() {
            let a = t.addr + i * page;
            let same = match slot {
                Slot::Join(_) => matches!(
                    self.mem.equals_frame(a, t.owned, f + i as FrameId),
                    Ok(true)
                ),
                Slot::Cover => {
                    let read = self.mem.read(a, t.owned, &mut cur).is_ok();
                    if read {
                        covered.push((i, cur.clone()));
                    }
                    read
                }
            };
            if !same {
                k = i;
                break;
            }
        }
        self.buf2 = cur;
        let k = joined_prefix(&run, k);
        if k == 0 {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        }
        if k < n {
            self.release_tail(t.addr, len, k * page);
            run.truncate(k);
            covered.retain(|&(i, _)| i < k);
        }
        let len = k * page;
        if self.mem.map_frames(t.addr, k, t.prot, f, &covered).is_err() {
            self.release_failed(t.addr, len);
            self.counters.merge_failures += 1;
            return false;
        }
        self.mem.release(t.addr, len, false);
        self.record_run(t.addr, f, &run);
        self.changes += 1;
        true
    }

    /// The pages from `start` map frames `f0, f0+1, …` now, or cover them (see
    /// `Slot`). New references are taken before old ones are dropped, so that no
    /// frame of the run is freed on the way. A covered offset whose frame is free is
    /// punched: assembling the run may have given that hole memory.
    fn record_run(&mut self, start: usize, f0: FrameId, run: &[Slot]) {
        for (i, &slot) in run.iter().enumerate() {
            let (a, g) = (start + i * self.page, f0 + i as FrameId);
            match slot {
                Slot::Join(_) => self.record_merged(a, g),
                Slot::Cover => self.cover(a, g),
            }
        }
        for (i, &slot) in run.iter().enumerate() {
            match slot {
                Slot::Join(Some(old)) => self.drop_frame_ref(old),
                Slot::Cover if !self.frames.is_live(f0 + i as FrameId) => {
                    let _ = self.mem.punch(f0 + i as FrameId);
                }
                Slot::Join(None) | Slot::Cover => {}
            }
        }
    }

    /// The frame after the one the page before `t` maps, if it has room and this
    /// page's key (the caller compares the bytes):
    /// merging there continues that page's run (its mapping extends the VMA before),
    /// where another frame of the same content would split it.
    fn continuing_frame(&self, t: Target, hash: u64) -> Option<FrameId> {
        let r = self.region_at(t.addr)?;
        if t.addr == r.start {
            return None;
        }
        let left = self.rec(t.addr - self.page)?;
        if left.state() != State::Stable {
            return None;
        }
        let g = left.frame().checked_add(1)?;
        (self.frames.exists(g)
            && (1..self.max_page_sharing).contains(&self.frames.refs(g))
            && self.frames.hash(g) == hash)
            .then_some(g)
    }

    /// `try_to_merge_with_zero_page`: write-protect, check the page is still all zero,
    /// drop it (it reads the kernel's zero page from then on), unprotect.
    fn merge_zero(&mut self, t: Target) -> bool {
        let page = self.page;
        // Dropping a page inside a pool mapping would bring the frame's bytes back.
        if self.rec(t.addr).is_some_and(|r| r.covered()) {
            return false;
        }
        if self.protect(t.addr, page).is_err() {
            self.release_failed(t.addr, page);
            self.counters.merge_failures += 1;
            return false;
        }
        let mut cur = std::mem::take(&mut self.buf2);
        let zero = self.mem.read(t.addr, t.owned, &mut cur).is_ok() && cur.iter().all(|&b| b == 0);
        self.buf2 = cur;
        let done = zero && self.mem.zap(t.addr).is_ok();
        self.release_failed(t.addr, page);
        if !done {
            self.counters.merge_failures += 1;
            return false;
        }
        let rec = self.rec(t.addr).expect("tracked");
        *self.rec_mut(t.addr) = PageRec::fresh(State::Zero, rec.flags());
        self.counters.rmap_items -= 1;
        self.counters.ksm_zero_pages += 1;
        self.counters.merges += 1;
        self.changes += 1;
        true
    }

    /// The pairs of pages from `t` and from `o` (at least the first pair, already
    /// found equal) that can merge as one run: the following pairs qualify while both
    /// pages can join a run (see `run_key`: a page merged already moves into the run),
    /// have the same checksum as last seen (the merge compares them byte for byte under
    /// protection, and checks that checksum on the frame it fills, see `merge_pair`),
    /// the two runs do not overlap and do not map one frame already; a pair of unmerged
    /// pages whose checksums differ between pairs that qualify is covered on both sides
    /// (see `can_cover_page`). Pages of zeros stop a run when `use_zero_pages` is on.
    fn run_of(&mut self, t: Target, o: Target, hash: u64) -> PairRun {
        let page = self.page;
        let mut run = PairRun {
            hashes: vec![hash],
            t: vec![Slot::Join(None)],
            o: vec![Slot::Join(None)],
        };
        let bounds = |core: &Self, a: usize| {
            core.region_at(a)
                .map(|r| (r.start, r.end(page)))
                .expect("tracked")
        };
        let ((_, t_end), (_, o_end)) = (bounds(self, t.addr), bounds(self, o.addr));
        let dist = t.addr.abs_diff(o.addr);
        let zero = self.use_zero_pages.then_some(key_of(self.zero_checksum));
        let mut pending = 0;
        let mut ahead = Ahead::new();
        while run.len() < MAX_RUN {
            let n = run.len();
            let (ta, oa) = (t.addr + n * page, o.addr + n * page);
            if ta >= t_end || oa >= o_end || (n + 1) * page > dist {
                break;
            }
            // Planned by the records alone: the merge compares every pair under protection
            // (and checks the frames against these keys) and ends the run before the
            // first that differs.
            let (Some((kt, wt)), Some((ko, wo))) =
                (self.run_key(ta, t, true), self.run_key(oa, o, true))
            else {
                break;
            };
            let shared = wt.is_some() && wt == wo;
            if shared || zero == Some(kt) {
                break;
            }
            let join = match (wt, wo) {
                (Some(g), Some(h)) => self.mem.frame(g) == self.mem.frame(h),
                _ => kt == ko,
            };
            if join
                && self.present_for_run(&mut ahead, ta, wt)
                && self.present_for_run(&mut ahead, oa, wo)
            {
                run.push(kt, Slot::Join(wt), Slot::Join(wo));
                pending = 0;
            } else if !join
                && wt.is_none()
                && wo.is_none()
                && pending < MAX_COVER
                && self.can_cover_page(t, ta)
                && self.can_cover_page(o, oa)
                && self.present_for_run(&mut ahead, ta, None)
                && self.present_for_run(&mut ahead, oa, None)
            {
                run.push(0, Slot::Cover, Slot::Cover);
                pending += 1;
            } else {
                break;
            }
        }
        run.truncate(run.len() - pending);
        run
    }

    /// The frame where `t` and `o` can merge in place: both are private copies inside
    /// pool mappings covering the same free frame (see `Slot::Cover`), so mapping that
    /// frame keeps both mappings whole.
    fn frame_in_place(&self, t: usize, o: usize) -> Option<FrameId> {
        let g = self.in_pool(t)?;
        (self.in_pool(o) == Some(g) && self.frames.is_free(g)).then_some(g)
    }

    /// `try_to_merge_two_pages`, extended to runs: both runs protected, compared
    /// again, copied into consecutive new frames, each remapped with one mapping
    /// (one VMA per run instead of one per page).
    fn merge_pair(&mut self, t: Target, other: usize, hash: u64) -> bool {
        let page = self.page;
        let o = {
            let r = self.region_at(other).expect("tracked");
            Target {
                addr: other,
                owned: r.owned,
                prot: r.prot_of((other - r.start) / page),
            }
        };
        // Each side is one mapping, at most 2 VMAs, whatever the run's length.
        if !self.charge_vmas(2) {
            return false;
        }
        let mut run = self.run_of(t, o, hash);
        let in_place = match run.len() {
            1 => self.frame_in_place(t.addr, o.addr),
            _ => None,
        };
        let allocated = match in_place {
            Some(g) => self.frames.alloc_at(g, hash),
            None => self.frames.alloc_run(&run.hashes),
        };
        let f0 = match allocated {
            Some(f) => f,
            None => {
                run.truncate(1);
                match self.frames.alloc(hash) {
                    Some(f) => f,
                    None => return false,
                }
            }
        };
        let n = run.len();
        let len = n * page;
        let fail = |core: &mut Self, which: &[usize], n: usize| {
            for &a in which {
                core.release_failed(a, n * page);
            }
            // The frames may hold bytes already: give their memory back.
            for f in f0..f0 + n as FrameId {
                let _ = core.mem.punch(f);
                core.frames.discard(f);
            }
            core.counters.merge_failures += 1;
            false
        };
        if self.protect(t.addr, len).is_err() {
            return fail(self, &[t.addr], n);
        }
        if self.protect(o.addr, len).is_err() {
            return fail(self, &[t.addr, o.addr], n);
        }
        // Compare both runs again now that neither can change: the run ends before the
        // first pair that differs (it was planned by checksums, see `run_of`).
        let (mut a, mut b) = (vec![0u8; page], vec![0u8; page]);
        let (mut t_cov, mut o_cov) = (Vec::new(), Vec::new());
        let mut k = n;
        for i in 0..n {
            let (ta, oa) = (t.addr + i * page, o.addr + i * page);
            let same = if run.t[i] == Slot::Cover {
                let read = self.mem.read(ta, t.owned, &mut a).is_ok()
                    && self.mem.read(oa, o.owned, &mut b).is_ok();
                if read {
                    t_cov.push((i, a.clone()));
                    o_cov.push((i, b.clone()));
                }
                read
            } else {
                matches!(self.mem.same_pages(ta, t.owned, oa, o.owned), Ok(true))
            };
            if !same {
                k = i;
                break;
            }
        }
        // Fill the frames of each stretch of joined pages from `t`'s (protected, so still
        // the bytes just found equal to `o`'s), and check each frame against the key it
        // was allocated with (the pages' checksum at their last visit, the volatility
        // check): a pair written since, equal on both sides, ends the run there too.
        let mut k = joined_prefix(&run.t, k);
        let mut i = 0;
        while i < k {
            if run.t[i] == Slot::Cover {
                i += 1;
                continue;
            }
            let s = i;
            while i < k && run.t[i] != Slot::Cover {
                i += 1;
            }
            let (f, at) = (f0 + s as FrameId, t.addr + s * page);
            if self.mem.fill_frames(f, at, t.owned, i - s).is_err() {
                k = s;
                break;
            }
            let stale =
                (s..i).find(|&j| checksum_of(self.mem.frame(f0 + j as FrameId)).0 != run.hashes[j]);
            if let Some(j) = stale {
                k = j;
                break;
            }
        }
        let k = joined_prefix(&run.t, k);
        if k == 0 {
            return fail(self, &[t.addr, o.addr], n);
        }
        if k < n {
            self.release_tail(t.addr, len, k * page);
            self.release_tail(o.addr, len, k * page);
            // The frames past the run may hold bytes already: give their memory back.
            for f in f0 + k as FrameId..f0 + n as FrameId {
                let _ = self.mem.punch(f);
                self.frames.discard(f);
            }
            run.truncate(k);
            t_cov.retain(|&(i, _)| i < k);
            o_cov.retain(|&(i, _)| i < k);
        }
        let (n, len) = (k, k * page);
        if self.mem.map_frames(t.addr, n, t.prot, f0, &t_cov).is_err() {
            return fail(self, &[t.addr, o.addr], n);
        }
        let other_ok = self.mem.map_frames(o.addr, n, o.prot, f0, &o_cov).is_ok();
        self.mem.release(t.addr, len, false);
        if other_ok {
            self.mem.release(o.addr, len, false);
        } else {
            self.release_failed(o.addr, len);
        }
        for (i, &h) in run.hashes.iter().enumerate() {
            let f = f0 + i as FrameId;
            if run.t[i] == Slot::Cover {
                // Covered on both sides: the frame holds nothing anyone maps.
                self.frames.discard(f);
            } else {
                self.stable.push(h, f);
            }
        }
        self.record_run(t.addr, f0, &run.t);
        if other_ok {
            self.record_run(o.addr, f0, &run.o);
        }
        self.changes += 1;
        if !other_ok {
            self.counters.merge_failures += 1;
        }
        true
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
                    Some(Some(f)) => cur == Some(f.wrapping_add(1)),
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
    /// frame because `max_page_sharing` was reached, and the frames holding them.
    pub fn stable_chains(&self) -> (u64, u64) {
        let (mut chains, mut dups) = (0, 0);
        for frames in self.stable.groups() {
            // One bucket per 64-bit hash: group its frames by content (almost always
            // one group; a hash collision would make two).
            let mut groups: Vec<(FrameId, u64)> = Vec::new();
            for f in frames {
                match groups
                    .iter_mut()
                    .find(|(g, _)| self.mem.frame(*g) == self.mem.frame(f))
                {
                    Some((_, n)) => *n += 1,
                    None => groups.push((f, 1)),
                }
            }
            for (_, n) in groups.into_iter().filter(|&(_, n)| n > 1) {
                chains += 1;
                dups += n;
            }
        }
        (chains, dups)
    }

    /// Bytes of our own bookkeeping (records of every region, frame table, indexes).
    /// Unlike the kernel's, ksm's own memory (`ksm.mmap`) has its records from the
    /// start, advised or not (8 bytes a page); the application's memory has none
    /// until it is advised.
    pub fn metadata_bytes(&self) -> u64 {
        let recs: usize = self.regions.values().map(Region::metadata_bytes).sum();
        (recs
            + self.frames.metadata_bytes()
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()
            + self.unstable_more.metadata_bytes()) as u64
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
            c.pages_shared += 1;
            c.pages_sharing += u64::from(n - 1);
        }
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
            refs.len() + self.frames.deferred() + self.frames.suspects(),
            "live frames"
        );
    }
}

#[cfg(test)]
mod tests;
